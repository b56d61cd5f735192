"""The task contract.

A task is what a batch is made into, its head(s), its loss(es) and its metrics, registered by
name in TASKS. Heads, losses and metrics are config nodes built from MODELS, LOSSES and METRICS
with the original UNITER choices as defaults. A task knows no model by name: it is typed against
:class:`vlframe.models.VLEncoder` (its ``spec`` for head sizes, ``tie_targets()`` for tied heads,
``forward(batch) -> VLEncoderOutput``).

Life cycle: built from config with its own keyword arguments -> ``setup(model=, info=, where=)``
builds the heads (sizes from the model's spec and the data) -> ``collate(examples, generator=,
dataset=)`` runs on the CPU side of the loader (masking, negatives) -> ``forward(model, batch)``
returns a :class:`TaskOutput` -> ``evaluate(model, batch)`` returns the named outputs that the
task's metrics read (see :mod:`vlframe.metrics.base`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlframe.data.batch import Example, VLBatch, collate
from vlframe.metrics.base import DatasetMetric, Metric
from vlframe.models import VLEncoder
from vlframe.modules.heads import build_head
from vlframe.registry import LOSSES, METRICS, build


@dataclass
class DataInfo:
    """What heads and maskers need to know about the data."""

    special_ids: dict[str, int]  # cls, sep, mask, pad, unk
    vocab_size: int
    feat_dim: int
    num_labels: int | None = None  # detector classes incl. background (index 0)
    random_range: tuple[int, int] | None = None  # ids a "random word" replacement draws from
    answer_vocab: list[str] | None = None  # VQA answers (label i = entry i), from a task dataset

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
            answer_vocab=getattr(dataset, "answer_vocab", None),
        )


@dataclass
class TaskOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    # Detached scalar tensors for the training log; they stay on the device (no host sync per
    # step): the trainer averages them per task and reads them at the log interval.
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # head outputs (tests, analysis)


def build_component(node: Any, registry: Any, default: Mapping[str, Any], where: str) -> Any:
    """A component from its node (``default`` when None); an already built object passes."""
    if node is None:
        node = default
    if not isinstance(node, Mapping):
        return node
    return build(dict(node), registry, where=where)


class Task(nn.Module):
    """Base class. Subclasses define ``setup``, ``collate``, ``forward`` and ``evaluate``."""

    #: the metrics a task reports when its config gives no ``metrics`` list.
    default_metrics: ClassVar[tuple[dict, ...]] = ()
    #: whether batches carry the detector's soft labels (the largest tensor of a batch: only the
    #: region-classification tasks need them).
    needs_soft_labels: bool = False

    def __init__(self, *, metrics: list[dict] | None = None) -> None:
        super().__init__()
        self.info: DataInfo | None = None
        self.where = type(self).__name__
        nodes = self.default_metrics if metrics is None else metrics
        # Plain list, not module state: metrics hold no weights.
        self.metrics: list[Metric | DatasetMetric] = [
            build_component(m, METRICS, {}, where=f"metrics.{i}") for i, m in enumerate(nodes)
        ]

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        """Called once the model and the data are known; ``where`` is the task's config path."""
        self.info = info
        self.where = where or self.where

    def make_head(self, node: Mapping[str, Any] | nn.Module, *, model: VLEncoder, sizes: Mapping[str, int], key: str = "head") -> nn.Module:
        """Build the head of config key ``key`` with ``sizes``, tied through the model's tie targets."""
        return build_head(node, sizes=sizes, tie_targets=model.tie_targets(), where=f"{self.where}.{key}")

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
    def evaluate(self, model: nn.Module, batch: VLBatch) -> dict[str, Any]:
        """Named outputs of one validation batch, read by the metrics. Default: the loss."""
        return {"loss": self.forward(model, batch).loss, "loss_count": self.loss_count(batch)}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Records of one batch's ``evaluate`` outputs in the benchmark's official prediction
        format (tools/test.py); tasks without one return none."""
        return []

    def init_from_pretrained(self, weights: dict[str, torch.Tensor], *, prefix: str) -> dict[str, torch.Tensor]:
        """Weights for this task's heads (keys under ``prefix``) made from a pretrained checkpoint's
        ``weights`` (``train.init_from``), e.g. a ranking head from the ITM head. Default: none."""
        return {}


def build_loss(node: Any, default: Mapping[str, Any], where: str) -> nn.Module:
    """A loss from its node (LOSSES), ``default`` when the config gives none."""
    return build_component(node, LOSSES, default, where)


def text_maskable(batch: VLBatch, special_ids: dict[str, int]) -> torch.Tensor:
    """Real words that masking may pick: not padding, not [CLS]/[SEP]."""
    ids = batch.input_ids
    return batch.text_mask & (ids != special_ids["cls"]) & (ids != special_ids["sep"])
