"""What a V+L encoder offers tasks, and nothing more: tasks are typed against this, never
against a model. UNITER (single stream) and a two-stream encoder both implement it in their own
``projects/`` folder.

- ``model(batch) -> VLEncoderOutput``: contextualised text and region states with their masks
  (True = a real token / region), the pooled pair representation, and, for single-stream models,
  the joint sequence.
- ``model.spec``: the sizes heads are built from (:class:`VLEncoderSpec`), published by the
  model so that no config repeats them and no head reads them from the model's attributes.
- ``model.tie_targets()``: the modules a head may tie its output layer to, under the names of
  :data:`TIE_TARGETS`. A tied head names its target in its class attribute ``tie_to``; the task
  calls ``head.bind(targets[head.tie_to])`` after building it (:func:`vlframe.modules.heads.build_head`).
- ``model.add_token_type(name, like=)``: optional, for tasks with extra input segments.
- Region masking: a region with ``batch.img_masked`` True must not show its features to the
  encoder (UNITER zeroes them and adds a learned mask vector); maskers set the field, the model
  honours it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Names of the modules an encoder offers heads to tie to:
#: ``word_embeddings``: ``nn.Embedding`` [vocab, text_dim] (MLM's decoder is its weight);
#: ``region_projection``: ``nn.Linear`` region feature -> region_dim, weight [region_dim, feat_dim]
#: (MRFR's decoder is its transpose).
TIE_TARGETS: tuple[str, ...] = ("word_embeddings", "region_projection")


@dataclass(frozen=True)
class VLEncoderSpec:
    """Sizes a model publishes for the heads built on it."""

    text_dim: int  # width of ``text`` states
    region_dim: int  # width of ``regions`` states
    pooled_dim: int  # width of ``pooled``
    vocab_size: int  # rows of the word embedding
    feat_dim: int  # region feature size the model reads (the region store's)
    max_text_positions: int | None = None  # longest text (with [CLS]/[SEP]) it embeds; None = no limit


@dataclass
class VLEncoderOutput:
    text: torch.Tensor  # [B, T, text_dim] states at the input text positions
    text_mask: torch.Tensor  # [B, T] bool, True on real tokens
    regions: torch.Tensor  # [B, K, region_dim] states at the input region positions
    region_mask: torch.Tensor  # [B, K] bool, True on real regions
    pooled: torch.Tensor  # [B, pooled_dim] the pair's representation (ITM, classification heads)
    sequence: torch.Tensor | None = None  # [B, L, H] joint sequence of a single-stream model
    sequence_mask: torch.Tensor | None = None  # [B, L] bool


class VLEncoder(nn.Module):
    """Base class of V+L encoders. Subclasses set ``self.spec`` in ``__init__`` and define
    ``forward(batch) -> VLEncoderOutput`` and ``tie_targets()``."""

    spec: VLEncoderSpec
    #: what reading ``model.pretrained`` did (a ``vlframe.engine.checkpoint.WeightsReport``), if it did
    init_report = None

    def tie_targets(self) -> dict[str, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must define tie_targets()")  # abstract

    def runs_real_units(self, device) -> bool:
        """Whether a batch on ``device`` costs only its real text tokens + regions (an encoder that
        runs without padding); the token-budget sampler then counts real units. Default: padded."""
        return False

    def load_pretrained(self, path: str):
        """Copy weights of a foreign layout (e.g. a BERT checkpoint) into this model; returns a
        ``WeightsReport``. vlframe's own checkpoints never come here (the trainer reads them)."""
        raise ValueError(
            f"{path}: not a vlframe checkpoint (no model.* keys), and {type(self).__name__} reads no other layout "
            f"(it defines no load_pretrained)"
        )
    def add_token_type(self, name: str, *, like: str) -> int:
        """Optional: a new input type (modality/segment embedding) ``name`` initialised from the
        ``like`` type ('text' or 'image'); returns its id for ``batch.token_type_ids`` /
        ``batch.img_type_ids``. Asking again for a known ``name`` returns the same id. A checkpoint
        of the model before the extension still loads (the new rows are made from it). Tasks with
        extra segments (NLVR2's second image, VCR's answer and rationale) call it in ``setup``."""
        raise TypeError(f"{type(self).__name__} has no token-type table to extend (needed by {name!r})")
