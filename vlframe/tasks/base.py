"""The task contract.

A task is what a batch is made into, its head(s), its loss and its metric, registered by name in
TASKS. It knows no model by name: it reads the model's :class:`EncoderOutput` and, for heads tied
to the model's embeddings, the model's ``word_embeddings`` / ``feature_projection`` modules.

Life cycle: built from config with its own keyword arguments -> ``setup(model=..., info=...)``
creates the heads (sizes come from the model and the data) -> ``collate(examples, generator=,
dataset=)`` runs on the CPU side of the loader (masking, negatives) -> ``forward(model, batch)``
returns a :class:`TaskOutput` -> ``evaluate(model, batch)`` returns metric sums for validation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlframe.data.batch import Example, VLBatch, collate


@dataclass
class DataInfo:
    """What heads and maskers need to know about the data."""

    special_ids: dict[str, int]  # cls, sep, mask, pad, unk
    vocab_size: int
    feat_dim: int
    num_labels: int | None = None  # detector classes incl. background (index 0)
    random_range: tuple[int, int] | None = None  # ids a "random word" replacement draws from

    @classmethod
    def from_dataset(cls, dataset: Any) -> "DataInfo":
        special = dict(dataset.special_ids)
        vocab = int(dataset.vocab_size)
        low = int(getattr(dataset, "first_word_id", 0) or (999 if vocab > 1000 else max(special.values()) + 1))
        return cls(
            special_ids=special,
            vocab_size=vocab,
            feat_dim=int(dataset.feat_dim),
            num_labels=getattr(dataset, "num_labels", None),
            random_range=(low, vocab),
        )


@dataclass
class TaskOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    logs: dict[str, float] = field(default_factory=dict)  # detached scalars for the log
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # head outputs (tests, analysis)


class Task(nn.Module):
    """Base class. Subclasses define ``setup``, ``collate``, ``forward`` and ``evaluate``."""

    #: metric names this task's ``evaluate`` reports, higher-is-better first (used for logging).
    metric_names: tuple[str, ...] = ()
    #: whether batches carry the detector's soft labels (the largest tensor of a batch: only the
    #: region-classification tasks need them).
    needs_soft_labels: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.info: DataInfo | None = None

    def setup(self, *, model: nn.Module, info: DataInfo) -> None:
        self.info = info

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        return collate(examples, soft_labels=self.needs_soft_labels)

    def forward(self, model: nn.Module, batch: VLBatch) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def loss_count(self, batch: VLBatch) -> int | torch.Tensor:
        """How many elements ``forward``'s loss is a mean over, read from the collated batch
        before the forward (an int, or a 0-d tensor on the batch's device: no host sync). The
        trainer weighs each micro-batch's loss by its count over the step's total count (all
        micro-batches of all ranks), which makes accumulation and DDP exact for a mean loss.
        Default: the number of examples (a per-example mean)."""
        return batch.size

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: VLBatch) -> dict[str, tuple[float, float]]:
        """Metric sums over one validation batch: name -> (sum, count). Default: the loss."""
        out = self.forward(model, batch)
        return {"loss": (float(out.loss) * batch.size, float(batch.size))}

    def evaluate_dataset(self, model: nn.Module, dataset: Any, *, device: torch.device) -> dict[str, float]:
        """Metrics that need the whole split at once (e.g. retrieval); default: none."""
        return {}


def text_maskable(batch: VLBatch, special_ids: dict[str, int]) -> torch.Tensor:
    """Real words that masking may pick: not padding, not [CLS]/[SEP]."""
    ids = batch.input_ids
    return batch.text_mask & (ids != special_ids["cls"]) & (ids != special_ids["sep"])
