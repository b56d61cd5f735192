"""A simulation of the ORIGINAL UNITER token sampler, bug included, to compare ours against
(``bench_data.py``, ``tests/test_sampler.py``). Not library code: never used for training."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def original_uniter_batches(
    lengths: Sequence[int] | np.ndarray,
    budget: int,
    seed: int,
    *,
    bucket_size: int = 8192,
    group: int = 8,
) -> list[list[int]]:
    """Simulate the ORIGINAL UNITER token sampler, for benchmark comparison only.

    Buckets of ``bucket_size`` shuffled examples are sorted longest first; examples join the batch
    in groups of ``group``; a batch is closed when ``running_max * (size + group)`` would exceed the
    budget. The running max is never reset (the original's bug), so once the longest example of the
    data has been seen every batch is sized for it. Do not use for training.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lens))
    batches: list[list[int]] = []
    running_max = 0  # the bug: initialised once, never reset per batch
    for start in range(0, len(perm), bucket_size):
        bucket = perm[start : start + bucket_size]
        bucket = bucket[np.argsort(-lens[bucket], kind="stable")]
        current: list[int] = []
        for g in range(0, len(bucket), group):
            chunk = bucket[g : g + group]
            running_max = max(running_max, int(lens[chunk].max()))
            if running_max * (len(current) + group) > budget:
                if not current:
                    raise ValueError(f"original_uniter_batches: budget {budget} cannot hold {group} examples")
                batches.append(current)
                current = chunk.tolist()
            else:
                current.extend(chunk.tolist())
        if current:
            batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]
