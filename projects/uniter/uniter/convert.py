"""Key mapping between vlframe's UNITER and the layouts weights come in.

- BERT checkpoints in transformers' layout (``BertModel``, optionally prefixed ``bert.``): the
  text embedder, the shared type table, the encoder and the pooler.
- The original UNITER checkpoints (``uniter.*`` backbone; key list in
  ``shared/fixtures/uniter_base_state_dict_keys.txt``), whole: backbone plus the pretraining
  heads <-> vlframe's ``VLModule`` layout (``model.*``, ``tasks.<name>.head.*``), see
  :func:`original_to_vlframe` / :func:`vlframe_to_original`; ``tools/convert_checkpoint.py`` is
  the command line.

The mapping is a table of regular expressions, one home for both directions.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from vlframe import io as vio
from vlframe.engine.checkpoint import WeightsReport, save_safetensors

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
    if vio.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if vio.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if not vio.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(vio.local_path(path))
    from vlframe.engine.checkpoint import load

    obj = load(path)  # weights_only, through the path manager; a CheckpointError (ValueError) names the file
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: not a state dict: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    return dict(obj)


def detect_prefix(state: Mapping[str, torch.Tensor]) -> str:
    for prefix in ("uniter.", "bert.", "module.uniter.", "module.bert.", ""):
        if any(k.startswith(prefix + "encoder.layer.0.") for k in state):
            return prefix
    raise ValueError("not a BERT/UNITER checkpoint: no 'encoder.layer.0.*' key under any known prefix")


def load_pretrained(model: torch.nn.Module, path: str) -> WeightsReport:
    """Load backbone weights from ``path`` into a ``UniterModel``: a BERT checkpoint in
    transformers' layout (folder, ``.safetensors`` or torch file; the L2 setting), an original
    UNITER checkpoint, or a vlframe checkpoint / exported ``.safetensors`` (``model.*`` keys).

    Returns the report: model keys copied, model keys left at their initial values (e.g. the
    image embedder when starting from BERT) and checkpoint keys not used (as the file names
    them). A shape mismatch is an error naming the key.
    """
    state = read_state_dict(path)
    if any(k.startswith("model.encoder.layers.0.") for k in state):  # vlframe's own layout
        mapped = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        origin = {k: "model." + k for k in mapped}
    else:
        prefix = detect_prefix(state)
        mapped, origin = {}, {}
        for key, value in state.items():
            for new, v in backbone_from_original({key: value}, prefix=prefix).items():
                mapped[new], origin[new] = v, key
    own = model.state_dict()
    for k, v in mapped.items():
        if k not in own:
            raise KeyError(f"{path}: {origin[k]} (-> {k}) does not exist in the model")
        if own[k].shape != v.shape:
            raise ValueError(
                f"{path}: {origin[k]} (-> {k}): checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}"
            )
    model.load_state_dict(mapped, strict=False)
    used = set(origin.values())
    return WeightsReport(
        source=path,
        copied=sorted(mapped),
        initialised=sorted(set(own) - set(mapped)),
        unused=sorted(k for k in state if k not in used and not _IGNORED.search(k)),
    )


# ---------------------------------------------------------------------------------------------
# Whole pretraining checkpoints: the original ``UniterForPretraining`` <-> vlframe's ``VLModule``
# (``model.*`` = UniterModel, ``tasks.<name>.head.*`` = one head per task).
# ---------------------------------------------------------------------------------------------

#: vlframe pretraining tasks the original has weights for, in the order they are produced.
DEFAULT_TASKS: tuple[str, ...] = ("mlm", "mrfr", "mrc", "mrc_kl", "itm")

# Per task: (original name, name inside ``tasks.<name>.head.``). A trailing "." is a module whose
# weight and bias both map; otherwise a single parameter.
_HEAD_RULES: dict[str, list[tuple[str, str]]] = {
    "mlm": [
        ("cls.predictions.transform.dense.", "transform.dense."),
        ("cls.predictions.transform.LayerNorm.", "transform.norm."),
        ("cls.predictions.bias", "bias"),
    ],
    "mrfr": [
        ("feat_regress.net.0.", "transform.dense."),
        ("feat_regress.net.2.", "transform.norm."),
        ("feat_regress.bias", "bias"),
    ],
    # The original shares one region classifier between MRC and MRC-kl; vlframe has one per task.
    "mrc": [
        ("region_classifier.net.0.", "transform.dense."),
        ("region_classifier.net.2.", "transform.norm."),
        ("region_classifier.net.3.", "out."),
    ],
    "itm": [("itm_output.", "")],
}
_HEAD_RULES["mrc_kl"] = _HEAD_RULES["mrc"]

# Original output weights that are the same tensor as a backbone weight, by the task that uses
# them: task -> (head key, backbone key).
_TIED: dict[str, tuple[str, str]] = {
    "mlm": ("cls.predictions.decoder.weight", "uniter.embeddings.word_embeddings.weight"),
    "mrfr": ("feat_regress.weight", "uniter.img_embeddings.img_linear.weight"),
}


def _param_pairs(task: str) -> list[tuple[str, str]]:
    """(original key, key inside the head) for every parameter of ``task``'s head."""
    pairs = []
    for orig, ours in _HEAD_RULES[task]:
        if orig.endswith("."):
            pairs += [(orig + p, ours + p) for p in ("weight", "bias")]
        else:
            pairs.append((orig, ours))
    return pairs


_KNOWN_HEAD_KEYS = {o for t in _HEAD_RULES for o, _ in _param_pairs(t)} | {h for h, _ in _TIED.values()}


def _task_names(tasks: tuple[str, ...] | list[str], names: Mapping[str, str] | None) -> dict[str, str]:
    """vlframe task kind (mlm, mrc_kl, ...) -> the task's name in the user's config."""
    names = dict(names or {})
    unknown = sorted(set(tasks) - set(_HEAD_RULES))
    if unknown:
        raise ValueError(f"tasks: no original weights for {unknown}; known: {list(DEFAULT_TASKS)}")
    bad = sorted(set(names) - set(_HEAD_RULES))
    if bad:
        raise ValueError(f"names: keys must be task kinds {list(DEFAULT_TASKS)}, got {bad}")
    out = {t: str(names.get(t, t)) for t in tasks}
    if len(set(out.values())) != len(out):
        raise ValueError(f"names: two tasks map to the same name: {out}")
    return out


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints saved from a DistributedDataParallel wrapper carry "module." on every key.
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _check_shape(key: str, value: torch.Tensor, expected: tuple[int, ...], why: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{key}: shape {tuple(value.shape)} != expected {tuple(expected)} ({why})")


class Converted(tuple):
    """``(state_dict, unmapped)``: the converted state dict and the input keys that had no home
    (always empty with ``strict=True``, which raises instead)."""

    __slots__ = ()

    def __new__(cls, state_dict: dict[str, torch.Tensor], unmapped: list[str]):
        return super().__new__(cls, (state_dict, unmapped))

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self[0]

    @property
    def unmapped(self) -> list[str]:
        return self[1]


def original_to_vlframe(
    state: Mapping[str, torch.Tensor],
    *,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    names: Mapping[str, str] | None = None,
    strict: bool = True,
    atol: float = 0.0,
) -> Converted:
    """Original ``UniterForPretraining`` state dict -> vlframe ``VLModule`` state dict.

    ``tasks``: which vlframe task kinds get heads (each must have its weights in ``state``);
    ``names``: kind -> task name in the config, e.g. ``{"mrc_kl": "mrckl"}``. Heads of tasks not
    asked for are dropped. The tied outputs (MLM decoder = word embeddings, MRFR output =
    img_linear) must equal their backbone weight within ``atol`` and are then dropped: vlframe's
    heads read them from the model. ``strict``: an original key with no home is an error listing
    every such key; ``strict=False`` returns them in ``.unmapped`` instead.

    The original's ``mask_embedding`` row 0 is dropped: the original overwrites it with zeros at
    every forward pass with masked regions, so it carries nothing.
    """
    state = _strip_module_prefix(state)
    wanted = _task_names(tasks, names)
    if not any(k.startswith("uniter.") for k in state):
        raise ValueError("not an original UNITER checkpoint: no 'uniter.*' key")
    out = {"model." + k: v for k, v in backbone_from_original(state, prefix="uniter.").items()}
    mapped_backbone = {
        k for k in state if k.startswith("uniter.") and (_IGNORED.search(k) or _backbone_key_maps(k[7:]))
    }

    for head_key, owner in _TIED.values():
        if head_key not in state:
            continue
        if owner not in state:
            raise ValueError(f"{head_key} is tied to {owner}, which the checkpoint lacks")
        a, b = state[head_key], state[owner]
        if a.shape != b.shape:
            raise ValueError(
                f"{head_key} should be tied to {owner}, but its shape {tuple(a.shape)} != {tuple(b.shape)}"
            )
        if a.is_meta or b.is_meta or not a.numel():
            continue  # no values to compare (e.g. a key/shape plan on the meta device)
        err = float((a.float() - b.float()).abs().max())
        if err > atol:
            raise ValueError(f"{head_key} should be tied to (equal) {owner}, but differs by up to {err:.3g}")
    origin: dict[str, str] = {}
    for kind, name in wanted.items():
        if kind in _TIED and _TIED[kind][0] not in state:
            raise ValueError(f"task {name!r} ({kind}): the checkpoint lacks its tied output {_TIED[kind][0]}")
        missing = [o for o, _ in _param_pairs(kind) if o not in state]
        if missing:
            raise ValueError(f"task {name!r} ({kind}): the checkpoint lacks {missing}")
        for orig, ours in _param_pairs(kind):
            out[f"tasks.{name}.head.{ours}"] = state[orig]
            origin[f"tasks.{name}.head.{ours}"] = orig
    _check_head_shapes(out, wanted, origin)

    unmapped = sorted(set(state) - mapped_backbone - _KNOWN_HEAD_KEYS)
    if unmapped and strict:
        raise ValueError(f"original checkpoint keys with no vlframe name: {unmapped}")
    return Converted(out, unmapped)


def _backbone_key_maps(k: str) -> bool:
    k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
    return k == _MASK_ORIG or rename_key(k, _FORWARD) is not None


def _check_head_shapes(
    out: Mapping[str, torch.Tensor], wanted: Mapping[str, str], origin: Mapping[str, str] | None = None
) -> None:
    """Head shapes must fit the backbone they are used with (hidden, vocabulary, feature sizes).
    ``origin`` (our key -> input key) lets an error name the key as the input file spells it."""
    word = out.get("model.text_embed.word.weight")
    proj = out.get("model.img_embed.feat_proj.weight")
    if word is None or proj is None:
        raise ValueError("checkpoint lacks the word embeddings or img_linear of the backbone")
    (vocab, hidden), feat_dim = word.shape, proj.shape[1]

    def check(key: str, expected: tuple[int, ...], why: str) -> None:
        name = f"{origin[key]} (-> {key})" if origin and key in origin else key
        _check_shape(name, out[key], expected, why)

    for kind, name in wanted.items():
        p = f"tasks.{name}.head."
        if kind == "itm":
            check(p + "weight", (2, hidden), "Linear(hidden, 2)")
            check(p + "bias", (2,), "Linear(hidden, 2)")
            continue
        check(p + "transform.dense.weight", (hidden, hidden), "hidden size")
        for k in ("transform.dense.bias", "transform.norm.weight", "transform.norm.bias"):
            check(p + k, (hidden,), "hidden size")
        if kind == "mlm":
            check(p + "bias", (vocab,), "vocabulary size of the word embeddings")
        elif kind == "mrfr":
            check(p + "bias", (feat_dim,), "feature size of img_linear")
        else:
            num = out[p + "out.weight"].shape[0]
            check(p + "out.weight", (num, hidden), "Linear(hidden, labels)")
            check(p + "out.bias", (num,), "Linear(hidden, labels)")


def vlframe_to_original(
    state: Mapping[str, torch.Tensor],
    *,
    names: Mapping[str, str] | None = None,
    strict: bool = True,
) -> Converted:
    """vlframe ``VLModule`` state dict -> the original ``UniterForPretraining`` layout.

    Heads are found by task name (``names`` maps kind -> config name as in
    :func:`original_to_vlframe`); only the heads present are written. The tied outputs are
    written as the very tensor of their backbone weight, as the original's state dict holds them.
    The shared region classifier comes from ``mrc_kl`` if present, else ``mrc``. ``strict``: keys
    outside ``model.*`` and the known heads (e.g. a VQA head) are an error; ``strict=False``
    returns them in ``.unmapped``.
    """
    state = _strip_module_prefix(state)
    kinds = _task_names(DEFAULT_TASKS, names)
    backbone = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not backbone:
        raise ValueError("not a vlframe checkpoint: no 'model.*' key")
    out = backbone_to_original(backbone, prefix="uniter.")
    used = {"model." + k for k in backbone}
    present = {kind for kind, name in kinds.items() if any(k.startswith(f"tasks.{name}.head.") for k in state)}
    if "mrc_kl" in present:
        present.discard("mrc")  # one shared region classifier in the original
    for kind in (k for k in DEFAULT_TASKS if k in present):
        p = f"tasks.{kinds[kind]}.head."
        missing = [p + ours for _, ours in _param_pairs(kind) if p + ours not in state]
        if missing:
            raise ValueError(f"task {kinds[kind]!r} ({kind}): the checkpoint lacks {missing}")
        for orig, ours in _param_pairs(kind):
            out[orig] = state[p + ours]
    for kind, (head_key, owner) in _TIED.items():
        if kind in present:
            out[head_key] = out[owner]
    # Every head parameter of a known task counts as used (the mrc copy beside mrc_kl included).
    for kind, name in kinds.items():
        used |= {f"tasks.{name}.head.{ours}" for _, ours in _param_pairs(kind)}
    unmapped = sorted(set(state) - used)
    if unmapped and strict:
        raise ValueError(f"vlframe checkpoint keys with no original name: {unmapped}")
    return Converted(out, unmapped)


def infer_model_kwargs(backbone: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``UniterModel`` size arguments read off a vlframe backbone state dict (no ``model.``)."""
    need = [
        "text_embed.word.weight",
        "text_embed.position.weight",
        "type_embed.weight",
        "encoder.layers.0.ffn_in.weight",
    ]
    missing = [k for k in need if k not in backbone]
    if missing:
        raise ValueError(f"cannot infer the model size: the checkpoint lacks {missing}")
    layers = {int(m.group(1)) for k in backbone if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"encoder layer indices are not 0..n-1: {sorted(layers)}")
    vocab, hidden = backbone["text_embed.word.weight"].shape
    kwargs = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_layers": len(layers),
        "intermediate_size": int(backbone["encoder.layers.0.ffn_in.weight"].shape[0]),
        "max_positions": int(backbone["text_embed.position.weight"].shape[0]),
        "type_vocab_size": int(backbone["type_embed.weight"].shape[0]),
    }
    if "img_embed.feat_proj.weight" in backbone:
        kwargs["img_dim"] = int(backbone["img_embed.feat_proj.weight"].shape[1])
    return kwargs


def bert_to_vlframe(
    path: str, *, img_dim: int = 2048, num_heads: int | None = None, mlm_name: str = "mlm"
) -> dict[str, torch.Tensor]:
    """A transformers BERT checkpoint (folder, ``.safetensors`` or torch file) -> vlframe
    ``VLModule`` state dict: the backbone through :func:`load_pretrained` (the image embedder at
    its initial values) and, when the checkpoint has BERT's MLM head (``cls.predictions.*``),
    ``tasks.<mlm_name>.head`` from it, as the original started its MLM head from BERT's.

    ``num_heads`` only matters for building the model; default: ``config.json`` of a folder,
    else hidden size / 64.
    """
    from projects.uniter.uniter.model import UniterModel

    state = read_state_dict(path)
    kwargs = infer_model_kwargs(backbone_from_original(state, prefix=detect_prefix(state)))
    if num_heads is None:
        num_heads = _heads_from_config(path) or max(1, kwargs["hidden_size"] // 64)
    kwargs.update(img_dim=img_dim, num_heads=num_heads)
    model = UniterModel(**kwargs)
    load_pretrained(model, path)
    out = {"model." + k: v for k, v in model.state_dict().items()}
    head = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in state.items()}
    pairs = _param_pairs("mlm")
    if any(o in head for o, _ in pairs):
        missing = [o for o, _ in pairs if o not in head]
        if missing:
            raise ValueError(f"{path}: BERT MLM head is incomplete, missing {missing}")
        for orig, ours in pairs:
            out[f"tasks.{mlm_name}.head.{ours}"] = head[orig]
        _check_head_shapes(out, {"mlm": mlm_name})
    return out


def _heads_from_config(path: str) -> int | None:
    import json

    cfg = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("num_attention_heads")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str, *, wrap_model: bool) -> None:
    """Write ``state`` to ``path``: ``.safetensors`` (flat), else a torch file, as ``{"model":
    state}`` when ``wrap_model`` (vlframe's checkpoint layout, read by ``train.init_from``)."""
    if path.endswith(".safetensors"):
        save_safetensors(state, path)
        return
    from vlframe.engine.checkpoint import atomic_save

    atomic_save({"model": dict(state)} if wrap_model else dict(state), path)


def convert_file(
    src: str,
    dst: str,
    *,
    source: str,
    target: str,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    names: Mapping[str, str] | None = None,
    strict: bool = True,
    img_dim: int = 2048,
    num_heads: int | None = None,
) -> list[str]:
    """Convert the checkpoint file ``src`` into ``dst``; returns the input keys left out
    (only with ``strict=False``). ``source``/``target``: ``original`` -> ``vlframe``,
    ``vlframe`` -> ``original`` or ``bert`` -> ``vlframe``."""
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"{dst}: is the input; refusing to write over it (give another output path)")
    route = (source, target)
    if route not in {("original", "vlframe"), ("vlframe", "original"), ("bert", "vlframe")}:
        raise ValueError(
            f"cannot convert from {source!r} to {target!r}: use original->vlframe, vlframe->original or bert->vlframe"
        )
    try:
        if source == "bert":
            mlm_name = (names or {}).get("mlm", "mlm")
            state, unmapped = bert_to_vlframe(src, img_dim=img_dim, num_heads=num_heads, mlm_name=mlm_name), []
        elif source == "original":
            state, unmapped = original_to_vlframe(read_state_dict(src), tasks=tasks, names=names, strict=strict)
        else:
            state, unmapped = vlframe_to_original(read_state_dict(src), names=names, strict=strict)
    except (ValueError, KeyError) as e:
        msg = str(e.args[0] if e.args else e)
        raise ValueError(msg if msg.startswith(src) else f"{src}: {msg}") from e
    save_state_dict(state, dst, wrap_model=target == "vlframe")
    return unmapped
