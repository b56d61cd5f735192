"""Accumulating named (sum, count) pairs over a validation pass, reduced across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist


class Average:
    """``update({'acc': (hits, n)})`` many times, then ``compute()`` -> {'acc': sum/count}.

    ``compute`` all-reduces the sums and the counts (never per-rank means) when a process group
    is up, so every rank gets the value of the union of all ranks' data whatever the number of
    batches each saw. Declare every name up front (``names``): then all ranks reduce the same
    vector even when one rank saw no batch.
    """

    def __init__(self, names: tuple[str, ...] | list[str] = ()) -> None:
        self.sums: dict[str, list[float]] = {k: [0.0, 0.0] for k in names}

    def update(self, values: dict[str, tuple[float, float]]) -> None:
        for k, (s, n) in values.items():
            acc = self.sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)

    def compute(self) -> dict[str, float]:
        names = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in names], dtype=torch.float64).view(-1, 2)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            t = t.cpu()
        return {k: float(t[i, 0] / t[i, 1]) if t[i, 1] else float("nan") for i, k in enumerate(names)}
