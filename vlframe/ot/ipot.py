"""IPOT: the inexact proximal point method for optimal transport (Xie et al., UAI 2019).

As in the original UNITER WRA: uniform marginals over the valid entries, ``beta`` the proximal
step, ``iterations`` outer steps of ``T <- diag(s) (exp(-C/beta) * T) diag(d)`` where each outer
step runs ``inner_steps`` Sinkhorn-like updates of the scalings ``d`` (columns) then ``s`` (rows).
The plan is computed under ``torch.inference_mode`` (returned as a normal tensor): it carries no gradient, so the gradient of
``ot_distance(cost, plan)`` reaches the cost only through ``cost`` (d distance / d cost = plan).

IPOT's own plan has exact row marginals, but its column marginals carry the error of the inexact
inner solve: at the defaults (the original's) up to ~1.5e-4 for cosine costs of random 768-d
embeddings and ~2e-3 for low-dimensional ones. With ``round_marginals=True`` (default) the plan is
made exactly feasible, so both marginals hold to float precision and the distance is the cost of
a feasible plan: an upper bound on the exact EMD. Two steps:
  1. the last outer step runs ``_BALANCE_STEPS`` more inner updates (warm-started, on vectors, so
     cheap): this solves the last proximal step (nearly) exactly, i.e. the KL projection of its
     kernel onto the marginals, and shrinks the column error ~100-fold;
  2. :func:`vlframe.ot.base.round_to_marginals` (Altschuler, Weed & Rigollet 2017, Algorithm 2)
     removes the rest exactly.
Step 2 alone would move the golden fixture's distance by 2.9e-4 from the original's (its
rank-one correction spreads the misplaced mass over costly cells too; the change is bounded by
the marginal error it corrects), over the 1e-4 allowed; with step 1 the shift is 7.6e-5 (the
exact projection's own shift is 7.3e-5). ``round_marginals=False`` returns the plain plan of
the original algorithm, whose distances match the original code within 1e-5.

The loop is the hot path of WRA (50 iterations per step), so it works in place on one buffer
(7 small ops per iteration) and keeps the scalings as row vectors: ``[B,1,N] @ [B,N,M]``
batched products are several times faster on CPU than ``[B,N,M] @ [B,M,1]``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vlframe.ot.base import OTSolver, check_count, check_flag, check_positive, round_to_marginals
from vlframe.registry import OT_SOLVERS

__all__ = ["IPOT"]

_TINY = torch.finfo(torch.float32).tiny
# extra inner updates of the last outer step before rounding: the fixture's distance shift is
# 1.1e-4 at 20, 8.7e-5 at 30, 7.6e-5 at 50, 7.3e-5 converged (see the module docstring)
_BALANCE_STEPS = 50
# CPU problems up to this many cells run the loop on one intra-op thread: its ~570 small ops gain
# nothing from more threads, but each batched product wakes the thread pool, and on a loaded
# machine a wake-up costs more than the op (2 threads: the whole WRA path 0.6x -> see bench_ot.py).
_ONE_THREAD_CELLS = 1 << 20


@contextlib.contextmanager
def _loop_threads(cost: torch.Tensor) -> Iterator[None]:
    threads = torch.get_num_threads()
    if cost.device.type != "cpu" or threads == 1 or cost.numel() > _ONE_THREAD_CELLS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@OT_SOLVERS.register_module(name="ipot")
class IPOT(OTSolver):
    """IPOT solver; ``plan = IPOT(beta=0.5, iterations=50, inner_steps=1)(cost, mask_a, mask_b)``.

    Returns an fp32 plan without gradient. ``round_marginals=True`` makes the plan exactly feasible
    (both marginals uniform over the valid entries), so its distance is a true transport cost;
    ``False`` keeps IPOT's raw plan, as the original UNITER code (see the module docstring).
    """

    name = "ipot"

    def __init__(
        self, beta: float = 0.5, iterations: int = 50, inner_steps: int = 1, round_marginals: bool = True
    ) -> None:
        self.beta = check_positive(beta, "beta", self.name)
        self.iterations = check_count(iterations, "iterations", self.name)
        self.inner_steps = check_count(inner_steps, "inner_steps", self.name)
        self.round_marginals = check_flag(round_marginals, "round_marginals", self.name)

    def _solve(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        # inference mode, not just no_grad: the ~650 small ops skip the autograd and version-counter
        # dispatch (~15% of the solver's time on the CPU); the plan leaves it as a normal tensor,
        # since ot_distance saves it for backward
        with _loop_threads(cost), torch.inference_mode():
            plan = self._ipot(cost, mask_a, mask_b)
        return plan.clone()

    def _ipot(self, cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
        b, n, m = cost.shape
        f32 = torch.float32
        joint = mask_a.unsqueeze(2) & mask_b.unsqueeze(1)
        # Kernel exp(-C/beta), 0 on padded cells, so padding never influences the valid part.
        # exp(-C/beta) must stay representable: beta >= ~0.05 for costs in [0, 2] (default 0.5
        # gives kernel >= exp(-4)); use the log-domain Sinkhorn for small temperatures.
        kernel = cost.detach().to(f32).div(-self.beta).exp_().masked_fill_(~joint, 0.0)
        # Uniform marginals 1/n_valid and 1/m_valid. They must be these consistent totals, not
        # e.g. unit rows: the warm-started scalings would otherwise drift by n/m per iteration.
        inv_n = 1.0 / mask_a.sum(1).clamp_min(1).to(f32).view(b, 1, 1)
        inv_m = 1.0 / mask_b.sum(1).clamp_min(1).to(f32).view(b, 1, 1)
        # 1 on padding keeps x/0 finite (those scalings only ever multiply 0 cells);
        # TINY on valid entries changes nothing unless a column underflows, then it avoids inf*0.
        pad_a = torch.where(mask_a, _TINY, 1.0).to(f32).view(b, 1, n)
        pad_b = torch.where(mask_b, _TINY, 1.0).to(f32).view(b, 1, m)

        plan = joint.to(f32)  # T_0 = 1 on valid cells; its scale is irrelevant
        plan_t = plan.transpose(1, 2)
        s = mask_a.to(f32).view(b, 1, n).mul_(inv_n)  # row scaling, 0 on padding
        s_col = s.view(b, n, 1)
        d = torch.empty(b, 1, m, dtype=f32, device=cost.device)  # column scaling
        last = self.iterations - 1
        for it in range(self.iterations):
            plan.mul_(kernel)  # Q = exp(-C/beta) * T
            steps = self.inner_steps + (_BALANCE_STEPS if self.round_marginals and it == last else 0)
            for _ in range(steps):
                torch.div(inv_m, torch.baddbmm(pad_b, s, plan, out=d), out=d)  # d = (1/m) / (Q^T s)
                torch.div(inv_n, torch.baddbmm(pad_a, d, plan_t, out=s), out=s)  # s = (1/n) / (Q d)
            plan.mul_(s_col).mul_(d)  # T = diag(s) Q diag(d): rows sum to exactly 1/n_valid
        if self.round_marginals:
            r = mask_a.to(f32).mul_(inv_n.view(b, 1))
            c = mask_b.to(f32).mul_(inv_m.view(b, 1))
            round_to_marginals(plan, r, c)
        return plan
