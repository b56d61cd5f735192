"""Key mapping between vlframe's UNITER and the layouts weights come in.

- BERT checkpoints in transformers' layout (``BertModel``, optionally prefixed ``bert.``): the
  text embedder, the shared type table, the encoder and the pooler.
- The original UNITER checkpoints (``uniter.*`` backbone; key list in
  ``shared/fixtures/uniter_base_state_dict_keys.txt``).

The mapping is a table of regular expressions, one home for both directions.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

# (original name, vlframe name) for the backbone, without the "uniter."/"bert." prefix; {i} is a
# layer index and {qkv} one of query/key/value. Read left-to-right to import, right-to-left to export.
_BACKBONE_RULES: list[tuple[str, str]] = [
    ("embeddings.word_embeddings.", "text_embed.word."),
    ("embeddings.position_embeddings.", "text_embed.position."),
    ("embeddings.token_type_embeddings.", "type_embed."),
    ("embeddings.LayerNorm.", "text_embed.norm."),
    ("img_embeddings.img_linear.", "img_embed.feat_proj."),
    ("img_embeddings.img_layer_norm.", "img_embed.feat_norm."),
    ("img_embeddings.pos_linear.", "img_embed.pos_proj."),
    ("img_embeddings.pos_layer_norm.", "img_embed.pos_norm."),
    ("img_embeddings.LayerNorm.", "img_embed.norm."),
    ("encoder.layer.{i}.attention.self.{qkv}.", "encoder.layers.{i}.attn.{qkv}."),
    ("encoder.layer.{i}.attention.output.dense.", "encoder.layers.{i}.attn.out."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "encoder.layers.{i}.attn_norm."),
    ("encoder.layer.{i}.intermediate.dense.", "encoder.layers.{i}.ffn_in."),
    ("encoder.layer.{i}.output.dense.", "encoder.layers.{i}.ffn_out."),
    ("encoder.layer.{i}.output.LayerNorm.", "encoder.layers.{i}.ffn_norm."),
    ("pooler.dense.", "pooler."),
]
_IGNORED = re.compile(r"(^|\.)position_ids$")
_MASK_ORIG, _MASK_OURS = "img_embeddings.mask_embedding.weight", "img_embed.mask_embedding"


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{qkv\}", r"(?P<qkv>query|key|value)")
    return re.compile("^" + rx)


_FORWARD = [(_template_regex(a), b) for a, b in _BACKBONE_RULES]
_BACKWARD = [(_template_regex(b), a) for a, b in _BACKBONE_RULES]


def rename_key(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for rx, template in table:
        m = rx.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end() :]
    return None


def backbone_from_original(state: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Original UNITER / BERT backbone keys (after ``prefix``) -> vlframe ``UniterModel`` keys.

    Keys outside the backbone are ignored (the heads are mapped by their own converters).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix) or _IGNORED.search(key):
            continue
        k = key[len(prefix) :]
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))  # old TF-ported names
        if k == _MASK_ORIG:
            out[_MASK_OURS] = value[1].clone()  # the original forces row 0 to zero; row 1 is the vector
            continue
        new = rename_key(k, _FORWARD)
        if new is not None:
            out[new] = value
    return out


def backbone_to_original(state: Mapping[str, torch.Tensor], *, prefix: str = "uniter.") -> dict[str, torch.Tensor]:
    """vlframe ``UniterModel`` keys -> the original layout (the inverse of backbone_from_original)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _MASK_OURS:
            out[prefix + _MASK_ORIG] = torch.stack([torch.zeros_like(value), value])
            continue
        new = rename_key(key, _BACKWARD)
        if new is None:
            raise KeyError(f"no original name for vlframe key {key!r}")
        out[prefix + new] = value
    return out


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a transformers folder, or a torch file (weights only)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    return dict(obj)


def detect_prefix(state: Mapping[str, torch.Tensor]) -> str:
    for prefix in ("uniter.", "bert.", "module.uniter.", "module.bert.", ""):
        if any(k.startswith(prefix + "encoder.layer.0.") for k in state):
            return prefix
    raise ValueError("not a BERT/UNITER checkpoint: no 'encoder.layer.0.*' key under any known prefix")


def load_pretrained(model: torch.nn.Module, path: str, *, strict_backbone: bool = True) -> list[str]:
    """Load BERT or original-UNITER backbone weights from ``path`` into a ``UniterModel``.

    Returns the model keys left at their initial values (e.g. the image embedder when starting
    from BERT). A shape mismatch is an error naming the key. The word table may be larger in the
    checkpoint than in the model only if ``strict_backbone`` is False.
    """
    state = read_state_dict(path)
    mapped = backbone_from_original(state, prefix=detect_prefix(state))
    own = model.state_dict()
    for k, v in mapped.items():
        if k not in own:
            raise KeyError(f"{path}: mapped key {k!r} does not exist in the model")
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: {k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    model.load_state_dict(mapped, strict=False)
    return sorted(set(own) - set(mapped))
