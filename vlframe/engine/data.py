"""Per-task batch streams: a token-budget sampler, a loader whose workers run the task's
``collate`` (masking, negatives), and an exact position for resuming mid-epoch."""
from __future__ import annotations

import contextlib
import zlib
from typing import Any

import torch
from torch.utils.data import Dataset

from vlframe.data.batch import SharedBatchPool, VLBatch, collate_keeps_fp16
from vlframe.engine import distributed as D
from vlframe.registry import SAMPLERS, build


def batch_seed(base: int, epoch: int, indices: list[int]) -> int:
    """A seed that depends only on the run seed, the epoch and the batch's content, so masking
    and negatives are the same whatever the number of workers, and after a resume."""
    key = f"{base}:{epoch}:" + ",".join(map(str, indices[:64])) + f":{len(indices)}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


class _SeededBatches:
    """Wraps a batch sampler to yield one-element lists ``[(seed, indices)]``: the loader then
    asks ``TaskBatches`` for the whole batch at once (see :func:`_only`)."""

    def __init__(self, batch_sampler: Any, base_seed: int):
        self.batch_sampler = batch_sampler
        self.base_seed = base_seed

    @property
    def epoch(self) -> int:  # the loader seeds its workers from it
        return getattr(self.batch_sampler, "epoch", 0)

    def __iter__(self):
        epoch = self.epoch
        for indices in self.batch_sampler:
            yield [(batch_seed(self.base_seed, epoch, list(indices)), list(indices))]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def _only(items: list) -> Any:
    return items[0]


class TaskBatches(Dataset):
    """``dataset[(seed, indices)]`` -> the task's collated batch of those examples.

    With ``num_workers`` > 0 the workers build their batches in reused shared-memory blocks
    (:class:`~vlframe.data.batch.SharedBatchPool`; ``prefetch_factor`` + 2 per worker: the
    batches queued, the one being moved and one spare), handed back by ``VLBatch.to``."""

    def __init__(self, dataset: Any, task: Any, *, num_workers: int = 0, prefetch_factor: int = 2):
        self.dataset = dataset
        self.task = task
        self.pool = SharedBatchPool(num_workers, prefetch_factor + 2) if num_workers > 0 else None

    def __getitem__(self, key: tuple[int, list[int]]):
        seed, indices = key
        g = torch.Generator().manual_seed(seed)
        # Batches leave the worker in fp16 (half the bytes to move); VLBatch.to(device) makes them
        # float32 on the device.
        with collate_keeps_fp16(), (self.pool.lease() if self.pool is not None else contextlib.nullcontext()) as lease:
            batch = self.task.collate([self.dataset[i] for i in indices], generator=g, dataset=self.dataset)
        if lease is not None and isinstance(batch, VLBatch):
            batch.lease = lease
        # Anything else keeps its block: nothing tells when it is no longer read.
        return batch

    def __len__(self) -> int:
        return len(self.dataset)


class TaskStream:
    """An endless stream of one task's batches; ``state_dict`` records the exact position.

    Under DDP the sampler deals this rank its share of the epoch's batches (all ranks use the same
    ``seed``, so they cut the same global plan). ``even_ranks`` (training) gives every rank the
    same number of batches; ``False`` (validation) sees every batch exactly once."""

    def __init__(
        self,
        *,
        dataset: Any,
        task: Any,
        sampler_cfg: dict,
        seed: int,
        shuffle: bool,
        num_workers: int,
        pin_memory: bool | None,
        device: torch.device | str = "cpu",
        where: str = "data.sampler",
        even_ranks: bool = True,
        real_units: bool = False,
    ):
        from vlframe.data.loader import DevicePrefetcher, build_loader

        if real_units and sampler_cfg.get("type") == "token_budget":
            # A packed encoder runs no padding: the budget counts real units (unless set).
            sampler_cfg = {"cost": "real", **sampler_cfg}

        self.sampler = build(
            sampler_cfg,
            SAMPLERS,
            where=where,
            # Cost = examples x longest (text + regions): UNITER packs both into one sequence,
            # so that is the size the encoder runs on.
            lengths=dataset.lengths(),
            seed=seed,
            shuffle=shuffle,
            num_replicas=D.world_size(),
            rank=D.rank(),
            even_ranks=even_ranks,
        )
        self.loader = build_loader(
            TaskBatches(dataset, task, num_workers=num_workers),
            batch_sampler=_SeededBatches(self.sampler, seed),
            collate_fn=_only,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        # On CUDA the next batch is copied on a side stream while the current one trains.
        self.batches = DevicePrefetcher(self.loader, device)
        self.epoch = 0
        self.consumed = 0  # batches of this epoch handed to the trainer
        self._it = None

    def __len__(self) -> int:
        return len(self.sampler)

    def next(self):
        if self._it is None:
            self.sampler.set_epoch(self.epoch)
            self._it = iter(self.batches)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.consumed = 0
            self.sampler.set_epoch(self.epoch)
            self._it = iter(self.batches)
            batch = next(self._it)
        self.consumed += 1
        return batch

    def epoch_batches(self):
        """One full pass in sampler order (validation)."""
        self.sampler.set_epoch(0)
        yield from self.batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.sampler.set_epoch(self.epoch)
        self.sampler.load_state_dict({"epoch": self.epoch, "batches_done": self.consumed, "seed": self.sampler.seed})
        self._it = iter(self.batches)  # the sampler skips the consumed batches
