"""Losses: registered in LOSSES, selected by a task's ``loss`` node (``wra_loss`` for ITM's
word-region alignment). The defaults are the original UNITER's formulas; each returns a scalar
mean, computed in fp32 whatever the autocast dtype.

A user loss is one class with keyword-only ``__init__`` arguments and
``forward(input, target) -> scalar``, registered with ``@LOSSES.register_module(name=...)``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import LOSSES


@LOSSES.register_module(name="cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Mean CE over rows (MLM at masked words, MRC to the detector's top class, ITM); optional
    label smoothing."""

    def __init__(self, *, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


@LOSSES.register_module(name="mse")
class MSELoss(nn.Module):
    """Mean squared error over every element (MRFR: masked features)."""

    def __init__(self) -> None:  # no arguments: a config that passes one is refused
        super().__init__()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float())


@LOSSES.register_module(name="kl_div")
class KLDivLoss(nn.Module):
    """KL(target distribution || softmax(logits)), mean over every element as the original's
    MRC-kl (``reduction='none'`` then ``.mean()``), not over rows."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), -1), target.float(), reduction="none").mean()


@LOSSES.register_module(name="ot_contrast")
class OTContrastLoss(nn.Module):
    """WRA's contrast of OT distances [B] by match [B] (1 = matched pair).

    ``normalize='batch'``: (sum over matched - sum over mismatched) / B, the original's formula
    for WRA inside ITM. ``'per_side'``: mean over matched - mean over mismatched (an empty side
    counts 0), for WRA as a task of its own.
    """

    def __init__(self, *, normalize: Literal["batch", "per_side"] = "batch"):
        super().__init__()
        if normalize not in ("batch", "per_side"):
            raise ValueError(f"normalize must be 'batch' or 'per_side', got {normalize!r}")
        self.normalize = normalize
        # 'batch' is a sum of per-example terms: micro-batches weighted by size add up to the
        # whole batch exactly. 'per_side' divides by each micro-batch's own side counts, so under
        # grad_accum or DDP it is the mean over micro-batches of their contrasts, not the step's.
        self.exact_over_micro_batches = normalize == "batch"

    def forward(self, distance: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        # Masked sums rather than boolean indexing: no host-device sync inside a step.
        pos = (matched == 1).to(distance.dtype)
        neg = 1.0 - pos
        if self.normalize == "batch":
            return ((distance * pos).sum() - (distance * neg).sum()) / max(int(matched.numel()), 1)
        return (distance * pos).sum() / pos.sum().clamp(min=1) - (distance * neg).sum() / neg.sum().clamp(min=1)


@LOSSES.register_module(name="bce_soft")
class SoftBCELoss(nn.Module):
    """BCE-with-logits against soft targets [B, C] (VQA's answer scores). ``scale='classes'``:
    the element mean times C, as the original VQA loss (``bce(reduction='mean') * C``);
    ``'none'``: the plain element mean."""

    def __init__(self, *, scale: Literal["classes", "none"] = "classes"):
        super().__init__()
        if scale not in ("classes", "none"):
            raise ValueError(f"scale must be 'classes' or 'none', got {scale!r}")
        self.scale = scale

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return loss * logits.shape[-1] if self.scale == "classes" else loss


@LOSSES.register_module(name="ranking_hinge")
class RankingHingeLoss(nn.Module):
    """The paper's triplet ranking loss on matching scores: mean of
    max(0, margin + sigmoid(neg) - sigmoid(pos)) over every negative; ``pos`` [B], ``neg`` [B, N]."""

    def __init__(self, *, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        pos, neg = torch.sigmoid(pos.float()), torch.sigmoid(neg.float())
        return torch.clamp(self.margin + neg - pos[:, None], min=0).mean()
