"""Prediction heads shared by tasks. Heads whose output layer is tied to a model's embedding
take that weight at call time, so the weight has one owner (the model) and one copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import MODELS


class Transform(nn.Module):
    """BERT's prediction transform: Linear -> GELU -> LayerNorm."""

    def __init__(self, *, hidden_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


@MODELS.register_module(name="TiedTokenHead")
class TiedTokenHead(nn.Module):
    """MLM: transform, then the word-embedding matrix [V, H] as decoder, plus an own bias [V]."""

    def __init__(self, *, hidden_size: int, vocab_size: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), embedding_weight, self.bias)


@MODELS.register_module(name="TiedFeatureHead")
class TiedFeatureHead(nn.Module):
    """MRFR: transform, then the transposed feature projection [H, D] back to feature space."""

    def __init__(self, *, hidden_size: int, feat_dim: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, h: torch.Tensor, projection_weight: torch.Tensor) -> torch.Tensor:
        # projection_weight is the image embedder's Linear(D -> H).weight, shape [H, D].
        return F.linear(self.transform(h), projection_weight.t(), self.bias)


@MODELS.register_module(name="ClassifierHead")
class ClassifierHead(nn.Module):
    """Transform then Linear(H, num_classes) (MRC, MRC-kl)."""

    def __init__(self, *, hidden_size: int, num_classes: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.out = nn.Linear(hidden_size, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(h))


@MODELS.register_module(name="MLPHead")
class MLPHead(nn.Module):
    """Linear(H, mult*H) -> GELU -> LayerNorm -> Linear(mult*H, out) (VQA, SNLI-VE)."""

    def __init__(self, *, hidden_size: int, num_outputs: int, mult: int = 2):
        super().__init__()
        self.hidden = nn.Linear(hidden_size, mult * hidden_size)
        self.norm = nn.LayerNorm(mult * hidden_size, eps=1e-12)
        self.out = nn.Linear(mult * hidden_size, num_outputs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.hidden(h))))
