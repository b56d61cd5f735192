"""Exact OT (earth mover's distance) through POT's network simplex, ``ot.emd``, per example.

For evaluation and tests (a Python loop over the batch, fp64 on the CPU): the reference the
iterative solvers are measured against. POT is an optional dependency, imported when the
solver is built. The plan is fp32 on the cost's device and carries no gradient.
"""
from __future__ import annotations

import numpy as np
import torch

from vlframe.ot.base import OTSolver, check_count
from vlframe.registry import OT_SOLVERS

__all__ = ["ExactOT"]


def _import_pot():
    try:
        import ot  # POT (Python Optimal Transport); absolute import, not vlframe.ot
    except ImportError as e:
        raise ImportError("exact OT solver: needs POT (pip install pot), which is not installed") from e
    return ot


@OT_SOLVERS.register_module(name="exact")
class ExactOT(OTSolver):
    """Exact OT via ``ot.emd`` on each example's valid sub-problem (uniform marginals)."""

    name = "exact"

    def __init__(self, max_iterations: int = 100000) -> None:
        self.max_iterations = check_count(max_iterations, "max_iterations", self.name)
        self._pot = _import_pot()

    @torch.no_grad()
    def _solve(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        costs = cost.detach().to("cpu", torch.float64).numpy()
        rows = mask_a.cpu().numpy()
        cols = mask_b.cpu().numpy()
        plan = np.zeros(costs.shape, dtype=np.float64)
        for k in range(costs.shape[0]):
            ia, ib = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
            if ia.size == 0 or ib.size == 0:
                continue  # nothing to transport: zero plan
            sub = np.ascontiguousarray(costs[k][np.ix_(ia, ib)])
            if not np.isfinite(sub).all():
                raise ValueError(f"{self.name}: example {k} has non-finite costs on valid cells")
            a = np.full(ia.size, 1.0 / ia.size)
            b = np.full(ib.size, 1.0 / ib.size)
            plan[k][np.ix_(ia, ib)] = self._pot.emd(a, b, sub, numItermax=self.max_iterations)
        return torch.from_numpy(plan).to(device=cost.device, dtype=torch.float32)
