"""build_loader and DevicePrefetcher over real Examples, the real collate and the token sampler."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from vlframe.data.batch import Example, VLBatch, collate
from vlframe.data.loader import DevicePrefetcher, build_loader, move_to_device
from vlframe.data.sampler import TokenBudgetSampler


class TinyVL(Dataset):
    """Deterministic in-memory examples of varying text and region counts."""

    def __init__(self, n: int = 40, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            t = 3 + i % 7
            k = 2 + (i * 5) % 9
            ids = torch.randint(1000, 2000, (t,), generator=g)
            ids[0], ids[-1] = 101, 102
            self.items.append(
                Example(
                    txt_id=f"t{i}",
                    img_id=f"i{i}",
                    input_ids=ids,
                    img_feat=torch.randn(k, dim, generator=g).half(),
                    img_pos=torch.rand(k, 7, generator=g),
                    soft_labels=torch.softmax(torch.randn(k, 5, generator=g), -1),
                )
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.items[i]


class NoisyDataset(Dataset):
    """Returns draws from the worker's RNGs (torch, numpy) to check worker seeding."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(torch.rand(())), float(np.random.rand())])


def stack(xs):
    return torch.stack(xs)


def assert_batches_equal(a: VLBatch, b: VLBatch) -> None:
    for f in dataclasses.fields(VLBatch):
        if not f.compare:  # the shared-memory lease: where the bytes are, not what they are
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y.to(x.device)), f.name
        else:
            assert x == y, f.name


def sampler_for(ds: TinyVL, **kw) -> TokenBudgetSampler:
    return TokenBudgetSampler(lengths=[e.num_units for e in ds.items], budget=60, bucket_size=16, seed=1, **kw)


def test_workers_produce_the_same_batches():
    ds = TinyVL()
    out = {}
    for workers in (0, 2):
        loader = build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate, num_workers=workers, seed=0)
        out[workers] = list(loader)
    assert len(out[0]) == len(out[2]) == len(sampler_for(ds))
    for a, b in zip(out[0], out[2]):
        assert_batches_equal(a, b)
    # And they are exactly the sampler's batches, collated.
    for idx, batch in zip(sampler_for(ds), out[0]):
        assert_batches_equal(batch, collate([ds[i] for i in idx]))
        assert batch.num_units <= 60 or batch.size == 1
    assert sorted(i for b in out[0] for i in b.txt_ids) == sorted(e.txt_id for e in ds.items)


def test_loader_follows_sampler_epochs_and_resume():
    ds = TinyVL()
    s = sampler_for(ds)
    loader = build_loader(ds, batch_sampler=s, collate_fn=collate)
    s.set_epoch(2)
    e2 = [b.txt_ids for b in loader]
    it = iter(loader)
    first = [next(it).txt_ids for _ in range(3)]
    state = s.state_dict()
    assert first == e2[:3] and state["batches_done"] == 3
    s2 = sampler_for(ds)
    s2.load_state_dict(state)
    assert [b.txt_ids for b in build_loader(ds, batch_sampler=s2, collate_fn=collate)] == e2[3:]


def test_worker_seeding_is_a_function_of_seed_and_epoch():
    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]

    class Epochs(list):
        epoch = 0

    def run(seed, epoch, warmup_epochs=()):
        sampler = Epochs(batches)
        loader = build_loader(NoisyDataset(), batch_sampler=sampler, collate_fn=stack, num_workers=2, seed=seed)
        for e in warmup_epochs:
            sampler.epoch = e
            list(loader)
        sampler.epoch = epoch
        return torch.cat(list(loader))

    a = run(0, 1)
    assert torch.equal(a, run(0, 1, warmup_epochs=(0,)))  # no dependence on earlier epochs
    assert not torch.equal(a, run(0, 2))
    assert not torch.equal(a, run(1, 1))
    # numpy and torch are seeded per worker: draws differ across workers and batches.
    assert len(set(a[:, 0].tolist())) == 8 and len(set(a[:, 1].tolist())) == 8


def test_build_loader_options():
    ds = TinyVL(8)
    loader = build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate)
    assert loader.pin_memory == torch.cuda.is_available()
    loader = build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate, num_workers=1,
                          prefetch_factor=3, persistent_workers=True)
    assert loader.prefetch_factor == 3 and loader.persistent_workers
    with pytest.raises(ValueError, match="persistent_workers needs num_workers"):
        build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate, persistent_workers=True)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate, num_workers=-1)


def test_device_prefetcher_cpu():
    ds = TinyVL()
    loader = build_loader(ds, batch_sampler=sampler_for(ds), collate_fn=collate)
    pre = DevicePrefetcher(loader, "cpu")
    assert len(pre) == len(loader)
    got = list(pre)
    assert len(got) == len(loader)
    for a, b in zip(got, loader):
        assert_batches_equal(a, b)
        assert a.input_ids.device.type == "cpu"


def test_move_to_device_containers():
    x = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": (torch.ones(1),), "d": "s"}
    y = move_to_device(x, torch.device("cpu"))
    assert torch.equal(y["a"], x["a"]) and y["b"][1] == 3 and isinstance(y["c"], tuple) and y["d"] == "s"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefetcher_cuda():
    ds = TinyVL()
    sampler = sampler_for(ds)
    loader = build_loader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    assert loader.pin_memory
    cpu = list(build_loader(ds, batch_sampler=sampler, collate_fn=collate))
    got = []
    for batch in DevicePrefetcher(loader, "cuda"):
        assert batch.img_feat.is_cuda and batch.input_ids.is_cuda
        # Use the batch on the main stream while the next copy runs on the side stream.
        got.append(batch.img_feat.sum().item())
        batch.img_feat.mul_(0)  # a consumer may overwrite its batch; the next one must be intact
    assert got == pytest.approx([b.img_feat.sum().item() for b in cpu], rel=1e-6)


class _CollateTask:
    """A task's collate contract: the batch plus a draw from the batch's generator."""

    def collate(self, examples, *, generator, dataset):
        batch = collate(examples)
        batch.targets["noise"] = torch.rand(batch.size, generator=generator)
        return batch


def _task_loader(ds, sampler, workers):
    from vlframe.engine.data import TaskBatches, _only, _SeededBatches

    batches = TaskBatches(ds, _CollateTask(), num_workers=workers)
    loader = build_loader(batches, batch_sampler=_SeededBatches(sampler, 0), collate_fn=_only, num_workers=workers, seed=0)
    return batches, loader


def test_workers_reuse_shared_blocks_without_touching_batches_in_use():
    # Every moved batch is kept to the end: had a reused block still backed one, a later batch
    # would have overwritten it.
    ds = TinyVL(n=120)
    s0, s2 = sampler_for(ds), sampler_for(ds)
    _, ref_loader = _task_loader(ds, s0, 0)
    pool_owner, loader = _task_loader(ds, s2, 2)
    pool = pool_owner.pool
    kept, refs = [], []
    for epoch in (0, 1):  # the second epoch's workers find the first epoch's table
        s0.set_epoch(epoch)
        s2.set_epoch(epoch)
        refs += [b.to("cpu") for b in ref_loader]
        for batch in loader:
            assert batch.lease is not None and int(pool.state[batch.lease.slot]) == batch.lease.lease_id
            moved = batch.to("cpu")
            # Released: the slot no longer holds this lease (a worker may already have leased it
            # again, with a higher id, between the release and this read).
            assert moved.lease is None and int(pool.state[batch.lease.slot]) != batch.lease.lease_id
            kept.append(moved)
    assert len(kept) == len(refs) > 40
    for a, b in zip(kept, refs):
        assert torch.equal(a.targets["noise"], b.targets["noise"])
        assert_batches_equal(dataclasses.replace(a, targets={}), dataclasses.replace(b, targets={}))
        assert a.img_feat.dtype == torch.float32
    # Blocks were filled again (not one fresh segment per batch), and every one was handed back.
    assert int(pool.leases.max()) > 2 and len(kept) / 2 < int(pool.leases.sum()) <= len(kept)
    assert int(pool.state.count_nonzero()) == 0


def test_leased_batches_that_are_never_moved_keep_their_blocks():
    ds = TinyVL(n=120)
    ref = list(_task_loader(ds, sampler_for(ds), 0)[1])
    owner, loader = _task_loader(ds, sampler_for(ds), 1)
    raw = list(loader)  # held, never moved: the worker must fall back to fresh segments
    held = [b.lease for b in raw if b.lease is not None]
    assert len(held) == owner.pool.blocks_per_worker < len(raw)
    for a, b in zip(raw, ref):
        assert torch.equal(a.targets["noise"], b.targets["noise"])
        assert_batches_equal(dataclasses.replace(a, targets={}), dataclasses.replace(b, targets={}))
    assert all(int(owner.pool.state[lease.slot]) == lease.lease_id for lease in held)
    for b in raw:
        b.to("cpu")
    assert int(owner.pool.state.count_nonzero()) == 0
    held[0].release()  # twice: nothing
    assert int(owner.pool.state.count_nonzero()) == 0
