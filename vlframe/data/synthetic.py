"""The synthetic vision-and-language world: vlframe's embedded default data.

Every image is a hidden *scene*: 3-6 objects (``in`` domain; 4-8 in ``out``), each with a class
(32 classes in 7 super-categories, every name one whole word of the bert-base-uncased vocabulary),
a colour (10), a size (small/large) and a box; plus background. A simulated detector turns the scene into regions the
way a Faster R-CNN does: one confident main box per object, sometimes 1-2 less confident
duplicate/part boxes, and low-confidence clutter boxes, so the number of regions varies per image.
Region features are non-negative vectors (like ReLU-pooled CNN features) built from fixed random
sparse per-class, per-colour and per-size prototypes, a small position-dependent part and noise; the
detector's soft labels are peaked on the true class, leak mass to classes of the same
super-category (more for small objects and parts) and put ``1 - conf`` on background (index 0).
Captions state only what is true of the scene (attributes, counts, spatial relations), so MLM on
colour/class words, MRC and ITM are all learnable from the regions. Like COCO captions they mostly
name two or three objects, large (salient) objects more often than small ones.

Two domains: ``in`` (COCO-like: short "a small red dog to the left of a blue car." captions) and
``out`` (Conceptual-Captions-like: other class frequencies, more objects and clutter, larger
images, noisier and shifted features, another caption style), for in- vs out-of-domain studies.

Layout of a world folder (every file is written by the ordinary stores, the same format as real
data)::

    regions/                 RegionStore of every image (both domains, both splits)
    texts/<domain>_<split>/  TextStore per domain and split, tokenised with the default
                             tokenizer (ids without CLS/SEP); extra = {"domain", "template",
                             "objects": indices of the scene objects the caption mentions}
    scenes.jsonl             one hidden scene per line, in image order (see below)
    meta.json                generator parameters, vocabularies, super-categories, counts,
                             format version; written last, marks a complete world

A scene line is ``{"img_id", "domain", "split", "width", "height", "objects": [{"cls", "label",
"supercat", "colour", "size", "box": [x1, y1, x2, y2] normalised}], "regions": [{"object": index
into objects or -1 for clutter, "kind": "main"|"duplicate"|"part"|"clutter", "box", "conf"}]}``;
``regions`` is in the region store's order (confidence descending), so region i of the store is
``regions[i]``. The scene holds everything later tasks derive their annotation from: VQA questions
(counts, colours, existence of a class), referring expressions (an object whose class+colour or
class+size is unique in its scene -> its main region as the target), image-pair statements
(NLVR2-like counts and attribute comparisons across two scenes), entailment hypotheses (true,
contradicted or unsupported statements about a scene) and retrieval (captions <-> images).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import itertools
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from vlframe.data.stores import RegionStoreWriter, TextStoreWriter

__all__ = [
    "CLASSES", "SUPERCATS", "COLOURS", "SIZES", "WORLD_FORMAT_VERSION",
    "generate_world", "ensure_world", "world_params", "load_scenes", "register_cli", "caption_holds",
]

WORLD_FORMAT_VERSION = 2  # 2: flatter in-domain classes, 3-6 objects, sparse features, salient captions

SUPERCATS: dict[str, list[str]] = {
    "animal": ["dog", "cat", "horse", "bird", "cow", "sheep"],
    "vehicle": ["car", "bus", "truck", "boat", "bicycle", "train"],
    "furniture": ["chair", "table", "bed", "couch", "bench"],
    "food": ["apple", "banana", "pizza", "cake"],
    "kitchen": ["cup", "bottle", "bowl", "plate"],
    "object": ["ball", "book", "clock", "lamp"],
    "plant": ["tree", "flower", "plant"],
}
CLASSES: list[str] = [c for cs in SUPERCATS.values() for c in cs]  # label = index + 1 (0 = background)
SUPERCAT_OF: dict[str, str] = {c: s for s, cs in SUPERCATS.items() for c in cs}
_PLURAL_IRREGULAR = {"sheep": "sheep", "bus": "buses", "couch": "couches", "bench": "benches"}
PLURALS: dict[str, str] = {c: _PLURAL_IRREGULAR.get(c, c + "s") for c in CLASSES}
COLOURS: list[str] = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "gray"]
SIZES: list[str] = ["small", "large"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
TOKENIZER_NAME = "bert-base-uncased"


# Per-domain scene distributions. ``boost`` multiplies the frequency of a super-category's classes,
# on top of Zipf-like class frequencies 1 / (1 + rank) ** zipf over a seeded random ranking.
_DOMAINS: dict[str, dict[str, Any]] = {
    # COCO-like: animals and vehicles common. Milder skew than COCO's: with a few dominant classes
    # most random negatives of ITM would contain the caption's classes, and a tiny model trained
    # from scratch gets almost no class-level matching signal to start from (measured: 24% of
    # random negatives held every mentioned class at zipf 0.6, 6% now).
    "in": {"boost": {"animal": 1.5, "vehicle": 1.3, "kitchen": 1.2}, "zipf": 0.3, "objects": (3, 6),
           "clutter": (4, 14), "noise": 1.0, "shift": 0.0, "size_wh": ((560, 720), (400, 560))},
    # CC-like: food, furniture and plants common, more objects and clutter, larger images
    "out": {"boost": {"food": 3.0, "furniture": 2.5, "plant": 2.5}, "zipf": 0.6, "objects": (4, 8),
            "clutter": (8, 24), "noise": 1.3, "shift": 0.25, "size_wh": ((800, 1024), (450, 768))},
}


def _domain_settings(domain: str, num_classes: int, rng_world: np.random.Generator) -> dict[str, Any]:
    """Per-domain distributions. ``rng_world`` draws the class frequencies (deterministic per seed)."""
    if domain not in _DOMAINS:
        raise ValueError(f"synthetic world: unknown domain {domain!r} (expected 'in' or 'out')")
    d = _DOMAINS[domain]
    ranks = rng_world.permutation(num_classes)
    freq = 1.0 / (1.0 + ranks) ** d["zipf"] * np.array([d["boost"].get(SUPERCAT_OF[c], 1.0) for c in CLASSES])
    return {"class_p": freq / freq.sum(), **{k: d[k] for k in ("objects", "clutter", "noise", "shift", "size_wh")}}


class _Prototypes:
    """Fixed random feature prototypes of the world (one draw per seed)."""

    def __init__(self, rng: np.random.Generator, feat_dim: int, num_bg: int = 6):
        # Sparse (~16% active units, like ReLU-pooled CNN features): prototypes of different
        # classes share few units, so a region's class/colour is most of its feature rather than a
        # small change on a large common part (dense prototypes: 0.61 cosine between main regions
        # of different classes, and cross-modal alignment did not start within the demo budget).
        def proto(n: int, scale: float) -> np.ndarray:
            return np.maximum(rng.normal(-1.0, 1.0, (n, feat_dim)), 0.0).astype(np.float32) * (2.0 * scale)

        self.cls = proto(len(CLASSES), 1.0)
        self.supercat = proto(len(SUPERCATS), 0.5)
        self.colour = proto(len(COLOURS), 0.7)
        self.size = proto(len(SIZES), 0.3)
        self.part = proto(1, 0.4)[0]
        self.bg = proto(num_bg, 0.8)
        self.pos = rng.normal(0.0, 0.15, (5, feat_dim)).astype(np.float32)  # cx, cy, w, h, 1
        self.out_shift = np.abs(rng.normal(0.0, 1.0, feat_dim)).astype(np.float32)
        self.supercat_index = np.array([list(SUPERCATS).index(SUPERCAT_OF[c]) for c in CLASSES])


def _clip_box(b: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in b)
    return np.array([x1, y1, min(max(x2, x1 + 0.01), 1.0), min(max(y2, y1 + 0.01), 1.0)])


_SAME_SUPERCAT = np.array([[SUPERCAT_OF[a] == SUPERCAT_OF[b] and a != b for b in CLASSES] for a in CLASSES])


def _soft_labels(rng: np.random.Generator, labels: np.ndarray, conf: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """[K, C+1] detector distributions: ``1 - conf`` on background (index 0), ``conf`` over the
    classes, peaked on the true label with leakage to its super-category (``confusion`` in [0, 1]
    scales it); clutter (label 0) is peaked on a random class."""
    k, c = len(labels), len(CLASSES)
    logits = rng.normal(0.0, 0.4, (k, c))
    obj = labels > 0
    rows = np.flatnonzero(obj)
    logits[obj] += _SAME_SUPERCAT[labels[obj] - 1] * (1.0 + 1.5 * confusion[obj])[:, None]
    logits[rows, labels[obj] - 1] += 4.0 - 1.8 * confusion[obj]
    clutter = np.flatnonzero(~obj)
    logits[clutter, rng.integers(c, size=len(clutter))] += 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p *= (conf / p.sum(1))[:, None]
    return np.concatenate([(1.0 - conf)[:, None], p], 1).astype(np.float32)


def _make_scene(idx: int, domain: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 1, ("in", "out").index(domain), idx])
    (wlo, whi), (hlo, hhi) = settings["size_wh"]
    width, height = int(rng.integers(wlo, whi + 1)), int(rng.integers(hlo, hhi + 1))
    lo, hi = settings["objects"]
    n = int(rng.integers(lo, hi + 1))
    objects = []
    for _ in range(n):
        ci = int(rng.choice(len(CLASSES), p=settings["class_p"]))
        size = SIZES[int(rng.random() < 0.5)]
        side = rng.uniform(0.08, 0.22, 2) if size == "small" else rng.uniform(0.3, 0.55, 2)
        x1, y1 = rng.uniform(0.0, 1.0 - side[0]), rng.uniform(0.0, 1.0 - side[1])
        objects.append({
            "cls": CLASSES[ci], "label": ci + 1, "supercat": SUPERCAT_OF[CLASSES[ci]],
            "colour": COLOURS[int(rng.integers(len(COLOURS)))], "size": size,
            "box": [round(float(v), 4) for v in (x1, y1, x1 + side[0], y1 + side[1])],
        })
    return {"img_id": f"{domain}{idx:06d}", "domain": domain, "width": width, "height": height,
            "objects": objects, "_rng": rng}


def _detect(scene: dict[str, Any], settings: dict[str, Any], protos: _Prototypes,
            regions_range: tuple[int, int], dup_prob: float) -> dict[str, Any]:
    """Simulated detector: regions (boxes, conf, soft labels, features) for a scene."""
    rng: np.random.Generator = scene.pop("_rng")
    regions: list[dict[str, Any]] = []
    for j, ob in enumerate(scene["objects"]):
        box = np.array(ob["box"])
        wh = box[2:] - box[:2]
        small = ob["size"] == "small"
        main = _clip_box(box + rng.normal(0.0, 0.01, 4))
        regions.append({"object": j, "kind": "main", "box": main,
                        "conf": rng.uniform(0.55, 0.85) if small else rng.uniform(0.75, 0.99)})
        if rng.random() < dup_prob:
            for _ in range(int(rng.integers(1, 3))):
                if rng.random() < 0.5:  # duplicate: a jittered copy
                    b, kind = box + rng.normal(0.0, 0.06, 4) * np.concatenate([wh, wh]), "duplicate"
                else:  # part: a sub-box
                    fx, fy = rng.uniform(0.3, 0.6, 2)
                    ox, oy = rng.uniform(0.0, 1.0 - fx), rng.uniform(0.0, 1.0 - fy)
                    b = np.array([box[0] + ox * wh[0], box[1] + oy * wh[1], 0, 0])
                    b[2:] = b[:2] + wh * (fx, fy)
                    kind = "part"
                regions.append({"object": j, "kind": kind, "box": _clip_box(b), "conf": rng.uniform(0.15, 0.6)})
    lo, hi = regions_range
    clo, chi = settings["clutter"]
    total = int(np.clip(len(regions) + rng.integers(clo, chi + 1), lo, hi))
    if total < len(regions):  # too many object regions for the range: keep mains, then confident others
        keep = sorted(range(len(regions)), key=lambda r: (regions[r]["kind"] != "main", -regions[r]["conf"]))
        regions = [regions[r] for r in sorted(keep[:total])]
    for _ in range(total - len(regions)):
        wh = rng.uniform(0.05, 0.6, 2)
        xy = rng.uniform(0.0, 1.0 - wh)
        regions.append({"object": -1, "kind": "clutter", "box": _clip_box(np.concatenate([xy, xy + wh])),
                        "conf": float(rng.beta(1.5, 4.0) * 0.6)})

    k, d = len(regions), protos.cls.shape[1]
    feats = np.empty((k, d), np.float32)
    labels = np.zeros(k, np.int64)
    confusion = np.zeros(k)
    boxes = np.stack([r["box"] for r in regions]).astype(np.float32)
    conf = np.array([r["conf"] for r in regions], np.float32)
    geo = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2], np.ones((k, 1))], 1)
    pos = geo.astype(np.float32) @ protos.pos
    noise = rng.normal(0.0, 1.0, (k, d)).astype(np.float32) * (0.35 * settings["noise"])
    for i, r in enumerate(regions):
        if r["object"] < 0:
            f = protos.bg[rng.integers(len(protos.bg))] + 0.3 * protos.cls[rng.integers(len(CLASSES))]
            noise[i] *= 1.5
        else:
            ob = scene["objects"][r["object"]]
            ci, small = ob["label"] - 1, ob["size"] == "small"
            w = {"main": 1.0, "duplicate": 0.85, "part": 0.65}[r["kind"]]
            f = (w * protos.cls[ci] + 0.5 * protos.supercat[protos.supercat_index[ci]]
                 + w * protos.colour[COLOURS.index(ob["colour"])] + protos.size[SIZES.index(ob["size"])])
            if r["kind"] == "part":
                f = f + protos.part
            if r["kind"] != "main":
                noise[i] *= 1.6
            labels[i] = ob["label"]
            confusion[i] = min(1.0, 0.2 + 0.3 * small + {"main": 0.0, "duplicate": 0.2, "part": 0.45}[r["kind"]])
        feats[i] = f
    soft = _soft_labels(rng, labels, conf, confusion)
    feats = np.maximum(feats + pos + noise + settings["shift"] * protos.out_shift, 0.0)

    order = np.argsort(-conf, kind="stable")  # the store's order; the scene lists regions the same way
    scene["regions"] = [{"object": regions[i]["object"], "kind": regions[i]["kind"],
                         "box": [round(float(v), 4) for v in boxes[i]], "conf": round(float(conf[i]), 4)}
                        for i in order]
    return {"features": feats[order], "boxes": boxes[order], "conf": conf[order], "soft_labels": soft[order]}


# ---------------------------------------------------------------------------------------------
# captions


def _phrase(ob: dict[str, Any], rng: np.random.Generator, *, colour: bool = True, size: float = 0.4) -> str:
    words = []
    if rng.random() < size:
        words.append(ob["size"])
    if colour:
        words.append(ob["colour"])
    words.append(ob["cls"])
    return " ".join(words)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _centre(ob: dict[str, Any]) -> tuple[float, float]:
    b = ob["box"]
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _relation(a: dict[str, Any], b: dict[str, Any], rng: np.random.Generator, margin: float = 0.12) -> str | None:
    """A spatial relation of ``a`` to ``b`` that is clearly true (centres apart by > margin)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    options = [rel for rel, ok in (("to the left of", ax + margin < bx), ("to the right of", bx + margin < ax),
                                   ("above", ay + margin < by), ("below", by + margin < ay)) if ok]
    return options[int(rng.integers(len(options)))] if options else None


# Caption templates and how often each is drawn: (single, relation, count, pair, location, list).
# Like COCO captions, most captions name two or three of the scene's main objects.
_TEMPLATE_P = np.array([0.1, 0.2, 0.1, 0.25, 0.1, 0.25])
_SALIENCE_POWER = 1.0


def _salient(obs: list[dict[str, Any]], rng: np.random.Generator, k: int) -> list[int]:
    """``k`` distinct objects, each drawn with probability proportional to its box area to the power
    _SALIENCE_POWER: captions name the large, salient objects more often (as COCO annotators do)."""
    area = np.array([(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) for o in obs]) ** _SALIENCE_POWER
    return [int(v) for v in rng.choice(len(obs), k, replace=False, p=area / area.sum())]


def _caption(scene: dict[str, Any], rng: np.random.Generator) -> tuple[str, str, list[int]]:
    """One true caption: (text, template name, indices of the objects it mentions)."""
    obs = scene["objects"]
    counts: dict[str, list[int]] = {}
    for j, ob in enumerate(obs):
        counts.setdefault(ob["cls"], []).append(j)
    out = scene["domain"] == "out"
    for _ in range(20):
        t = int(rng.choice(len(_TEMPLATE_P), p=_TEMPLATE_P))
        i, j, k = _salient(obs, rng, 3)
        a, b, c3 = obs[i], obs[j], obs[k]
        if t == 0:  # one object with attributes
            if out:
                return f"close up of {_a(_phrase(a, rng, size=0.7))}.", "single", [i]
            return f"{_a(_phrase(a, rng))}.", "single", [i]
        if t == 1:  # spatial relation
            rel = _relation(a, b, rng)
            if rel is None:
                continue
            if out:
                return f"{_phrase(a, rng, size=0.0)} {rel} {_phrase(b, rng, size=0.0)}.", "relation", [i, j]
            verb = " is" if rng.random() < 0.5 else ""
            return f"{_a(_phrase(a, rng))}{verb} {rel} {_a(_phrase(b, rng))}.", "relation", [i, j]
        if t == 2:  # count of a class (exact)
            many = [c for c, js in counts.items() if len(js) >= 2]
            if not many:
                continue
            c = many[int(rng.integers(len(many)))]
            num = NUMBERS[len(counts[c])]
            if out and b["cls"] != c:
                return f"{num} {PLURALS[c]} and {_a(_phrase(b, rng, size=0.0))}.", "count", counts[c] + [j]
            if out:
                return f"{num} {PLURALS[c]} in the scene.", "count", counts[c]
            return f"there are {num} {PLURALS[c]}.", "count", counts[c]
        if t == 3:  # two objects together
            if out:
                # "the X is C" is only true if X is unique in the scene
                if len(counts[a["cls"]]) != 1 or len(counts[b["cls"]]) != 1:
                    continue
                return (f"the {a['cls']} is {a['colour']} and the {b['cls']} is {b['colour']}.", "pair", [i, j])
            return f"{_a(_phrase(a, rng))} and {_a(_phrase(b, rng))}.", "pair", [i, j]
        if t == 4:  # location in the image
            x, y = _centre(a)
            where = ("on the left" if x < 0.35 else "on the right" if x > 0.65 else
                     "at the top" if y < 0.35 else "at the bottom" if y > 0.65 else None)
            if where is None:
                continue
            if out:
                return f"{_phrase(a, rng, size=0.5)} {where} of the image.", "location", [i]
            return f"{_a(_phrase(a, rng))} {where}.", "location", [i]
        if t == 5:  # three objects of the scene
            if out:
                return (f"{_phrase(a, rng, size=0.0)} with {_phrase(b, rng, size=0.0)} and "
                        f"{_phrase(c3, rng, size=0.0)}.", "list", [i, j, k])
            return f"{_a(_phrase(a, rng))} with {_a(_phrase(b, rng))} and {_a(_phrase(c3, rng))}.", "list", [i, j, k]
    return f"{_a(_phrase(obs[0], rng))}.", "single", [0]


_RELATIONS = ("to the left of", "to the right of", "above", "below")
_LOCATIONS = ("on the left", "on the right", "at the top", "at the bottom")
_SINGULAR = {p: c for c, p in PLURALS.items()}


def _parse_caption(text: str) -> dict[str, Any]:
    """The meaning of a caption written by :func:`_caption` (either domain): its object phrases
    ``{"cls", "colour", "size", "unique"}`` in order, its count ``(class, n)``, relation and location."""
    words = text.rstrip(".").split()
    phrases: list[dict[str, Any]] = []
    count, attrs = None, {}
    for w, word in enumerate(words):
        if word in SIZES:
            attrs["size"] = word
        elif word in COLOURS and not (w >= 1 and words[w - 1] == "is"):
            attrs["colour"] = word
        elif word in CLASSES:
            ph = {"cls": word, "colour": attrs.get("colour"), "size": attrs.get("size"), "unique": False}
            if w + 2 < len(words) and words[w + 1] == "is" and words[w + 2] in COLOURS:  # "the dog is red"
                ph.update(colour=words[w + 2], unique=True)
            phrases.append(ph)
            attrs = {}
        elif word in _SINGULAR and w >= 1 and words[w - 1] in NUMBERS:
            count = (_SINGULAR[word], NUMBERS.index(words[w - 1]))
    joined = " ".join(words)
    relation = next((r for r in _RELATIONS if f" {r} " in f" {joined} "), None)
    location = next((loc for loc in _LOCATIONS if f" {loc}" in f" {joined}"), None)
    return {"phrases": phrases, "count": count, "relation": relation, "location": location}


def caption_holds(text: str, scene: dict[str, Any]) -> bool:
    """Whether a caption of this world is literally true of ``scene`` (the oracle that reads the
    hidden scene: every named object present with the stated colour/size, distinct objects for
    distinct phrases, exact counts, the stated relation or location)."""
    meaning = _parse_caption(text)
    obs = scene["objects"]
    by_cls: dict[str, int] = {}
    for ob in obs:
        by_cls[ob["cls"]] = by_cls.get(ob["cls"], 0) + 1
    if meaning["count"] is not None and by_cls.get(meaning["count"][0], 0) != meaning["count"][1]:
        return False

    def fits(ph: dict[str, Any], ob: dict[str, Any]) -> bool:
        return (ob["cls"] == ph["cls"] and ph["colour"] in (None, ob["colour"]) and ph["size"] in (None, ob["size"])
                and (not ph["unique"] or by_cls[ob["cls"]] == 1))

    phrases = meaning["phrases"]
    candidates = [[j for j, ob in enumerate(obs) if fits(ph, ob)] for ph in phrases]
    for pick in itertools.product(*candidates):
        if len(set(pick)) != len(pick):
            continue
        if meaning["relation"] is not None and len(pick) >= 2:
            (ax, ay), (bx, by) = _centre(obs[pick[0]]), _centre(obs[pick[1]])
            if not {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by,
                    "below": ay > by}[meaning["relation"]]:
                continue
        if meaning["location"] is not None and pick:
            x, y = _centre(obs[pick[0]])
            if not {"on the left": x < 0.35, "on the right": x > 0.65, "at the top": y < 0.35,
                    "at the bottom": y > 0.65}[meaning["location"]]:
                continue
        return True
    return not phrases  # a caption naming nothing holds when its count does


# ---------------------------------------------------------------------------------------------
# generation


def _default_params() -> dict[str, Any]:
    return dict(_GENERATE_DEFAULTS)


def world_params(**params: Any) -> dict[str, Any]:
    """All generator parameters with defaults filled in, JSON-normalised (the cache key)."""
    defaults = _default_params()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"synthetic world: unknown parameter(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **params}
    return json.loads(json.dumps(merged))  # tuples -> lists, so equal params hash equally


def generate_world(out_dir: str, *, seed: int = 0, num_images: int = 2000, val_fraction: float = 0.1,
                   feat_dim: int = 256, captions_per_image: int = 5, domains: tuple[str, ...] = ("in", "out"),
                   out_fraction: float = 0.3, regions_range: tuple[int, int] = (10, 40),
                   dup_prob: float = 0.5, overwrite: bool = False) -> str:
    """Write a synthetic world into ``out_dir`` (see the module docstring); returns ``out_dir``.

    ``out_fraction``: share of the images in the ``out`` domain when both domains are generated.
    ``regions_range``: (min, max) raw regions the detector returns per image.
    """
    from vlframe.data.tokenizer import build_tokenizer

    domains = tuple(domains)
    if not domains or any(d not in ("in", "out") for d in domains) or len(set(domains)) != len(domains):
        raise ValueError(f"synthetic world: domains must be a non-empty subset of ('in', 'out'), got {domains}")
    if num_images < 2 * len(domains):
        raise ValueError(f"synthetic world: num_images={num_images} too small for {len(domains)} domain(s) x 2 splits")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"synthetic world: val_fraction must be in (0, 1), got {val_fraction}")
    if feat_dim < 1 or captions_per_image < 1:
        raise ValueError(f"synthetic world: feat_dim and captions_per_image must be >= 1, got {feat_dim}, {captions_per_image}")
    lo, hi = (int(v) for v in regions_range)
    if not 8 <= lo <= hi:  # every object (up to 8) needs its main box
        raise ValueError(f"synthetic world: regions_range must satisfy 8 <= min <= max, got {regions_range}")

    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"synthetic world {out_dir}: already exists (pass overwrite=True, or --overwrite)")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    params = world_params(seed=seed, num_images=num_images, val_fraction=val_fraction, feat_dim=feat_dim,
                          captions_per_image=captions_per_image, domains=list(domains), out_fraction=out_fraction,
                          regions_range=[lo, hi], dup_prob=dup_prob, overwrite=False)
    params.pop("overwrite")

    rng_world = np.random.default_rng([seed, 0])
    protos = _Prototypes(rng_world, feat_dim)
    settings = {d: _domain_settings(d, len(CLASSES), rng_world) for d in ("in", "out")}
    n_out = int(round(num_images * out_fraction)) if len(domains) == 2 else (num_images if domains == ("out",) else 0)
    n_out = min(max(n_out, 2 if "out" in domains else 0), num_images - (2 if "in" in domains else 0))
    n_in = num_images - n_out
    tok = build_tokenizer()
    special = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id,
               "pad": tok.pad_token_id, "unk": tok.unk_token_id}

    scenes: list[dict[str, Any]] = []
    texts: dict[tuple[str, str], list[tuple[str, str, str, dict[str, Any]]]] = {}
    counts: dict[str, int] = {}
    with RegionStoreWriter(os.path.join(out_dir, "regions"), feat_dim=feat_dim,
                           num_labels=len(CLASSES) + 1) as writer:
        for dom_index, (domain, n_dom) in enumerate((("in", n_in), ("out", n_out))):
            if n_dom == 0:
                continue
            # split by image: a fixed, seeded choice of val images per domain (at least one each)
            n_val = min(max(1, int(round(n_dom * val_fraction))), n_dom - 1)
            val = set(np.random.default_rng([seed, 2, dom_index]).choice(n_dom, n_val, replace=False).tolist())
            for idx in range(n_dom):
                scene = _make_scene(idx, domain, settings[domain], seed)
                split = "val" if idx in val else "train"
                scene["split"] = split
                reg = _detect(scene, settings[domain], protos, (lo, hi), dup_prob)
                writer.add(scene["img_id"], **reg, width=scene["width"], height=scene["height"])
                cap_rng = np.random.default_rng([seed, 3, dom_index, idx])
                seen: set[str] = set()
                for c in range(captions_per_image):
                    for _ in range(5):  # prefer distinct captions per image
                        text, template, mentioned = _caption(scene, cap_rng)
                        if text not in seen:
                            break
                    seen.add(text)
                    texts.setdefault((domain, split), []).append(
                        (f"{scene['img_id']}_{c}", scene["img_id"], text,
                         {"domain": domain, "template": template, "objects": mentioned}))
                scenes.append(scene)
                counts[f"{domain}_{split}_images"] = counts.get(f"{domain}_{split}_images", 0) + 1

    for (domain, split), rows in sorted(texts.items()):
        enc = tok([r[2] for r in rows], add_special_tokens=False)["input_ids"]
        path = os.path.join(out_dir, "texts", f"{domain}_{split}")
        with TextStoreWriter(path, tokenizer_name=TOKENIZER_NAME, special_ids=special,
                             vocab_size=tok.vocab_size) as tw:
            for (txt_id, img_id, text, extra), ids in zip(rows, enc):
                if special["unk"] in ids:
                    raise ValueError(f"synthetic world {out_dir}: caption {txt_id!r} {text!r} has an unknown word")
                tw.add(txt_id, token_ids=ids, img_id=img_id, raw=text, extra=extra)
        counts[f"{domain}_{split}_texts"] = len(rows)

    with open(os.path.join(out_dir, "scenes.jsonl"), "w", encoding="utf-8") as f:
        for s in scenes:
            f.write(json.dumps(s, separators=(",", ":")) + "\n")
    meta = {
        "format": "vlframe-synthetic-world", "version": WORLD_FORMAT_VERSION, "params": params,
        "classes": ["background"] + CLASSES, "supercategories": SUPERCATS, "colours": COLOURS,
        "sizes": SIZES, "plurals": PLURALS, "tokenizer_name": TOKENIZER_NAME, "special_ids": special,
        "num_labels": len(CLASSES) + 1, "counts": counts,
        "splits": sorted(f"{d}_{s}" for d, s in texts),
    }
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return out_dir


_GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(generate_world).parameters.items()
                      if k != "out_dir"}


def world_dir_name(**params: Any) -> str:
    p = world_params(**params)
    p.pop("overwrite")
    blob = json.dumps({"params": p, "version": WORLD_FORMAT_VERSION}, sort_keys=True).encode()
    return "synth-" + hashlib.sha1(blob).hexdigest()[:12]


def default_cache_dir() -> str:
    """The per-user cache folder for generated worlds: ``$XDG_CACHE_HOME/vlframe``, else
    ``~/.cache/vlframe`` (never a folder under wherever the command happens to run)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vlframe")


def ensure_world(cache_dir: str | None = None, **params: Any) -> str:
    """The world for ``params`` under ``cache_dir`` (None: :func:`default_cache_dir`): generated
    once (atomically, under a file lock so parallel tests and DDP ranks do not race), reused
    afterwards. Returns its folder."""
    if params.get("overwrite"):
        raise ValueError("ensure_world: 'overwrite' is not accepted; delete the cached folder instead")
    cache_dir = os.path.expanduser(os.fspath(cache_dir)) if cache_dir else default_cache_dir()
    final = os.path.join(cache_dir, world_dir_name(**params))
    return make_once(final, marker="meta.json", generate=lambda out: generate_world(out, **params))


def make_once(final: str, *, marker: str, generate: Any, tmp_prefix: str = ".synth-tmp-") -> str:
    """``final`` made by ``generate(folder)`` once: atomically (written beside it, then renamed) and
    under a file lock, so parallel tests and DDP ranks do not race; a folder without its
    ``marker`` file (written last) is a leftover and is made again."""
    if os.path.isfile(os.path.join(final, marker)):
        return final
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(os.path.join(final, marker)):  # another process made it meanwhile
                return final
            if os.path.exists(final):
                shutil.rmtree(final)
            tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
            try:
                generate(os.path.join(tmp, "w"))
                os.rename(os.path.join(tmp, "w"), final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def load_scenes(world_dir: str) -> dict[str, dict[str, Any]]:
    """img_id -> hidden scene, read from ``scenes.jsonl``."""
    path = os.path.join(world_dir, "scenes.jsonl")
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad scene line: {e}") from None
            out[s["img_id"]] = s
    return out


# ---------------------------------------------------------------------------------------------
# command line (tools/prepare_data.py)


def register_cli(subparsers) -> None:
    """Add the ``synthetic`` subcommand to ``tools/prepare_data.py``."""
    p = subparsers.add_parser("synthetic", help="generate the synthetic vision-and-language world")
    d = _default_params()
    p.add_argument("--out", required=True, help="output folder of the world")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--num-images", type=int, default=d["num_images"])
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    p.add_argument("--feat-dim", type=int, default=d["feat_dim"])
    p.add_argument("--captions-per-image", type=int, default=d["captions_per_image"])
    p.add_argument("--domains", nargs="+", default=list(d["domains"]), choices=["in", "out"])
    p.add_argument("--out-fraction", type=float, default=d["out_fraction"])
    p.add_argument("--regions-range", type=int, nargs=2, default=list(d["regions_range"]), metavar=("MIN", "MAX"))
    p.add_argument("--dup-prob", type=float, default=d["dup_prob"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    import time

    t0 = time.perf_counter()
    out = generate_world(args.out, seed=args.seed, num_images=args.num_images, val_fraction=args.val_fraction,
                         feat_dim=args.feat_dim, captions_per_image=args.captions_per_image,
                         domains=tuple(args.domains), out_fraction=args.out_fraction,
                         regions_range=tuple(args.regions_range), dup_prob=args.dup_prob, overwrite=args.overwrite)
    with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
        counts = json.load(f)["counts"]
    print(f"synthetic world written to {out} in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0
