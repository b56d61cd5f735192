"""The batch contract: typed examples and padded batches that move themselves to a device.

An :class:`Example` is one text paired with one image's regions, as a dataset returns it.
:func:`collate` pads a list of them into a :class:`VLBatch`. Tasks add their inputs and targets
(masked ids, labels, negatives) into ``VLBatch.targets`` and may replace ``input_ids``/``img_feat``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Example:
    txt_id: str
    img_id: str
    input_ids: torch.Tensor  # [T] long, with [CLS] ... [SEP]
    img_feat: torch.Tensor  # [K, D] float32 (stored fp16)
    img_pos: torch.Tensor  # [K, 7] float32: x1, y1, x2, y2, w, h, w*h (normalised)
    soft_labels: torch.Tensor | None = None  # [K, C] detector class distribution, C includes background 0
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
        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
                return type(x)(move(v) for v in x)
            return x

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def pin_memory(self) -> "VLBatch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        def pin(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.pin_memory()
            if isinstance(x, dict):
                return {k: pin(v) for k, v in x.items()}
            return x

        return dataclasses.replace(self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)})


def pad_stack(tensors: list[torch.Tensor], pad_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors of shape [n_i, ...] into [B, max n, ...] plus a bool validity mask [B, max n]."""
    n = max((t.shape[0] for t in tensors), default=0)
    out = tensors[0].new_full((len(tensors), n, *tensors[0].shape[1:]), pad_value)
    mask = torch.zeros(len(tensors), n, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def collate(examples: list[Example]) -> VLBatch:
    """Pad a list of examples into one batch (text 0-padded, regions zero-padded)."""
    if not examples:
        raise ValueError("collate: empty list of examples")
    input_ids, text_mask = pad_stack([e.input_ids for e in examples], 0)
    img_feat, img_mask = pad_stack([e.img_feat.float() for e in examples], 0.0)
    img_pos, _ = pad_stack([e.img_pos.float() for e in examples], 0.0)
    soft = None
    if all(e.soft_labels is not None for e in examples):
        soft, _ = pad_stack([e.soft_labels.float() for e in examples], 0.0)
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
