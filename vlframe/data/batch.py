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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import get_worker_info

__all__ = ["Example", "VLBatch", "pad_stack", "collate", "collate_keeps_fp16", "gather_masked_soft_labels"]

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

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.text_mask.sum() + self.img_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VLBatch":
        """Move every tensor to ``device``; fp16 ``img_feat``/``soft_labels`` (a batch collated
        with ``keep_fp16``) are moved first and made float32 there, so the copy is half-size and
        the model always sees float32 regions."""

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, VLBatch):  # a task's extra batch (e.g. retrieval's sampled negatives)
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
                return type(x)(move(v) for v in x)
            return x

        moved = {f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for name in _HALF_FIELDS:
            x = moved[name]
            if isinstance(x, torch.Tensor) and x.dtype == torch.float16:
                moved[name] = x.float()
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> "VLBatch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        def pin(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.pin_memory()
            if isinstance(x, dict):
                return {k: pin(v) for k, v in x.items()}
            return x

        return dataclasses.replace(self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)})


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
