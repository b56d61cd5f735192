#!/usr/bin/env python
"""Sinkhorn's row-marginal error and time per call on WRA-like cosine costs (B=32, N=20, M=36):
the fixed 100 iterations of the earlier default (``tol=None``) against the default, which checks
its rows and raises its own budget until they are within ``tol`` (1e-4). The row mass is 1/20."""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.ot import Sinkhorn, cosine_cost  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    print(f"{'D':>4s} {'epsilon':>8s} | {'fixed 100: row err':>18s} {'ms':>7s} | {'default: row err':>16s} {'iters':>6s} {'ms':>7s}")
    for d in (16, 768):
        x, y = torch.randn(32, 20, d), torch.randn(32, 36, d)
        cost = cosine_cost(x, y)
        for eps in (0.1, 0.01, 1e-3):
            row = []
            for solver in (Sinkhorn(epsilon=eps, tol=None), Sinkhorn(epsilon=eps)):
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    plan = solver(cost)
                    times.append((time.perf_counter() - t0) * 1e3)
                err = float((plan.sum(2) - 1 / 20).abs().max())
                row.append((err, solver.last_iterations, statistics.median(times)))
            (e0, _, t0), (e1, n1, t1) = row
            print(f"{d:4d} {eps:8g} | {e0:18.2e} {t0:7.1f} | {e1:16.2e} {n1:6d} {t1:7.1f}")


if __name__ == "__main__":
    main()
