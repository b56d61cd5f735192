"""Data loaders: a seeded ``DataLoader`` over a batch sampler, and a device prefetcher.

:func:`build_loader` wraps ``torch.utils.data.DataLoader``. Worker randomness (torch, numpy and
``random`` inside each worker) is seeded from ``(seed, epoch, worker_id)``, where ``epoch`` is the
batch sampler's ``epoch`` attribute when it has one (else the number of epochs iterated so far),
so an epoch's worker seeds do not depend on how many epochs ran before - a run resumed in epoch 5
gets the same worker seeds as the original run's epoch 5.

:class:`DevicePrefetcher` moves batches to a device; on CUDA it copies the next batch on a side
stream while the current one is being used.
"""
from __future__ import annotations

import ctypes
import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SeededDataLoader", "build_loader", "DevicePrefetcher", "move_to_device", "seed_worker", "keep_freed_memory"]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from the torch seed the DataLoader gave the
    worker, and keep freed buffers in the worker's heap (:func:`keep_freed_memory`)."""
    seed = torch.initial_seed()  # base_seed + worker_id, set by the DataLoader
    np.random.seed(seed % 2**32)
    random.seed(seed)
    keep_freed_memory()


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc serve allocations up to ``mmap_threshold`` from the heap and keep up to
    ``trim_threshold`` of freed heap, instead of a fresh ``mmap`` per large buffer: a worker copies
    every record's arrays out of LMDB into new buffers of 10-400 KB, and on a fresh mapping each
    4 KB page costs a page fault (measured: 3x the worker's system time). The training and
    evaluation processes call it too (``run_training``, ``evaluate_checkpoint``). Process-wide;
    returns False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


def _mix(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x10AD]).generate_state(1)[0])


class SeededDataLoader(DataLoader):
    """A ``DataLoader`` whose worker seeds are a function of ``(seed, epoch)`` only."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self._iterations = 0

    def __iter__(self):
        epoch = getattr(self.batch_sampler, "epoch", None)
        if epoch is None:
            epoch = self._iterations
        self._iterations += 1
        # The DataLoader draws each iterator's worker base seed from this generator.
        self.generator.manual_seed(_mix(self.seed, int(epoch)))
        return super().__iter__()


def build_loader(
    dataset: Dataset,
    *,
    batch_sampler: Sampler[list[int]] | Iterable[list[int]],
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int = 0,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = 2,
    persistent_workers: bool | None = None,
    seed: int = 0,
) -> SeededDataLoader:
    """A ``DataLoader`` over ``batch_sampler`` (e.g. :class:`~vlframe.data.sampler.TokenBudgetSampler`).

    Args:
        pin_memory: ``None`` = pin when CUDA is available (needed for truly asynchronous copies).
        prefetch_factor: batches each worker loads ahead (ignored when ``num_workers == 0``).
        persistent_workers: ``None`` = False. Persistent workers keep their RNG streams across
            epochs, so worker randomness would then depend on the run's history rather than on
            ``(seed, epoch)``; turn it on when worker start-up time matters more than that.
        seed: base of the worker seeds (see the module docstring).
    """
    if num_workers < 0:
        raise ValueError(f"build_loader: num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = False
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=bool(persistent_workers))
    elif persistent_workers:
        raise ValueError("build_loader: persistent_workers needs num_workers > 0")
    return SeededDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=bool(pin_memory),
        worker_init_fn=seed_worker if num_workers > 0 else None,
        seed=seed,
        **kwargs,
    )


def move_to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move a batch (anything with ``.to``: tensors, :class:`VLBatch`; or dict/list/tuple of them)."""
    if isinstance(x, torch.Tensor) or (dataclasses.is_dataclass(x) and callable(getattr(x, "to", None))):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(move_to_device(v, device, non_blocking) for v in x)
    return x


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


class DevicePrefetcher:
    """Iterate ``loader`` and yield its batches on ``device``.

    On CUDA the copy of batch ``i+1`` is issued on a side stream (``non_blocking``, which is only
    asynchronous from pinned memory) before batch ``i`` is handed out, so it overlaps the compute
    on batch ``i``; the consumer's stream waits for the copy before using a batch. Elsewhere batches
    are moved with a plain ``.to(device)``.
    """

    def __init__(self, loader: Iterable[Any], device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda" and torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if not self.is_cuda:
            for batch in self.loader:
                yield move_to_device(batch, self.device)
            return
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)
        sentinel = object()

        def load_next() -> Any:
            batch = next(it, sentinel)
            if batch is sentinel:
                return sentinel
            with torch.cuda.stream(stream):
                return move_to_device(batch, self.device, non_blocking=True)

        nxt = load_next()
        while nxt is not sentinel:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(stream)
            current = nxt
            for t in _tensors(current):
                if t.is_cuda:
                    # Memory allocated on the side stream is in use on the main stream: tell the
                    # caching allocator, or it may hand it out again while compute still reads it.
                    t.record_stream(main)
            nxt = load_next()
            yield current
