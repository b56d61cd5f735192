"""A user's ITM head in one file: a 2-layer MLP on the pooled output instead of one Linear.

Selected by a config (``examples/my_project/pretrain_mlp_itm.yaml``) or on the command line::

    tools/train.py configs/uniter/pretrain_tiny_synth.yaml \
        'custom_imports=[projects.uniter, examples.my_project.mlp_itm_head]' \
        'tasks.itm.head={type: MLPITMHead, hidden: 256}'

``hidden_size`` and ``num_classes`` are filled in by the ITM task (from the model's spec; 2
classes); ``hidden`` and ``dropout`` come from the config.
"""
from __future__ import annotations

import torch
from torch import nn

from vlframe.models import VLEncoderOutput
from vlframe.registry import MODELS


@MODELS.register_module(name="MLPITMHead")
class MLPITMHead(nn.Module):
    def __init__(self, *, hidden_size: int, num_classes: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, out: VLEncoderOutput) -> torch.Tensor:  # a pair head gets the encoder output
        return self.net(out.pooled)
