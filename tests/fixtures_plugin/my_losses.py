"""A user loss registered from outside vlframe (brought in by ``custom_imports``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import LOSSES


@LOSSES.register_module(name="MyFocalLoss")
class MyFocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): mean over rows of (1 - p_target)^gamma * CE."""

    def __init__(self, *, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()
