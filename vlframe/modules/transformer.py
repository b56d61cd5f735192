"""A post-LN BERT-style transformer encoder on ``scaled_dot_product_attention``.

Numerically the same layer as BERT (erf GELU, LayerNorm after each residual), so BERT and UNITER
checkpoints load into it by renaming keys. Padding is a boolean key mask: padded keys get
``-inf`` (BERT used an additive -10000; both give exactly zero weight in fp32).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import MODELS


class SelfAttention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.weights_sink: list[torch.Tensor] | None = None  # set by attention_weights() only

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.num_heads, h // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.weights_sink is not None:
            y = self._explicit(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, n, h))

    def _explicit(self, q, k, v, attn_mask):
        """softmax(q k^T / sqrt(d)) v written out, keeping the weights (visualisation only: the
        training path is SDPA's fused kernel, which never forms them)."""
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        w = scores.softmax(-1)
        self.weights_sink.append(w.detach())
        return F.dropout(w, self.dropout, self.training) @ v


class TransformerLayer(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.attn = SelfAttention(hidden_size=hidden_size, num_heads=num_heads, dropout=attention_dropout)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.drop = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, attn_mask)))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


@MODELS.register_module(name="TransformerEncoder")
class TransformerEncoder(nn.Module):
    """``num_layers`` post-LN layers. ``forward(x, mask)`` with ``mask`` [B, L] bool (True = real)."""

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_size=hidden_size,
                num_heads=num_heads,
                intermediate_size=intermediate_size,
                hidden_dropout=hidden_dropout,
                attention_dropout=attention_dropout,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # [B, 1, 1, L] broadcasts over heads and queries; SDPA reads True as "may attend".
        attn_mask = None if mask is None else mask[:, None, None, :]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x


@contextlib.contextmanager
def attention_weights(module: nn.Module):
    """Within the block, every ``SelfAttention`` under ``module`` runs the explicit path and
    appends its weights [B, heads, L, L] to the yielded list, in the order the layers run::

        with attention_weights(model) as maps:
            model(batch)
        # maps[i]: layer i (padded keys get weight 0)
    """
    layers = [m for m in module.modules() if isinstance(m, SelfAttention)]
    maps: list[torch.Tensor] = []
    for m in layers:
        m.weights_sink = maps
    try:
        yield maps
    finally:
        for m in layers:
            m.weights_sink = None


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) for Linear/Embedding weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
