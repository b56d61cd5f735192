"""The batch contract: typed examples and padded batches that move themselves to a device.

An :class:`Example` is one text paired with one image's regions, as a dataset returns it.
:func:`collate` pads a list of them into a :class:`VLBatch`. Tasks add their inputs and targets
(masked ids, labels, negatives) into ``VLBatch.targets`` and may replace ``input_ids``/``img_feat``.

Precision on the way to the model. Region features (and detector soft labels) are stored fp16
and stay fp16 from the store through :class:`Example` (read-only views of the record, no copy).
:func:`collate` makes the one copy, into the padded batch, and converts to float32 there - unless
it keeps fp16 (``keep_fp16=True``, or inside :func:`collate_keeps_fp16`): a batch that crosses a
process boundary (DataLoader worker -> trainer) or the PCIe bus then moves half the bytes, and
:meth:`VLBatch.to` converts fp16 ``img_feat``/``soft_labels`` to float32 *on the target device*.
Either way a batch reaches the model as float32 once it went through ``.to(device)``, which the
trainer (``DevicePrefetcher``) always does. Inside a DataLoader worker the padded tensors are
allocated in shared memory, so handing them to the main process copies nothing.

Reused shared memory. A fresh shared-memory segment per batch costs the worker a page fault per
4 KB it writes (a third of its time on the 36-100 x 2048 region store). :class:`SharedBatchPool`
gives each worker a few blocks that it fills again once the main process is done with them:
:class:`~vlframe.engine.data.TaskBatches` builds each batch inside :meth:`SharedBatchPool.lease`,
the batch carries its :class:`BatchLease`, and :meth:`VLBatch.to` / :meth:`VLBatch.pin_memory`
copy every tensor out of the block and only then hand it back. A batch that is never moved keeps
its block (the worker then falls back to fresh segments), so nothing is overwritten while in use.

Soft labels. With 1601 classes a region's soft label is bigger than its 2048-d feature, and only
the masked-region classification tasks (MRC, MRC-kl) read them, at the masked regions only. Those
tasks collate without them and, once the masks are drawn, call :func:`gather_masked_soft_labels`:
``VLBatch.masked_soft_labels`` is then ``[n_masked, C]``, row ``j`` the soft label of the ``j``-th
True entry of ``img_masked`` in row-major order, i.e. what ``soft_labels[img_masked]`` would give,
without ever building the padded ``[B, K, C]`` tensor. ``collate(soft_labels=True)`` still builds
the padded ``soft_labels`` for code that wants every region's. Both check the rows they copy for
NaN/inf (:class:`~vlframe.data.stores.DataQualityError` naming the image): the dataset leaves that
check to them, so the unused 85% of a record's soft labels are never read.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import get_worker_info

__all__ = ["Example", "VLBatch", "pad_stack", "collate", "collate_keeps_fp16", "gather_masked_soft_labels",
           "SharedBatchPool", "BatchLease"]

# Fields that may travel fp16 and are made float32 by VLBatch.to on the target device.
_HALF_FIELDS = ("img_feat", "soft_labels", "masked_soft_labels")
_KEEP_FP16: contextvars.ContextVar[bool] = contextvars.ContextVar("vlframe_collate_keep_fp16", default=False)


@contextlib.contextmanager
def collate_keeps_fp16(enabled: bool = True) -> Iterator[None]:
    """Within this block :func:`collate` (and every task collate built on it) keeps fp16
    ``img_feat``/``soft_labels`` fp16. Meant around the collate of a loader whose batches always
    go through ``VLBatch.to(device)`` before use (the trainer's)::

        with collate_keeps_fp16():
            batch = task.collate(examples, generator=g, dataset=ds)
    """
    token = _KEEP_FP16.set(bool(enabled))
    try:
        yield
    finally:
        _KEEP_FP16.reset(token)


@dataclass
class Example:
    """One text + one image's regions. Datasets hand out the store's arrays without copying them
    (fp16 features, read-only); :func:`collate` is where they are copied and made float32."""

    txt_id: str
    img_id: str
    input_ids: torch.Tensor  # [T] long, with [CLS] ... [SEP]
    img_feat: torch.Tensor  # [K, D] fp16 as stored (or float32); may be a read-only view: never modify in place
    img_pos: torch.Tensor  # [K, 7] float32: x1, y1, x2, y2, w, h, w*h (normalised); may be read-only too
    soft_labels: torch.Tensor | None = None  # [K, C] fp16/fp32 detector class distribution, background at 0
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific fields (answers, labels, ...)

    @property
    def num_units(self) -> int:
        """Input units this example costs in a token-budget batch: text tokens + regions."""
        return int(self.input_ids.numel() + self.img_feat.shape[0])


@dataclass
class VLBatch:
    input_ids: torch.Tensor  # [B, T] long, 0-padded
    text_mask: torch.Tensor  # [B, T] bool, True on real tokens
    img_feat: torch.Tensor  # [B, K, D] float
    img_pos: torch.Tensor  # [B, K, 7] float
    img_mask: torch.Tensor  # [B, K] bool, True on real regions
    soft_labels: torch.Tensor | None = None  # [B, K, C]
    img_masked: torch.Tensor | None = None  # [B, K] bool: regions whose features the model zeroes
    token_type_ids: torch.Tensor | None = None  # [B, T] optional text token types (default 0)
    masked_soft_labels: torch.Tensor | None = None  # [n_masked, C]: soft_labels[img_masked] (module doc)
    img_type_ids: torch.Tensor | None = None  # [B, K] optional region token types (default 1)
    targets: dict[str, Any] = field(default_factory=dict)  # task targets (tensors or python values)
    txt_ids: list[str] = field(default_factory=list)
    img_ids: list[str] = field(default_factory=list)
    # The reused shared-memory block the tensors live in (module doc); not part of the content.
    lease: "BatchLease | None" = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.text_mask.sum() + self.img_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VLBatch":
        """Move every tensor to ``device``; fp16 ``img_feat``/``soft_labels`` (a batch collated
        with ``keep_fp16``) are moved first and made float32 there, so the copy is half-size and
        the model always sees float32 regions. A leased batch (module doc) is copied out of its
        shared block, which is then handed back: the result never aliases it."""
        copy = self.lease is not None

        def move(x: torch.Tensor, half: bool) -> torch.Tensor:
            y = x.to(device, non_blocking=non_blocking)
            if half and y.dtype == torch.float16:
                return y.float()  # a copy in any case
            if copy and y.device.type == "cpu" and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                return y.clone()
            return y

        return self._map_tensors(move)

    def pin_memory(self) -> "VLBatch":
        # DataLoader(pin_memory=True) calls this on custom batch types; pinning copies, so a
        # leased block is handed back here.
        return self._map_tensors(lambda x, half: x.pin_memory())

    def _map_tensors(self, fn: Any) -> "VLBatch":
        """A new batch with ``fn(tensor, half)`` applied to every tensor (in dicts, lists, tuples and
        nested batches such as retrieval's sampled negatives too; ``half``: a field that may travel
        fp16), then this batch's lease handed back: ``fn`` must copy what a leased batch holds."""

        def walk(x: Any, half: bool = False) -> Any:
            if isinstance(x, torch.Tensor):
                return fn(x, half)
            if isinstance(x, VLBatch):
                return x._map_tensors(fn)
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)) and any(isinstance(v, (torch.Tensor, VLBatch, dict, list, tuple)) for v in x):
                return type(x)(walk(v) for v in x)
            return x

        out = {f.name: walk(getattr(self, f.name), f.name in _HALF_FIELDS)
               for f in dataclasses.fields(self) if f.name != "lease"}
        if self.lease is not None:
            self.lease.release()
        return dataclasses.replace(self, lease=None, **out)


# ----------------------------------------------------------------------- reused shared memory
_POOLS: "weakref.WeakValueDictionary[str, SharedBatchPool]" = weakref.WeakValueDictionary()
_ARENA: contextvars.ContextVar["_Arena | None"] = contextvars.ContextVar("vlframe_batch_arena", default=None)
_ALIGN = 64


@dataclass(frozen=True)
class BatchLease:
    """Which pool block a batch's tensors live in; ``release()`` (main process, once every tensor
    was copied out) lets the worker fill it again. Releasing twice, or after the block was
    leased again, does nothing."""

    pool_id: str
    slot: int
    lease_id: int

    def release(self) -> None:
        pool = _POOLS.get(self.pool_id)
        if pool is not None:
            pool._release(self.slot, self.lease_id)


class SharedBatchPool:
    """``blocks_per_worker`` reusable shared-memory blocks for each of ``num_workers`` DataLoader
    workers. Created in the main process before the workers start; the two small shared tables
    travel with it to the workers (fork or spawn), the blocks themselves live in each worker.

    ``state[slot]`` is 0 when the block is free, else the id of the lease holding it. Only the
    worker owning a slot turns 0 into an id, only a release turns that id back into 0, so neither
    side ever overwrites the other's write."""

    def __init__(self, num_workers: int, blocks_per_worker: int = 4):
        if num_workers < 1 or blocks_per_worker < 1:
            raise ValueError(f"SharedBatchPool: num_workers ({num_workers}) and blocks_per_worker "
                             f"({blocks_per_worker}) must be >= 1")
        self.id = uuid.uuid4().hex
        self.num_workers = int(num_workers)
        self.blocks_per_worker = int(blocks_per_worker)
        n = self.num_workers * self.blocks_per_worker
        self.state = torch.zeros(n, dtype=torch.int64).share_memory_()
        self.leases = torch.zeros(n, dtype=torch.int64).share_memory_()  # leases so far, per slot
        self._blocks: dict[int, torch.UntypedStorage] = {}  # this process's (a worker's) blocks
        _POOLS[self.id] = self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_blocks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._blocks = {}
        _POOLS[self.id] = self

    def _release(self, slot: int, lease_id: int) -> None:
        if int(self.state[slot]) == lease_id:
            self.state[slot] = 0

    @contextlib.contextmanager
    def lease(self) -> Iterator["BatchLease | None"]:
        """In a DataLoader worker: the batch tensors :func:`collate` allocates inside this block
        are carved from one of the worker's free blocks; yields the lease to attach to the batch,
        or None (not in a worker, or every block still in use: fresh segments as before)."""
        info = get_worker_info()
        if info is None or info.num_workers != self.num_workers:
            yield None
            return
        first = info.id * self.blocks_per_worker
        slot = next((s for s in range(first, first + self.blocks_per_worker) if int(self.state[s]) == 0), None)
        if slot is None:
            yield None
            return
        lease_id = int(self.leases[slot]) + 1
        self.leases[slot] = lease_id
        self.state[slot] = lease_id
        arena = _Arena(self._blocks.get(slot))
        token = _ARENA.set(arena)
        ok = False
        try:
            yield BatchLease(self.id, slot, lease_id)
            ok = True
        finally:
            _ARENA.reset(token)
            if arena.wanted > arena.capacity:
                # Grown for the next batch; tensors already made keep the old block alive.
                self._blocks[slot] = torch.UntypedStorage._new_shared(_round_up(int(arena.wanted * 1.25), 1 << 21))
            if not ok:
                self.state[slot] = 0  # the batch failed to build: nothing of it is in use


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class _Arena:
    """Bump allocation in one block for the duration of one lease."""

    def __init__(self, block: torch.UntypedStorage | None):
        self.block = block
        self.capacity = block.nbytes() if block is not None else 0
        self.wanted = 0  # what the batch needs in all: the next block's size if it did not fit

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor | None:
        start = _round_up(self.wanted, _ALIGN)
        self.wanted = start + nbytes
        if self.block is None or self.wanted > self.capacity:
            return None
        return torch.empty(0, dtype=dtype).set_(self.block, start // dtype.itemsize, shape)


def _new_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, bool]:
    """An uninitialised tensor, and whether it is known to be all zeros."""
    if device.type != "cpu" or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, device=device), False
    # In a DataLoader worker, build the batch in shared memory: sending it to the main process
    # then passes a file handle instead of copying every byte (what torch's default_collate does).
    # A new shared-memory segment is a freshly truncated file, so it reads as zeros.
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    arena = _ARENA.get()
    if arena is not None:
        t = arena.take(shape, dtype, nbytes)
        if t is not None:
            return t, False  # a reused block holds the previous batch's bytes
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape), True


def pad_stack(tensors: list[torch.Tensor], pad_value: float = 0, *,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors of shape [n_i, ...] into [B, max n, ...] plus a bool validity mask [B, max n].

    ``dtype`` (default: the first tensor's) is the output's; each input is copied into it once,
    converted on the way (fp16 -> float32 costs nothing extra over the copy).
    """
    n = max((t.shape[0] for t in tensors), default=0)
    out, zeroed = _new_batch_tensor((len(tensors), n, *tensors[0].shape[1:]), dtype or tensors[0].dtype,
                                    tensors[0].device)
    mask = torch.zeros(len(tensors), n, dtype=torch.bool)
    write_padding = not (zeroed and pad_value == 0)  # untouched shared pages are never even faulted in
    for i, t in enumerate(tensors):
        k = t.shape[0]
        out[i, :k] = t
        if write_padding:
            out[i, k:] = pad_value
        mask[i, :k] = True
    return out, mask


def _float_dtype(tensors: list[torch.Tensor], keep_fp16: bool) -> torch.dtype:
    if keep_fp16 and all(t.dtype == torch.float16 for t in tensors):
        return torch.float16
    return torch.float32


def collate(examples: list[Example], *, keep_fp16: bool | None = None, soft_labels: bool = True) -> VLBatch:
    """Pad a list of examples into one batch (text 0-padded, regions zero-padded).

    ``img_feat``/``soft_labels`` come out float32, or fp16 when ``keep_fp16`` (default: whether
    the caller is inside :func:`collate_keeps_fp16`) and every example's are fp16; ``.to(device)``
    makes those float32 on the device. ``img_pos`` is always float32. ``soft_labels=False`` leaves
    them out of the batch (a task that does not use them: with 1601 classes they are the biggest
    tensor of the batch); they are batched only when every example has them.
    """
    if not examples:
        raise ValueError("collate: empty list of examples")
    if keep_fp16 is None:
        keep_fp16 = _KEEP_FP16.get()
    feats = [e.img_feat for e in examples]
    input_ids, text_mask = pad_stack([e.input_ids for e in examples], 0)
    img_feat, img_mask = pad_stack(feats, 0.0, dtype=_float_dtype(feats, keep_fp16))
    img_pos, _ = pad_stack([e.img_pos for e in examples], 0.0, dtype=torch.float32)
    soft = None
    if soft_labels and all(e.soft_labels is not None for e in examples):
        softs = [e.soft_labels for e in examples]
        _check_soft_labels(softs, examples)
        soft, _ = pad_stack(softs, 0.0, dtype=_float_dtype(softs, keep_fp16))
    return VLBatch(
        input_ids=input_ids,
        text_mask=text_mask,
        img_feat=img_feat,
        img_pos=img_pos,
        img_mask=img_mask,
        soft_labels=soft,
        txt_ids=[e.txt_id for e in examples],
        img_ids=[e.img_id for e in examples],
    )


def gather_masked_soft_labels(examples: list[Example], masked: torch.Tensor, *,
                              keep_fp16: bool | None = None) -> torch.Tensor | None:
    """The soft labels of the regions ``masked`` [B, K] selects, ``[n_masked, C]`` in row-major
    order of ``masked`` (the order of ``padded[masked]``), copied straight from the examples'
    stored rows; None when an example has none. Precision as :func:`collate`'s ``soft_labels``.
    """
    if any(e.soft_labels is None for e in examples):
        return None
    if masked.shape[0] != len(examples):
        raise ValueError(f"gather_masked_soft_labels: masked has {masked.shape[0]} rows for {len(examples)} examples")
    if keep_fp16 is None:
        keep_fp16 = _KEEP_FP16.get()
    softs = [e.soft_labels for e in examples]
    dtype = _float_dtype(softs, keep_fp16)
    counts = masked.sum(1).tolist()
    out, _ = _new_batch_tensor((int(sum(counts)), softs[0].shape[1]), dtype, softs[0].device)
    row = 0
    for i, (soft, n) in enumerate(zip(softs, counts)):
        if n:
            idx = masked[i, : soft.shape[0]].nonzero().squeeze(1)
            if idx.numel() != n:
                raise ValueError(f"gather_masked_soft_labels: example {i} has {soft.shape[0]} regions but "
                                 f"masked marks a region beyond them")
            out[row: row + n] = soft.index_select(0, idx)  # converted to out's dtype on the copy
            row += n
    _check_soft_labels(list(out.split(counts)), examples)
    return out


def _check_soft_labels(parts: list[torch.Tensor], examples: list[Example]) -> None:
    """NaN/inf in the soft labels a batch copies (``parts[i]``: example i's rows): the error names
    the first bad example's image."""
    from vlframe.data.stores import DataQualityError, all_finite  # the fast fp16/fp32 bit-pattern check

    bad = next((i for i, part in enumerate(parts) if not all_finite(part.detach().contiguous().numpy())), None)
    if bad is None:
        return
    img_id = examples[bad].img_id
    raise DataQualityError(
        f"img_id {img_id!r}: non-finite values (NaN/inf) in soft_labels (example {examples[bad].txt_id!r}; a store "
        f"written outside vlframe or damaged; rewrite it, the writers and importers reject these)",
        key=img_id, reason="non_finite")
