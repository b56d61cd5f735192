"""The one interface of every OT solver in ``vlframe.registry.OT_SOLVERS``.

``plan = solver(cost, mask_a, mask_b)``: cost [B, N, M] (any float dtype), boolean validity masks
[B, N] and [B, M] (True = real entry; None = all real). The plan is fp32 [B, N, M] whatever the
cost's dtype (so ``ot_distance`` accumulates in fp32 under AMP), has uniform marginals over the
valid entries (1/n_valid per row, 1/m_valid per column) and is exactly 0 on padded rows and
columns. An example with no valid entry on a side gets an all-zero plan (distance 0).
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch

from vlframe.ot.cost import check_problem

__all__ = ["OTSolver"]


class OTSolver(ABC):
    """Base class: validates the problem, then hands the cost and bool masks to ``_solve`` (fp32 inside)."""

    name = "ot_solver"

    def __call__(
        self, cost: torch.Tensor, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask_a, mask_b = check_problem(cost, mask_a, mask_b, self.name)
        # the solvers compute in fp32 by design; autocast would move their products to half
        with torch.autocast(device_type=cost.device.type, enabled=False):
            return self._solve(cost, mask_a, mask_b)

    @abstractmethod
    def _solve(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        """Return the fp32 plan for a validated problem (masks are bool)."""

    def __repr__(self) -> str:
        keys = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if hasattr(self, k))
        return f"{type(self).__name__}({args})"


def check_positive(value: float, key: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{who}: {key} must be a positive number, got {value!r}")
    return float(value)


def check_count(value: int, key: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {key} must be an integer >= 1, got {value!r}")
    return value
