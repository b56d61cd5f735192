"""The one interface of every OT solver in ``vlframe.registry.OT_SOLVERS``.

``plan = solver(cost, mask_a, mask_b)``: cost [B, N, M] (any float dtype), boolean validity masks
[B, N] and [B, M] (True = real entry; None = all real). The plan is fp32 [B, N, M] whatever the
cost's dtype (so ``ot_distance`` accumulates in fp32 under AMP), has uniform marginals over the
valid entries (1/n_valid per row, 1/m_valid per column; to float precision for exact OT and
IPOT's default, to the solver's convergence otherwise) and is exactly 0 on padded rows and
columns. An example with no valid entry on a side gets an all-zero plan (distance 0).
:func:`round_to_marginals` makes any nonnegative plan exactly feasible.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch

from vlframe.ot.cost import check_problem

__all__ = ["OTSolver", "marginal_error", "round_to_marginals"]

_TINY = torch.finfo(torch.float32).tiny


class OTSolver(ABC):
    """Base class: validates the problem, then hands the cost and bool masks to ``_solve`` (fp32 inside)."""

    name = "ot_solver"
    #: 0-d tensor: the largest marginal error of the last plan (see :func:`marginal_error`);
    #: a tensor, so reading it is the caller's choice of when to synchronise with the device
    last_marginal_error: torch.Tensor | None = None

    def __call__(
        self, cost: torch.Tensor, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask_a, mask_b = check_problem(cost, mask_a, mask_b, self.name)
        if cost.numel() == 0:  # B = 0, N = 0 or M = 0: nothing to transport
            self.last_marginal_error = torch.zeros((), device=cost.device)
            return torch.zeros(cost.shape, dtype=torch.float32, device=cost.device)
        # the solvers compute in fp32 by design; autocast would move their products to half
        with torch.autocast(device_type=cost.device.type, enabled=False):
            plan = self._solve(cost, mask_a, mask_b)
        self.last_marginal_error = marginal_error(plan, mask_a, mask_b)
        return plan

    @abstractmethod
    def _solve(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        """Return the fp32 plan for a validated problem (masks are bool)."""

    def __repr__(self) -> str:
        keys = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if hasattr(self, k))
        return f"{type(self).__name__}({args})"


@torch.no_grad()
def marginal_error(plan: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Largest absolute deviation of the plan's row and column sums from the uniform marginals
    (1/n_valid, 1/m_valid) over the valid entries of the batch, as a 0-d fp32 tensor."""
    f32 = torch.float32
    r = mask_a.to(f32) / mask_a.sum(1, keepdim=True).clamp_min(1)
    c = mask_b.to(f32) / mask_b.sum(1, keepdim=True).clamp_min(1)
    live = (mask_a.any(1) & mask_b.any(1)).unsqueeze(1)  # an empty side has an all-zero plan
    rows = (plan.sum(2) - r).abs().masked_fill_(~(mask_a & live), 0.0)
    cols = (plan.sum(1) - c).abs().masked_fill_(~(mask_b & live), 0.0)
    return torch.maximum(rows.amax(), cols.amax()) if plan.numel() else plan.new_zeros(())


@torch.no_grad()
def round_to_marginals(plan: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Round a nonnegative plan [B, N, M] onto the transport polytope of r [B, N], c [B, M], in place.

    Algorithm 2 of Altschuler, Weed & Rigollet (NeurIPS 2017): scale rows down so that row sums
    are <= r, then columns down so that column sums are <= c, then add the rank-one correction
    ``err_r err_c^T / ||err_r||_1``. The result has row sums r and column sums c (up to float
    rounding) and moves at most ``2 (||r(P) - r||_1 + ||c(P) - c||_1)`` of mass. Padding
    (r = 0 or c = 0) stays exactly 0: its scale factor and its errors are 0. Needs
    ``sum(r) == sum(c)`` per example; an example whose r is all 0 keeps an all-zero plan.
    """
    row = plan.sum(2)
    plan.mul_(r.div(row.clamp_min_(_TINY)).clamp_max_(1.0).unsqueeze(2))
    col = plan.sum(1)
    plan.mul_(c.div(col.clamp_min_(_TINY)).clamp_max_(1.0).unsqueeze(1))
    # both errors are >= 0 in exact arithmetic; the clamp drops float noise so the plan stays >= 0
    err_r = torch.sub(r, plan.sum(2)).clamp_min_(0.0)
    err_c = torch.sub(c, plan.sum(1)).clamp_min_(0.0)
    # normalise err_r (entries in [0, 1]) rather than err_c / ||err_r||, which overflows when
    # ||err_r|| rounds to 0 while err_c holds float noise
    err_r.div_(err_r.sum(1, keepdim=True).clamp_min_(_TINY))
    return plan.baddbmm_(err_r.unsqueeze(2), err_c.unsqueeze(1))


def check_positive(value: float, key: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{who}: {key} must be a positive number, got {value!r}")
    return float(value)


def check_count(value: int, key: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {key} must be an integer >= 1, got {value!r}")
    return value


def check_flag(value: bool, key: str, who: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{who}: {key} must be true or false, got {value!r}")
    return value
