"""UNITER (Chen et al., ECCV 2020): one single-stream transformer over words and image regions.

Text embedder: word + position + type(0) -> LN -> dropout. Image embedder: LN(Linear(feature))
+ LN(Linear(7-d box)) + type(1) -> LN -> dropout, where a masked region has its feature zeroed and
a learned mask vector added. The type table is shared by both. Text and regions are packed with
no padding between them (vlframe.modules.packing), run through the post-LN encoder, split back;
the pooler is tanh(Linear(h[CLS])).
"""
from __future__ import annotations

import torch
from torch import nn

from vlframe.data.batch import VLBatch
from vlframe.models import VLEncoder, VLEncoderOutput, VLEncoderSpec
from vlframe.modules.packing import make_packing, pack, unpack
from vlframe.modules.transformer import TransformerEncoder, init_bert_weights
from vlframe.registry import MODELS




class TextEmbedder(nn.Module):
    def __init__(self, *, vocab_size: int, hidden_size: int, max_positions: int, dropout: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, type_embeds: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.norm(self.word(input_ids) + self.position(pos)[None] + type_embeds))


class ImageEmbedder(nn.Module):
    def __init__(self, *, img_dim: int, hidden_size: int, pos_dim: int = 7, dropout: float):
        super().__init__()
        self.feat_proj = nn.Linear(img_dim, hidden_size)
        self.feat_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.pos_proj = nn.Linear(pos_dim, hidden_size)
        self.pos_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        # Added to the (zeroed) features of masked regions only.
        self.mask_embedding = nn.Parameter(torch.zeros(img_dim))
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, feat: torch.Tensor, pos: torch.Tensor, masked: torch.Tensor | None, type_embeds: torch.Tensor
    ) -> torch.Tensor:
        if masked is not None:
            m = masked[..., None].to(feat.dtype)
            feat = feat * (1 - m) + m * self.mask_embedding
        x = self.feat_norm(self.feat_proj(feat)) + self.pos_norm(self.pos_proj(pos)) + type_embeds
        return self.drop(self.norm(x))


@MODELS.register_module(name="UniterModel")
class UniterModel(VLEncoder):
    """``model(batch) -> VLEncoderOutput``; ``model.encode(...)`` takes plain tensors."""

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        img_dim: int = 2048,
        init_std: float = 0.02,
        gradient_checkpointing: bool = False,
        varlen: str = "cuda",
        compile: bool = False,
        compile_backend: str = "inductor",
        length_multiple: int = 1,
        pretrained: str | None = None,
    ):
        super().__init__()
        self.spec = VLEncoderSpec(
            text_dim=hidden_size, region_dim=hidden_size, pooled_dim=hidden_size, vocab_size=vocab_size, feat_dim=img_dim,
            max_text_positions=max_positions,
        )
        self.text_embed = TextEmbedder(
            vocab_size=vocab_size, hidden_size=hidden_size, max_positions=max_positions, dropout=hidden_dropout
        )
        self.type_embed = nn.Embedding(type_vocab_size, hidden_size)
        self.img_embed = ImageEmbedder(img_dim=img_dim, hidden_size=hidden_size, dropout=hidden_dropout)
        self.encoder = TransformerEncoder(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_dropout=hidden_dropout,
            attention_dropout=attention_dropout,
            gradient_checkpointing=gradient_checkpointing,
            varlen=varlen,
            compile=compile,
            compile_backend=compile_backend,
            length_multiple=length_multiple,
        )
        self.pooler = nn.Linear(hidden_size, hidden_size)
        init_bert_weights(self, std=init_std)
        # Named rows of the type table: the pretrained two, plus those tasks add (add_token_type).
        self.token_types: dict[str, int] = {"text": 0, "image": 1}
        self._type_source: dict[int, int] = {}  # added row -> row it was initialised from
        self._register_load_state_dict_pre_hook(self._grow_loaded_types)
        # What ``pretrained`` copied and left fresh; the trainer prints and logs it.
        self.init_report = self.load_pretrained(pretrained) if pretrained else None

    def load_pretrained(self, path: str):
        """Copy backbone weights from ``path`` (a BERT checkpoint in transformers' layout, an
        original UNITER or a vlframe checkpoint / ``.safetensors``); the image side stays fresh
        when the file has none. Returns a ``vlframe.engine.checkpoint.WeightsReport``; a shape
        mismatch is an error naming the key. ``train.init_from`` reaches this for files that are
        not in vlframe's own layout."""
        from projects.uniter.uniter.convert import load_pretrained

        return load_pretrained(self, path)

    def runs_real_units(self, device: torch.device | str) -> bool:
        """Whether a batch on ``device`` costs its real units (packed encoder), not padded ones."""
        return self.encoder.uses_varlen(device)

    def tie_targets(self) -> dict[str, nn.Module]:
        # The modules tied heads reuse (the model stays their single owner).
        return {"word_embeddings": self.text_embed.word, "region_projection": self.img_embed.feat_proj}

    def add_token_type(self, name: str, *, like: str) -> int:
        if name in self.token_types:
            return self.token_types[name]
        if like not in ("text", "image"):
            raise ValueError(f"add_token_type({name!r}): like must be 'text' or 'image', got {like!r}")
        src = self.token_types[like]
        old = self.type_embed.weight.data
        grown = nn.Embedding(old.shape[0] + 1, old.shape[1]).to(device=old.device, dtype=old.dtype)
        grown.weight.data.copy_(torch.cat([old, old[src : src + 1]]))
        self.type_embed = grown
        new_id = old.shape[0]
        self.token_types[name] = new_id
        self._type_source[new_id] = src
        return new_id

    def _grow_loaded_types(self, state_dict, prefix, *args) -> None:
        # A checkpoint from before add_token_type (e.g. the pretrained one) has fewer rows: the
        # added rows start as copies of their source rows of *that* checkpoint, as the original.
        key = prefix + "type_embed.weight"
        w = state_dict.get(key)
        rows = self.type_embed.weight.shape[0]
        if w is None or w.shape[0] >= rows or any(i not in self._type_source for i in range(w.shape[0], rows)):
            return  # nothing to grow (a real size mismatch is load_state_dict's error)
        extra = [w[self._type_source[i]] for i in range(w.shape[0], rows)]
        state_dict[key] = torch.cat([w, torch.stack(extra)])

    def encode(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        img_type_ids: torch.Tensor | None = None,
    ) -> VLEncoderOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if img_type_ids is None:
            img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        text = self.text_embed(input_ids, self.type_embed(token_type_ids))
        regions = self.img_embed(img_feat, img_pos, img_masked, self.type_embed(img_type_ids))
        p = make_packing(text_mask, img_mask)
        seq = self.encoder(pack(text, regions, p), p.mask)
        text_out, region_out = unpack(seq, p)
        pooled = torch.tanh(self.pooler(seq[:, 0]))
        return VLEncoderOutput(text_out, text_mask, region_out, img_mask, pooled, sequence=seq, sequence_mask=p.mask)

    def forward(self, batch: VLBatch) -> VLEncoderOutput:
        return self.encode(
            batch.input_ids,
            batch.text_mask,
            batch.img_feat,
            batch.img_pos,
            batch.img_mask,
            img_masked=batch.img_masked,
            token_type_ids=batch.token_type_ids,
            img_type_ids=batch.img_type_ids,
        )
