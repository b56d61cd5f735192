"""A two-stream V+L encoder in the LXMERT / ViLBERT family, built from vlframe.modules blocks.

Text: word + position + type -> LN -> dropout, then ``num_text_layers`` self-attention layers.
Regions: (LN(Linear(feature)) + LN(Linear(7-d box))) / 2 -> dropout (LXMERT's visual embedding),
where a masked region has its feature zeroed and a learned mask vector added (as UNITER), then
``num_region_layers`` self-attention layers. Then ``num_cross_layers`` co-attention layers
(vlframe.modules.cross_attention): each stream attends to the other, then to itself; with
``shared_cross`` one cross-attention sublayer serves both directions (LXMERT).

Both streams have width ``hidden_size`` (WRA's cosine OT compares text and region states, so
text_dim == region_dim). Pooled output (ViLBERT's fusion): the element-wise product of the text
pooler, tanh(Linear(h_text[CLS])), and the region pooler, tanh(Linear(mean of the real regions)).
"""
from __future__ import annotations

import torch
from torch import nn

from vlframe.data.batch import VLBatch
from vlframe.models import VLEncoder, VLEncoderOutput, VLEncoderSpec
from vlframe.modules.cross_attention import CoAttentionLayer
from vlframe.modules.transformer import TransformerEncoder, init_bert_weights
from vlframe.registry import MODELS


class TextEmbedding(nn.Module):
    def __init__(self, *, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, dropout: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.drop(self.norm(self.word(input_ids) + self.position(pos)[None] + self.token_type(token_type_ids)))


class RegionEmbedding(nn.Module):
    def __init__(self, *, img_dim: int, hidden_size: int, pos_dim: int = 7, dropout: float):
        super().__init__()
        self.feat_proj = nn.Linear(img_dim, hidden_size)
        self.feat_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.pos_proj = nn.Linear(pos_dim, hidden_size)
        self.pos_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        # Stands in for the (zeroed) feature of a masked region.
        self.mask_embedding = nn.Parameter(torch.zeros(img_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, feat: torch.Tensor, pos: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        if masked is not None:
            # where, not a product: a masked region's feature must not reach the encoder at all.
            feat = torch.where(masked[..., None], self.mask_embedding.to(feat.dtype), feat)
        return self.drop((self.feat_norm(self.feat_proj(feat)) + self.pos_norm(self.pos_proj(pos))) / 2)


@MODELS.register_module(name="TwoStreamModel")
class TwoStreamModel(VLEncoder):
    """``model(batch) -> VLEncoderOutput`` (no joint ``sequence``: the streams stay apart);
    ``model.encode(...)`` takes plain tensors."""

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_text_layers: int = 9,
        num_region_layers: int = 5,
        num_cross_layers: int = 5,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        img_dim: int = 2048,
        init_std: float = 0.02,
        shared_cross: bool = False,
    ):
        super().__init__()
        self.spec = VLEncoderSpec(
            text_dim=hidden_size, region_dim=hidden_size, pooled_dim=hidden_size, vocab_size=vocab_size, feat_dim=img_dim
        )
        self.text_embed = TextEmbedding(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            max_positions=max_positions,
            type_vocab_size=type_vocab_size,
            dropout=hidden_dropout,
        )
        self.region_embed = RegionEmbedding(img_dim=img_dim, hidden_size=hidden_size, dropout=hidden_dropout)
        layer = dict(
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_dropout=hidden_dropout,
            attention_dropout=attention_dropout,
        )
        self.text_encoder = TransformerEncoder(num_layers=num_text_layers, **layer)
        self.region_encoder = TransformerEncoder(num_layers=num_region_layers, **layer)
        self.cross_layers = nn.ModuleList(
            CoAttentionLayer(shared_cross=shared_cross, **layer) for _ in range(num_cross_layers)
        )
        self.text_pooler = nn.Linear(hidden_size, hidden_size)
        self.region_pooler = nn.Linear(hidden_size, hidden_size)
        init_bert_weights(self, std=init_std)

    def tie_targets(self) -> dict[str, nn.Module]:
        return {"word_embeddings": self.text_embed.word, "region_projection": self.region_embed.feat_proj}

    def encode(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> VLEncoderOutput:
        text = self.text_encoder(self.text_embed(input_ids, token_type_ids), text_mask)
        regions = self.region_encoder(self.region_embed(img_feat, img_pos, img_masked), img_mask)
        for layer in self.cross_layers:
            text, regions = layer(text, text_mask, regions, img_mask)
        real = img_mask[..., None]
        region_sum = torch.where(real, regions, torch.zeros((), dtype=regions.dtype, device=regions.device)).sum(1)
        region_mean = region_sum / real.sum(1).clamp(min=1).to(regions.dtype)
        pooled = torch.tanh(self.text_pooler(text[:, 0])) * torch.tanh(self.region_pooler(region_mean))
        return VLEncoderOutput(text, text_mask, regions, img_mask, pooled)

    def forward(self, batch: VLBatch) -> VLEncoderOutput:
        return self.encode(
            batch.input_ids,
            batch.text_mask,
            batch.img_feat,
            batch.img_pos,
            batch.img_mask,
            img_masked=batch.img_masked,
            token_type_ids=batch.token_type_ids,
        )
