"""Token-budget batch sampling: batches formed by padded input units, not by example count.

:class:`TokenBudgetSampler` is a batch sampler (it yields lists of dataset indices). Per epoch it
permutes the examples with a generator seeded by ``(seed, epoch)``, cuts the permutation into
buckets, sorts each bucket by length, greedily fills batches up to the budget of PADDED units and
shuffles the batch order. It is deterministic from ``(seed, epoch)``, deals batches to DDP ranks
and resumes mid-epoch from ``state_dict()``.

Padded cost of a batch of ``b`` examples:

* ``lengths`` only (default): ``b * max(lengths)``. This is the memory of the joint
  ``[text, regions, padding]`` sequence a packed single-stream encoder (UNITER) runs on, which
  dominates activation memory.
* ``text_lengths`` and ``region_lengths``: ``b * max_text + b * max_regions``, the exact size of
  the separately padded text and region tensors of a collated batch. Buckets are then sorted in two
  levels (by regions into slabs, by text inside each slab) so that both maxima stay tight.
* ``cost="real"``: ``sum(lengths)``, the real units only, for an encoder that runs packed with no
  padding (``TransformerEncoder`` with its varlen path active; the trainer then sets it).

(The original UNITER sampler's simulation, for comparison, is in ``benchmarks/original_sampler.py``.)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from vlframe.registry import SAMPLERS

__all__ = ["TokenBudgetSampler", "padded_cost"]


def _as_lengths(values: Sequence[int] | np.ndarray, key: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"TokenBudgetSampler: {key} must be a 1-d sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"TokenBudgetSampler: {key} must hold integers")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        bad = int(np.argmin(arr))
        raise ValueError(f"TokenBudgetSampler: {key}[{bad}] = {arr[bad]} is negative")
    return arr


def padded_cost(
    batch: Sequence[int],
    lengths: np.ndarray | None = None,
    text_lengths: np.ndarray | None = None,
    region_lengths: np.ndarray | None = None,
) -> int:
    """Padded units of ``batch`` under the sampler's cost model (see the module docstring)."""
    idx = np.asarray(batch, dtype=np.int64)
    if text_lengths is not None and region_lengths is not None:
        return int(len(idx) * (text_lengths[idx].max() + region_lengths[idx].max()))
    if lengths is None:
        raise ValueError("padded_cost: give lengths, or text_lengths and region_lengths")
    return int(len(idx) * lengths[idx].max())


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes both numbers well; consecutive (seed, epoch) pairs give unrelated streams.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


@SAMPLERS.register_module(name="token_budget")
class TokenBudgetSampler(Sampler[list[int]]):
    """Batches of dataset indices whose padded cost stays within ``budget`` units.

    Args:
        lengths: input units per example (text tokens incl. [CLS]/[SEP] + regions). May be omitted
            when both ``text_lengths`` and ``region_lengths`` are given (it is then their sum).
        budget: the most padded units per batch (see the module docstring for the cost model).
        text_lengths, region_lengths: the two parts of ``lengths``; when given, the padded cost is
            ``b * max_text + b * max_regions``.
        bucket_size: examples sorted together. Larger buckets pad less but mix lengths less
            randomly; ~100 average batches is a good value (8192 in the original UNITER).
        shuffle: permute examples and batch order each epoch. Without it buckets follow the
            dataset order and batches keep their sorted order (still deterministic).
        seed: base seed; each epoch draws from a generator seeded by ``(seed, epoch)``. Under DDP
            every rank must pass the same seed: all ranks compute the same global plan and each
            takes its share of it.
        drop_last: with several replicas, drop the trailing batches that do not divide evenly
            among ranks instead of padding the last round by wrapping around to the first batches.
            With one replica every batch is kept either way.
        even_ranks: with several replicas, give every rank the same number of batches (by
            ``drop_last`` or by the wrap-around), as DDP training needs: every rank runs the same
            steps. ``False`` (evaluation): every batch exactly once, so the first
            ``len % num_replicas`` ranks get one batch more (not with ``drop_last``).
        num_replicas, rank: DDP world size and rank (default: from ``torch.distributed`` when it
            is initialised, else 1 and 0).
        max_batch_examples: optional cap on examples per batch.
        cost: "padded" (default: the padded cost above) or "real" (the sum of the examples'
            units, for a packed encoder that runs no padding).

    An example whose cost alone exceeds the budget gets a batch of its own (counted in
    ``num_oversized`` and warned about at construction), so nothing is ever dropped silently.

    Resuming: the sampler counts the batches it has yielded in the current epoch.
    ``state_dict()`` returns ``{'epoch', 'batches_done', 'seed'}``; after ``load_state_dict`` the
    next ``__iter__`` skips the first ``batches_done`` batches of that epoch. A ``DataLoader``
    with workers (and a device prefetcher) pulls batches ahead of the training step, so a trainer
    should pass the number of batches it has really consumed: ``state_dict(batches_done=n)``.
    """

    def __init__(
        self,
        *,
        lengths: Sequence[int] | np.ndarray | None = None,
        budget: int,
        text_lengths: Sequence[int] | np.ndarray | None = None,
        region_lengths: Sequence[int] | np.ndarray | None = None,
        bucket_size: int = 8192,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even_ranks: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        max_batch_examples: int | None = None,
        cost: str = "padded",
    ) -> None:
        if cost not in ("padded", "real"):
            raise ValueError(f"TokenBudgetSampler: cost must be 'padded' or 'real', got {cost!r}")
        self.cost = cost
        if (text_lengths is None) != (region_lengths is None):
            raise ValueError("TokenBudgetSampler: give both text_lengths and region_lengths, or neither")
        self.text_lengths = self.region_lengths = None
        if text_lengths is not None:
            self.text_lengths = _as_lengths(text_lengths, "text_lengths")
            self.region_lengths = _as_lengths(region_lengths, "region_lengths")
            if len(self.text_lengths) != len(self.region_lengths):
                raise ValueError(
                    f"TokenBudgetSampler: text_lengths has {len(self.text_lengths)} entries but "
                    f"region_lengths has {len(self.region_lengths)}"
                )
            total = self.text_lengths + self.region_lengths
            if lengths is not None:
                given = _as_lengths(lengths, "lengths")
                if given.shape != total.shape or not np.array_equal(given, total):
                    bad = int(np.argmax(given != total)) if given.shape == total.shape else None
                    where = f" (first mismatch at index {bad})" if bad is not None else ""
                    raise ValueError(
                        f"TokenBudgetSampler: lengths must equal text_lengths + region_lengths{where}"
                    )
            self.lengths = total
        elif lengths is None:
            raise ValueError("TokenBudgetSampler: lengths is required (or text_lengths and region_lengths)")
        else:
            self.lengths = _as_lengths(lengths, "lengths")
        if len(self.lengths) == 0:
            raise ValueError("TokenBudgetSampler: lengths is empty")
        if int(budget) <= 0:
            raise ValueError(f"TokenBudgetSampler: budget must be a positive int, got {budget!r}")
        if int(bucket_size) <= 0:
            raise ValueError(f"TokenBudgetSampler: bucket_size must be a positive int, got {bucket_size!r}")
        if max_batch_examples is not None and int(max_batch_examples) <= 0:
            raise ValueError(f"TokenBudgetSampler: max_batch_examples must be positive, got {max_batch_examples!r}")
        self.budget = int(budget)
        self.bucket_size = int(bucket_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.even_ranks = bool(even_ranks)
        if self.drop_last and not self.even_ranks:
            raise ValueError("TokenBudgetSampler: drop_last evens the ranks out; it contradicts even_ranks=False")
        self.max_batch_examples = None if max_batch_examples is None else int(max_batch_examples)

        if num_replicas is None or rank is None:
            dist_ok = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if dist_ok else 1
            if rank is None:
                rank = torch.distributed.get_rank() if dist_ok else 0
        if int(num_replicas) < 1 or not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"TokenBudgetSampler: invalid rank {rank} for num_replicas {num_replicas}")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)

        # Per-example cost when alone in a batch; over-budget ones get a batch of their own.
        alone = self.lengths if self.text_lengths is None else self.text_lengths + self.region_lengths
        oversized = np.flatnonzero(alone > self.budget)
        self.num_oversized = int(len(oversized))
        if self.num_oversized:
            first = ", ".join(str(int(i)) for i in oversized[:5])
            warnings.warn(
                f"TokenBudgetSampler: {self.num_oversized} example(s) cost more than the budget of "
                f"{self.budget} units on their own (indices {first}{', ...' if self.num_oversized > 5 else ''}); "
                "each gets a batch of its own",
                stacklevel=2,
            )
        # No batch can hold more examples than budget // shortest example (at least one).
        shortest = max(int(alone.min()), 1)
        self._window = max(self.budget // shortest, 1)
        if self.max_batch_examples is not None:
            self._window = min(self._window, self.max_batch_examples)

        self.epoch = 0
        self._batches_done = 0  # yielded in the current epoch by this rank
        self._resume_skip = 0  # pending skip set by load_state_dict, used by the next __iter__
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    # ---- epoch plan -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            # A pending resume belongs to the epoch it was saved in only.
            self._resume_skip = 0
            self._batches_done = 0
        self.epoch = epoch

    def _order_bucket(self, bucket: np.ndarray) -> np.ndarray:
        if self.text_lengths is None:
            return bucket[np.argsort(self.lengths[bucket], kind="stable")]
        text, regions = self.text_lengths[bucket], self.region_lengths[bucket]
        # Two-level sort: slabs by region count, text sorted inside each slab. The slab count
        # balances the two kinds of padding (region spread / g vs. text spread * g / batches).
        est_batches = max(1.0, float(self.lengths[bucket].sum()) / self.budget)
        sd_t, sd_r = float(text.std()), float(regions.std())
        g = est_batches if sd_t == 0 else math.sqrt(est_batches * sd_r / sd_t)
        g = int(min(max(round(g), 1), len(bucket)))
        by_region = bucket[np.argsort(regions, kind="stable")]
        slabs = np.array_split(by_region, g)
        out = []
        for j, slab in enumerate(slabs):
            s = slab[np.argsort(self.text_lengths[slab], kind="stable")]
            # Alternate text direction so neighbouring slabs meet at similar text lengths.
            out.append(s if j % 2 == 0 else s[::-1])
        return np.concatenate(out)

    def _fill(self, order: np.ndarray, out: list[list[int]]) -> None:
        """Greedily cut ``order`` into batches within the budget (running max reset per batch)."""
        n, s = len(order), 0
        parts = self.text_lengths is not None
        while s < n:
            window = order[s : s + self._window]
            counts = np.arange(1, len(window) + 1, dtype=np.int64)
            if self.cost == "real":
                cost = np.cumsum(self.lengths[window])
            elif parts:
                cost = counts * (
                    np.maximum.accumulate(self.text_lengths[window])
                    + np.maximum.accumulate(self.region_lengths[window])
                )
            else:
                cost = counts * np.maximum.accumulate(self.lengths[window])
            # cost is non-decreasing in the batch size, so the fitting prefix is found by bisection.
            k = int(np.searchsorted(cost, self.budget, side="right"))
            k = max(k, 1)  # an over-long example alone
            out.append(window[:k].tolist())
            s += k

    def _global_batches(self, epoch: int) -> list[list[int]]:
        key = (self.seed, epoch)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
        n = len(self.lengths)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.bucket_size):
            self._fill(self._order_bucket(perm[start : start + self.bucket_size]), batches)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (key, batches)
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        batches = self._global_batches(epoch)
        r = self.num_replicas
        if r > 1 and self.even_ranks:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % r]
                if not batches:
                    raise ValueError(
                        f"TokenBudgetSampler: drop_last with {r} replicas leaves no batch "
                        f"({len(self._global_batches(epoch))} batches in the epoch)"
                    )
            elif len(batches) % r:
                # Wrap around: the last round is completed with the epoch's first batches, so every
                # rank runs the same number of steps (DDP would hang otherwise).
                pad = r - len(batches) % r
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
        return batches[self.rank :: r]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of this rank for ``epoch`` (default: the current one), without skipping."""
        return [list(b) for b in self._rank_batches(self.epoch if epoch is None else int(epoch))]

    def __len__(self) -> int:
        """Batches per rank in the current epoch (a resumed epoch yields ``len - batches_done``)."""
        return len(self._rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches(self.epoch)
        skip = min(self._resume_skip, len(batches))
        self._resume_skip = 0
        self._batches_done = skip
        for batch in batches[skip:]:
            # Count before yielding: a state_dict taken after receiving k batches says k.
            self._batches_done += 1
            yield list(batch)

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """Position in the epoch; ``batches_done`` overrides the yielded count (see class doc)."""
        done = self._batches_done if batches_done is None else int(batches_done)
        return {"epoch": int(self.epoch), "batches_done": done, "seed": int(self.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "batches_done", "seed"} - set(state)
        if missing:
            raise KeyError(f"TokenBudgetSampler.load_state_dict: missing key(s) {sorted(missing)}")
        done = int(state["batches_done"])
        if done < 0:
            raise ValueError(f"TokenBudgetSampler.load_state_dict: batches_done = {done} is negative")
        # The saved seed wins: a resumed run must replay the same epoch plan.
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._resume_skip = done
        self._batches_done = done

    def stats(self, epoch: int | None = None) -> dict[str, float]:
        """Budget use and padding of this rank's batches in ``epoch`` (for logs and benchmarks)."""
        batches = self._rank_batches(self.epoch if epoch is None else int(epoch))
        real = sum(int(self.lengths[b].sum()) for b in batches)
        padded = sum(padded_cost(b, self.lengths, self.text_lengths, self.region_lengths) for b in batches)
        return {
            "batches": float(len(batches)),
            "budget_use": real / (len(batches) * self.budget),
            "padding_ratio": 1.0 - real / padded,
            "mean_batch_examples": sum(len(b) for b in batches) / len(batches),
        }
