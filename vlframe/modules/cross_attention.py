"""Cross-attention blocks for two-stream encoders (the LXMERT / ViLBERT family).

:class:`CrossAttention` takes its queries from one stream and its keys and values from the
other; padded keys of the other stream get no weight (boolean key mask, as in
:mod:`vlframe.modules.transformer`). :class:`CoAttentionLayer` is one cross-modality layer over
two streams of the same width, laid out as LXMERT's: each stream attends to the other (residual +
post-LN), then runs its own self-attention and feed-forward (a
:class:`~vlframe.modules.transformer.TransformerLayer`). Both directions read the streams' states
from before the layer, so the layer does not depend on which stream goes first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.modules.transformer import SelfAttention, TransformerLayer


class CrossAttention(SelfAttention):
    """``forward(x [B, N, H], context [B, M, H], context_mask [B, M] bool) -> [B, N, H]``: the
    projections of :class:`~vlframe.modules.transformer.SelfAttention`, with the queries taken
    from ``x`` and the keys and values from ``context``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        d = h // self.num_heads
        q = self.query(x).view(b, n, self.num_heads, d).transpose(1, 2)
        k = self.key(context).view(b, -1, self.num_heads, d).transpose(1, 2)
        v = self.value(context).view(b, -1, self.num_heads, d).transpose(1, 2)
        # An example with no real context would softmax over nothing (NaN): let it attend to its
        # padding and drop the result below (where, not a product: padding may hold NaN), so its
        # stream only keeps the residual.
        has_context = context_mask.any(dim=1)
        keys = context_mask | ~has_context[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keys[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        y = self.out(y.transpose(1, 2).reshape(b, n, h))
        return torch.where(has_context[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


class CrossAttentionSublayer(nn.Module):
    """``x <- LN(x + dropout(CrossAttention(x, context)))``."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.attn = CrossAttention(hidden_size=hidden_size, num_heads=num_heads, dropout=attention_dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.drop = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.attn(x, context, context_mask)))


class CoAttentionLayer(nn.Module):
    """One cross-modality layer: ``forward(a, a_mask, b, b_mask) -> (a', b')``, masks [B, *] bool
    (True = real). Separate self-attention and feed-forward weights per stream; the
    cross-attention sublayer has separate weights per direction (ViLBERT's co-attention) or, with
    ``shared_cross``, one sublayer serves both directions (LXMERT)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        shared_cross: bool = False,
    ):
        super().__init__()
        sizes = dict(
            hidden_size=hidden_size,
            num_heads=num_heads,
            hidden_dropout=hidden_dropout,
            attention_dropout=attention_dropout,
            layer_norm_eps=layer_norm_eps,
        )
        self.a_cross = CrossAttentionSublayer(**sizes)
        self.b_cross = self.a_cross if shared_cross else CrossAttentionSublayer(**sizes)
        self.a_self = TransformerLayer(intermediate_size=intermediate_size, **sizes)
        self.b_self = TransformerLayer(intermediate_size=intermediate_size, **sizes)

    def forward(
        self, a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a_new = self.a_cross(a, b, b_mask)
        b_new = self.b_cross(b, a, a_mask)
        return self.a_self(a_new, a_mask[:, None, None, :]), self.b_self(b_new, b_mask[:, None, None, :])
