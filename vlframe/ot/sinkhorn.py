"""Entropic OT by Sinkhorn iterations in the log domain (finite down to epsilon = 1e-3).

Solves ``min <C, T> - epsilon * H(T)`` with uniform marginals over the valid entries, by
alternating the dual potential updates (in units of epsilon)

    f_i = log a_i - logsumexp_j(g_j - C_ij / epsilon)
    g_j = log b_j - logsumexp_i(f_i - C_ij / epsilon)

and returns ``T_ij = exp(f_i + g_j - C_ij / epsilon)``. Padding needs no mask inside the loop:
padded entries get log-marginal -inf, so their potentials are -inf and their cells carry exactly
0 mass (and no NaN, also in the backward pass). The column (second) marginals are exact after the
last update; the row marginals hold to the convergence reached.

Gradient: with ``detach_plan=True`` (default, IPOT's semantics) the plan is computed under
``torch.no_grad`` and ``ot_distance`` differentiates through the cost only. With
``detach_plan=False`` autograd differentiates through the unrolled iterations as well
(memory grows with ``iterations``).

``iterations`` (default 100) is the cap. With ``tol`` set, the loop also stops once the row
marginals are within ``tol``, checked every ``check_every`` iterations on the plan before the last
column update (the columns are then exact and the rows move by a fraction of ``tol``). Each
check synchronises with the device, so training usually keeps ``tol=None`` and a fixed count.
Measured row-marginal error on cosine costs (B=32, N=20, M=36): at epsilon 0.1, 5e-8 after 50
iterations; at 0.05, 8e-7 after 100; at 0.01, 4e-7 (D=768) to 6e-3 (D=16) after 100. Small
epsilons need thousands of iterations, or a ``tol``.
"""
from __future__ import annotations

import contextlib
import math

import torch

from vlframe.ot.base import OTSolver, check_count, check_positive
from vlframe.registry import OT_SOLVERS

__all__ = ["Sinkhorn"]


@OT_SOLVERS.register_module(name="sinkhorn")
class Sinkhorn(OTSolver):
    """Log-domain Sinkhorn; ``Sinkhorn(epsilon=0.1, iterations=100)(cost, mask_a, mask_b)`` -> fp32 plan."""

    name = "sinkhorn"

    def __init__(
        self,
        epsilon: float = 0.1,
        iterations: int = 100,
        tol: float | None = None,
        check_every: int = 10,
        detach_plan: bool = True,
    ) -> None:
        self.epsilon = check_positive(epsilon, "epsilon", self.name)
        self.iterations = check_count(iterations, "iterations", self.name)
        self.tol = None if tol is None else check_positive(tol, "tol", self.name)
        self.check_every = check_count(check_every, "check_every", self.name)
        if not isinstance(detach_plan, bool):
            raise ValueError(f"{self.name}: detach_plan must be true or false, got {detach_plan!r}")
        self.detach_plan = detach_plan
        self.last_iterations = 0  # iterations the last call ran (useful with tol)

    def _solve(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        grad_ctx = torch.no_grad() if self.detach_plan else contextlib.nullcontext()
        with grad_ctx:
            return self._plan(cost.detach() if self.detach_plan else cost, mask_a, mask_b)

    def _plan(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        f32 = torch.float32
        joint = mask_a.unsqueeze(2) & mask_b.unsqueeze(1)
        # An example with no valid entry on a side is solved as if all its entries were valid
        # (a finite problem) and zeroed at the end, so it cannot produce NaN.
        solve_a = mask_a | ~mask_a.any(1, keepdim=True)
        solve_b = mask_b | ~mask_b.any(1, keepdim=True)
        log_a = self._log_marginal(solve_a).unsqueeze(2)  # [B, N, 1]
        log_b = self._log_marginal(solve_b).unsqueeze(1)  # [B, 1, M]

        # -C/epsilon with padded cells 0 (finite): the -inf potentials of padded entries mask them.
        logk = cost.to(f32).masked_fill(~joint, 0.0) / -self.epsilon
        f = torch.zeros_like(log_a)
        g = log_b.clone()  # 0-mass start on padded columns; the constant shift is irrelevant
        self.last_iterations = self.iterations
        for it in range(self.iterations):
            f_new = log_a - torch.logsumexp(logk + g, dim=2, keepdim=True)
            done = False
            if self.tol is not None and it > 0 and (it % self.check_every == 0 or it == self.iterations - 1):
                with torch.no_grad():
                    # rows of the current plan (f, g) sum to a_i * exp(f_i - f_new_i)
                    err = torch.where(solve_a.unsqueeze(2), log_a.exp() * (f - f_new).expm1().abs(), 0.0)
                    done = bool(err.amax() <= self.tol)
            f = f_new
            if done:
                self.last_iterations = it + 1
                break
            if it < self.iterations - 1:
                g = log_b - torch.logsumexp(logk + f, dim=1, keepdim=True)
        # The last column update, written as b_j * softmax_i(...) = exp(f_i + g_j - C_ij/eps): the
        # normalisation makes the columns exact in fp32 even at small epsilon, where the
        # potentials are ~1/epsilon and exp(f + g - C/eps) would carry their rounding.
        plan = torch.softmax(logk + f, dim=1) * log_b.exp()
        return plan * joint

    @staticmethod
    def _log_marginal(mask: torch.Tensor) -> torch.Tensor:
        """[B, K] -> log(1/n_valid) on valid entries, -inf on padding."""
        count = mask.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
        return torch.where(mask, -torch.log(count), -math.inf)
