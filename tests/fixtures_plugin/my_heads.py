"""A user head registered from outside vlframe (brought in by ``custom_imports``)."""
from __future__ import annotations

import torch
from torch import nn

from vlframe.registry import MODELS


@MODELS.register_module(name="MyTinyHead")
class MyTinyHead(nn.Module):
    """Linear(hidden_size, num_outputs) with an optional output scale."""

    def __init__(self, *, hidden_size: int, num_outputs: int, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_outputs)
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h) * self.scale
