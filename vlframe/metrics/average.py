"""Accumulating named (sum, count) pairs over a validation pass, across ranks."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from vlframe.registry import METRICS


@METRICS.register_module(name="average")
class Average:
    """``update({'acc': (hits, n)})`` many times, then ``compute()`` -> {'acc': sum/count}.
    ``compute`` all-reduces the sums when a process group is up, so every rank gets the global value."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def update(self, values: dict[str, tuple[float, float]]) -> None:
        for k, (s, n) in values.items():
            self.sums[k][0] += float(s)
            self.sums[k][1] += float(n)

    def compute(self) -> dict[str, float]:
        names = sorted(self.sums)
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([self.sums[k] for k in names], dtype=torch.float64).view(-1, 2)
            dist.all_reduce(t)
            return {k: float(t[i, 0] / t[i, 1]) if t[i, 1] else float("nan") for i, k in enumerate(names)}
        return {k: self.sums[k][0] / self.sums[k][1] if self.sums[k][1] else float("nan") for k in names}
