"""Pictures of what a model learned (``tools/visualize.py`` is the command line).

- :func:`attention_grid`: the self-attention maps of every layer and head for one image-text
  pair, as one PNG grid (the patterns of UNITER's Fig. 2: diagonal, vertical, block, mixed).
- :func:`word_region_attention`: how much one word attends to each region, as boxes on the
  image plane shaded by that weight (Fig. 3).
- :func:`training_curves`: the training losses from ``metrics.jsonl``, one panel per task,
  smoothed, with the validation points.

The weights come from the explicit attention path of ``vlframe.modules.transformer``
(``attention_weights``), used only here: training runs SDPA and never forms them.
Matplotlib runs on its Agg backend (files only, no display).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlframe.modules.transformer import attention_weights

__all__ = [
    "PairAttention", "attention_grid", "example_batch", "load_model_and_data", "pair_attention", "pick_word", "read_metrics",
    "training_curves", "word_region_attention",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


@dataclass
class PairAttention:
    """The attention of one image-text pair: ``maps`` [layers, heads, L, L] over the packed
    sequence (the ``text_len`` words first, then the ``num_regions`` regions), the ``tokens``
    and the region boxes ``boxes`` [num_regions, 4] (x1, y1, x2, y2, normalised)."""

    maps: torch.Tensor
    tokens: list[str]
    boxes: torch.Tensor

    @property
    def text_len(self) -> int:
        return len(self.tokens)

    @property
    def num_regions(self) -> int:
        return self.boxes.shape[0]


@torch.no_grad()
def pair_attention(model: torch.nn.Module, batch, tokens: Sequence[str]) -> PairAttention:
    """Run ``model`` on a one-example ``batch`` with the explicit attention path, in eval mode.
    ``tokens``: the example's words (for the labels)."""
    if batch.size != 1:
        raise ValueError(f"pair_attention: expected a batch of one example, got {batch.size}")
    was_training = model.training
    model.eval()
    try:
        with attention_weights(model) as maps:
            out = model(batch)
    finally:
        model.train(was_training)
    if not maps:
        raise ValueError(f"{type(model).__name__} has no vlframe SelfAttention layer to read weights from")
    text_len, num_regions = int(batch.text_mask[0].sum()), int(batch.img_mask[0].sum())
    length = int(out.sequence_mask[0].sum())
    if length != text_len + num_regions:
        raise ValueError(f"packed sequence of {length} positions != {text_len} words + {num_regions} regions")
    stacked = torch.stack([m[0, :, :length, :length] for m in maps]).float().cpu()
    return PairAttention(stacked, list(tokens)[:text_len], batch.img_pos[0, :num_regions, :4].float().cpu())


def load_model_and_data(config: str, checkpoint: str | None, *, split: str = "val", overrides: Sequence[str] = ()):
    """The model of ``config`` with the weights of ``checkpoint`` (a vlframe checkpoint or
    exported ``.safetensors``; None = the config's own initialisation) and its ``data.<split>``."""
    from vlframe.config import load_and_validate
    from vlframe.engine import checkpoint as ckpt
    from vlframe.registry import DATASETS, MODELS, build, import_custom

    cfg = load_and_validate(config, list(overrides))
    import_custom(list(cfg.get("custom_imports") or []))
    node = cfg.data.get(split)
    if node is None:
        raise ValueError(f"{config}: no data.{split} split")
    dataset = build(node, DATASETS, where=f"data.{split}")
    model = build(cfg.model, MODELS, where="model")
    if checkpoint:
        weights = ckpt.load(checkpoint)["model"]
        own = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        if not own:
            raise ValueError(f"{checkpoint}: no model.* weights (not a vlframe checkpoint)")
        report = ckpt.load_weights(model, own, source=checkpoint)
        if report.initialised:
            raise ValueError(f"{checkpoint}: lacks model weights {report.initialised[:5]} of {config}'s model")
    return model.eval(), dataset


def example_batch(dataset, index: int):
    """Example ``index`` of ``dataset`` as a one-example batch, and its word pieces."""
    from vlframe.data.batch import collate
    from vlframe.data.tokenizer import build_tokenizer

    if not 0 <= index < len(dataset):
        raise ValueError(f"example index {index} outside the dataset's {len(dataset)} examples")
    ex = dataset[index]
    batch = collate([ex], soft_labels=False)
    return batch, build_tokenizer().convert_ids_to_tokens(ex.input_ids.tolist())


def pick_word(tokens: Sequence[str], word: str | None) -> int:
    """Index of ``word`` in ``tokens``: an integer index, a word piece, or None for the last
    word piece before [SEP] that is not punctuation (in a caption, usually the object's name)."""
    if word is None:
        body = [i for i, t in enumerate(tokens) if t.isalpha() and not (t.startswith("[") and t.endswith("]"))]
        if not body:
            raise ValueError(f"no word in {list(tokens)}")
        return body[-1]
    if word.lstrip("-").isdigit():
        return int(word) % len(tokens)
    if word not in tokens:
        raise ValueError(f"word {word!r} is not among the tokens {list(tokens)}")
    return list(tokens).index(word)


def attention_grid(att: PairAttention, path: str, *, title: str = "") -> str:
    """Every layer (rows) and head (columns) as a heat map; lines split words from regions."""
    plt = _pyplot()
    layers, heads = att.maps.shape[:2]
    cell = 2.2
    fig, axes = plt.subplots(layers, heads, figsize=(cell * heads, cell * layers + 0.6), squeeze=False)
    t = att.text_len - 0.5
    for i in range(layers):
        for j in range(heads):
            ax = axes[i][j]
            ax.imshow(att.maps[i, j].numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.axhline(t, color="white", lw=0.6)
            ax.axvline(t, color="white", lw=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {j}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=8)
    fig.suptitle(title or f"attention: {att.text_len} words | {att.num_regions} regions (query rows, key columns)", fontsize=9)
    return _save(fig, path)


def word_region_attention(att: PairAttention, word: int, path: str, *, layer: int = -1) -> str:
    """Attention of word ``word`` (index into ``att.tokens``) to each region at ``layer``,
    averaged over heads and renormalised over the regions, drawn as boxes shaded by weight."""
    if not 0 <= word < att.text_len:
        raise ValueError(f"word index {word} outside the {att.text_len} words {att.tokens}")
    if att.num_regions == 0:
        raise ValueError("the example has no region")
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    w = att.maps[layer, :, word, att.text_len :].mean(0)
    w = w / w.sum().clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(5, 5.4))
    cmap = plt.get_cmap("magma_r")
    for k in torch.argsort(w).tolist():  # strongest last, on top
        x1, y1, x2, y2 = att.boxes[k].tolist()
        v = float(w[k] / w.max())
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=cmap(v), alpha=0.15 + 0.6 * v,
                               edgecolor=cmap(v), lw=0.5 + 2.5 * v))
        if v > 0.5:
            ax.text(x1, y1, f"{float(w[k]):.2f}", fontsize=7, va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.set_title(f"'{att.tokens[word]}' -> regions (layer {layer % att.maps.shape[0]}, mean of heads; "
                 f"uniform {1 / att.num_regions:.2f})", fontsize=9)
    return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl``; a bad line is an error naming the file and line."""
    from vlframe.io import open_path

    out = []
    with open_path(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record: {e.msg}") from None
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError(f"{path}:{n}: a record needs a 'step'")
            out.append(rec)
    return out


def _ema(values: list[float], weight: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def training_curves(metrics_path: str, path: str, *, smooth: float = 0.9, key: str = "loss") -> str:
    """One panel per task: ``train/<task>/<key>`` against step (faint raw, bold smoothed by an
    exponential moving average of weight ``smooth``), and every ``val/<task>/*`` metric as
    points on the right axis."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    train: dict[str, list[tuple[int, float]]] = defaultdict(list)
    val: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in read_metrics(metrics_path):
        for k, v in rec.items():
            parts = k.split("/")
            if len(parts) != 3 or not isinstance(v, (int, float)):
                continue
            split, task, name = parts
            if split == "train" and name == key:
                train[task].append((rec["step"], float(v)))
            elif split == "val":
                val[task][name].append((rec["step"], float(v)))
    tasks = sorted(set(train) | set(val))
    if not tasks:
        raise ValueError(f"{metrics_path}: no train/<task>/{key} or val/<task>/* values")
    plt = _pyplot()
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip((a for row in axes for a in row), tasks):
        if train[task]:
            steps, values = zip(*sorted(train[task]))
            ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8)
            ax.plot(steps, _ema(list(values), smooth), color="tab:blue", lw=1.6, label=f"train {key}")
            ax.set_ylabel(f"train {key}")
        if val[task]:
            right = ax.twinx()
            for i, (name, points) in enumerate(sorted(val[task].items())):
                s, v = zip(*sorted(points))
                right.plot(s, v, marker="o", ms=4, lw=0.8, ls="--", color=f"C{(i + 1) % 10}", label=f"val {name}")
            right.legend(fontsize=6, loc="upper right")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step")
    for ax in [a for row in axes for a in row][len(tasks) :]:
        ax.axis("off")
    return _save(fig, path)


def _save(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
