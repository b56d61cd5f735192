"""Annotation sets of the six downstream tasks, derived from the synthetic world's hidden scenes.

Each set is a text store in the format the real-data importers write
(:mod:`vlframe.data.importers.tasks`), so one dataset layer (:mod:`vlframe.data.downstream`)
reads both. Sets live in ``<world>/tasks/v<TASKS_FORMAT_VERSION>/<task>_<split>/``:

* ``vqa``: questions on colour ("what colour is the dog?", class unique in the scene), count
  ("how many cats are there?", absent classes included), existence ("is there a red car?", half
  of the "no" cases keep the class with another colour) and relation ("is the dog to the left of
  the car?"). Ten simulated annotators answer; each is right with probability
  ``annotator_accuracy``, else gives a confusable answer (another colour, the count +-1, the
  other of yes/no), so the soft score is the official one over real disagreement.
  extra = {question_id, answers: labels, scores: soft scores, answer_type, question_type};
  ``answer_vocab.json`` (yes, no, 0-10, the colours) beside the store.
* ``refcoco``: expressions naming one object whose class+colour or class+size is unique
  ("the red dog", "the small cup"), or whose class is unique ("the dog on the left").
  extra = {ref_id, ann_id, target_box [x1,y1,x2,y2], category_id, split, target_region: index of
  the object's main detected region, gt_regions: the main regions of every object (the
  "ground-truth boxes" setting)}.
* ``nlvr2``: image pairs with a statement about both (total count, which side has more, both /
  exactly one image contain ...); every statement is used with two pairs (consistency).
  extra = {img_ids: [left, right], label: 1 true / 0 false, identifier "<split>-<set>-<pair>-<sent>"}.
* ``snli_ve``: per image an entailed, a contradicted (a present class with an absent colour, or
  a wrong count) and a neutral (a true phrase with an unverifiable predicate) hypothesis.
  extra = {label: 0 entailment / 1 neutral / 2 contradiction, pair_id}.
* ``vcr``: "what colour is the X?" / "how many Xs are there?" with four answers ("it is red.")
  and four rationales ("the small dog is red."), one right each.
  extra = {answer_choices, rationale_choices (token ids), answer_label, rationale_label, objects: []}.
* retrieval (and the pretraining ITM) use the world's own captions (``texts/<domain>_<split>``).

``oracle.json`` holds, per task, the score of an oracle that reads the hidden scene (the ceiling
a learned model is judged against) and the chance level, on the val split.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np
import torch

from vlframe.data.stores import TextStoreWriter
from vlframe.data.synthetic import (
    COLOURS, NUMBERS, PLURALS, TOKENIZER_NAME, _centre, _relation, caption_holds, load_scenes, make_once,
)
from vlframe.data.vqa_vocab import answer_scores, save_answer_vocab
from vlframe.metrics.downstream import box_iou

__all__ = ["TASKS_FORMAT_VERSION", "TASK_NAMES", "ensure_task_sets", "task_store", "load_oracle"]

TASKS_FORMAT_VERSION = 2  # 2: ITM oracle; retrieval oracle checks relations, locations, sizes
TASK_NAMES = ("vqa", "refcoco", "nlvr2", "snli_ve", "vcr")
VQA_ANSWERS = ["yes", "no"] + [str(i) for i in range(11)] + COLOURS
VQA_VOCAB_FILE = "answer_vocab.json"  # the importer's name (vlframe.data.importers.tasks)
NEUTRAL_STATES = ["old", "new", "wet", "broken", "expensive", "clean", "famous", "heavy"]


def task_store(world_dir: str, task: str, split: str) -> str:
    return os.path.join(world_dir, "tasks", f"v{TASKS_FORMAT_VERSION}", f"{task}_{split}")


def load_oracle(world_dir: str) -> dict[str, dict[str, float]]:
    with open(os.path.join(world_dir, "tasks", f"v{TASKS_FORMAT_VERSION}", "oracle.json"), encoding="utf-8") as f:
        return json.load(f)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _by_class(scene: dict[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for j, ob in enumerate(scene["objects"]):
        out.setdefault(ob["cls"], []).append(j)
    return out


def _main_region(scene: dict[str, Any], j: int) -> int:
    return next(i for i, r in enumerate(scene["regions"]) if r["object"] == j and r["kind"] == "main")


def _classes_of(scenes: list[dict[str, Any]]) -> list[str]:
    return sorted({ob["cls"] for s in scenes for ob in s["objects"]})


# ------------------------------------------------------------------------------------- VQA


def _vqa_questions(scene: dict[str, Any], rng: np.random.Generator, classes: list[str]) -> list[tuple[str, str, str]]:
    """(question, true answer, question type) for one scene."""
    obs, by_cls = scene["objects"], _by_class(scene)
    out = []
    unique = [c for c, js in by_cls.items() if len(js) == 1]
    if unique:
        c = unique[int(rng.integers(len(unique)))]
        out.append((f"what colour is the {c}?", obs[by_cls[c][0]]["colour"], "colour"))
    c = classes[int(rng.integers(len(classes)))] if rng.random() < 0.25 else obs[int(rng.integers(len(obs)))]["cls"]
    out.append((f"how many {PLURALS[c]} are there?", str(len(by_cls.get(c, []))), "count"))
    present = {(ob["colour"], ob["cls"]) for ob in obs}
    if rng.random() < 0.5:
        ob = obs[int(rng.integers(len(obs)))]
        out.append((f"is there {_a(ob['colour'] + ' ' + ob['cls'])}?", "yes", "exist"))
    else:
        for _ in range(20):
            c = obs[int(rng.integers(len(obs)))]["cls"] if rng.random() < 0.5 else classes[int(rng.integers(len(classes)))]
            col = COLOURS[int(rng.integers(len(COLOURS)))]
            if (col, c) not in present:
                out.append((f"is there {_a(col + ' ' + c)}?", "no", "exist"))
                break
    if len(unique) >= 2:
        i, j = (int(v) for v in rng.choice(len(unique), 2, replace=False))
        a, b = obs[by_cls[unique[i]][0]], obs[by_cls[unique[j]][0]]
        rel = _relation(a, b, rng)
        if rel is not None:
            opposite = {"to the left of": "to the right of", "to the right of": "to the left of",
                        "above": "below", "below": "above"}[rel]
            truth = rng.random() < 0.5
            out.append((f"is the {a['cls']} {rel if truth else opposite} the {b['cls']}?", "yes" if truth else "no",
                        "relation"))
    return out


def _confusable(answer: str, rng: np.random.Generator) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer.isdigit():
        n = int(answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    return [c for c in COLOURS if c != answer][int(rng.integers(len(COLOURS) - 1))]


def _vqa(scenes, rng, *, annotators: int, accuracy: float):
    ans2label = {a: i for i, a in enumerate(VQA_ANSWERS)}
    classes = _classes_of(scenes)
    rows, oracle, prior = [], [], Counter()
    qid = 0
    for s in scenes:
        for q, truth, qtype in _vqa_questions(s, rng, classes):
            humans = [truth if rng.random() < accuracy else _confusable(truth, rng) for _ in range(annotators)]
            scored = sorted(((ans2label[a], sc) for a, sc in answer_scores(humans, normalized=True).items()),
                            key=lambda ls: (-ls[1], ls[0]))
            extra = {"question_id": qid, "answers": [lab for lab, _ in scored], "scores": [float(v) for _, v in scored],
                     "answer_type": "yes/no" if truth in ("yes", "no") else "number" if truth.isdigit() else "other",
                     "question_type": qtype}
            rows.append((str(qid), s["img_id"], q, extra))
            best = dict(scored)  # the oracle answers the scene's truth
            oracle.append(best.get(ans2label[truth], 0.0))
            for lab, sc in scored:
                prior[lab] += sc
            qid += 1
    top = prior.most_common(1)[0][0] if prior else 0
    chance = float(np.mean([dict(zip(r[3]["answers"], r[3]["scores"])).get(top, 0.0) for r in rows])) if rows else 0.0
    return rows, {"vqa_score": float(np.mean(oracle))}, {"vqa_score": chance, "chance_rule": f"always {VQA_ANSWERS[top]!r}"}


# ---------------------------------------------------------------------------------- RefCOCO


def _refcoco(scenes, rng):
    rows, n_reg, n_obj, ious = [], [], [], []
    ref = 0
    for s in scenes:
        obs, by_cls = s["objects"], _by_class(s)
        cand = []
        for j, ob in enumerate(obs):
            same = [obs[k] for k in by_cls[ob["cls"]] if k != j]
            if same and all(o["colour"] != ob["colour"] for o in same):
                cand.append((j, f"the {ob['colour']} {ob['cls']}"))
            elif same and all(o["size"] != ob["size"] for o in same):
                cand.append((j, f"the {ob['size']} {ob['cls']}"))
            elif not same:
                x, _ = _centre(ob)
                where = " on the left" if x < 0.35 else " on the right" if x > 0.65 else ""
                cand.append((j, f"the {ob['colour']} {ob['cls']}{where}" if rng.random() < 0.5 else f"the {ob['cls']}{where}"))
        order = rng.permutation(len(cand))[:3]
        gt = [_main_region(s, j) for j in range(len(obs))]
        for c in order:
            j, text = cand[int(c)]
            target = _main_region(s, j)
            extra = {"ref_id": ref, "ann_id": ref, "target_box": [float(v) for v in obs[j]["box"]],
                     "category_id": obs[j]["label"], "split": s["split"], "target_region": target, "gt_regions": gt}
            rows.append((str(ref), s["img_id"], text, extra))
            ious.append(float(box_iou(torch.tensor([s["regions"][target]["box"]]), torch.tensor([obs[j]["box"]]))[0]))
            n_reg.append(len(s["regions"]))
            n_obj.append(len(obs))
            ref += 1
    oracle = {"acc_gt": 1.0, "acc_det": float(np.mean(np.array(ious) >= 0.5))}
    chance = {"acc_gt": float(np.mean(1.0 / np.array(n_obj))), "acc_det": float(np.mean(1.0 / np.array(n_reg))),
              "chance_rule": "uniform over the candidate regions (upper bound for acc_det)"}
    return rows, oracle, chance


# ------------------------------------------------------------------------------------ NLVR2


def _nlvr2_statement(left, right, rng, classes):
    """A statement template as a function of two scenes -> bool, with its text."""
    kind = int(rng.integers(4))
    c = classes[int(rng.integers(len(classes)))]
    pick = [ob for ob in left["objects"] + right["objects"]]
    ob = pick[int(rng.integers(len(pick)))]
    if rng.random() < 0.7:
        c = ob["cls"]
    count = lambda s, cl: sum(o["cls"] == cl for o in s["objects"])  # noqa: E731
    has = lambda s, col, cl: any(o["cls"] == cl and o["colour"] == col for o in s["objects"])  # noqa: E731
    if kind == 0:
        n = count(left, c) + count(right, c) + int(rng.choice([-1, 0, 0, 1]))
        n = max(n, 1)
        return (f"there are {NUMBERS[n] if n < len(NUMBERS) else n} {PLURALS[c]} in total.",
                lambda a, b: count(a, c) + count(b, c) == n)
    if kind == 1:
        return (f"the left image has more {PLURALS[c]} than the right image.", lambda a, b: count(a, c) > count(b, c))
    col = ob["colour"]
    if kind == 2:
        return (f"both images contain {_a(col + ' ' + c)}.", lambda a, b: has(a, col, c) and has(b, col, c))
    return (f"exactly one image contains {_a(col + ' ' + c)}.", lambda a, b: has(a, col, c) != has(b, col, c))


def _nlvr2(scenes, rng, *, sentences: int):
    classes = _classes_of(scenes)
    rows, split = [], scenes[0]["split"]
    n = len(scenes)
    labels = []
    for sent in range(sentences):
        want = sent % 2 == 1
        for _ in range(30):  # balance the labels of the first pair
            i, j = (int(v) for v in rng.choice(n, 2, replace=False))
            text, fn = _nlvr2_statement(scenes[i], scenes[j], rng, classes)
            if fn(scenes[i], scenes[j]) == want:
                break
        pairs = [(i, j)]
        want2 = bool(rng.random() < 0.5)
        for _ in range(30):  # the same statement on a second pair, its label balanced too
            k, m = (int(v) for v in rng.choice(n, 2, replace=False))
            if fn(scenes[k], scenes[m]) == want2:
                break
        pairs.append((k, m))
        for p, (a, b) in enumerate(pairs):
            ident = f"{split}-{sent}-{p}-0"
            label = int(fn(scenes[a], scenes[b]))
            labels.append(label)
            rows.append((ident, scenes[a]["img_id"], text,
                         {"img_ids": [scenes[a]["img_id"], scenes[b]["img_id"]], "label": label, "identifier": ident}))
    major = max(np.mean(labels), 1 - np.mean(labels))
    return rows, {"acc": 1.0, "consistency": 1.0}, {"acc": float(major), "chance_rule": "majority class"}


# ---------------------------------------------------------------------------------- SNLI-VE


def _snli_ve(scenes, rng):
    rows, pid = [], 0
    for s in scenes:
        obs, by_cls = s["objects"], _by_class(s)
        present = {(o["colour"], o["cls"]) for o in obs}
        ob = obs[int(rng.integers(len(obs)))]
        hyps = []
        if rng.random() < 0.5:
            hyps.append((f"there is {_a(ob['colour'] + ' ' + ob['cls'])}.", 0))
            wrong = [c for c in COLOURS if (c, ob["cls"]) not in present]
            col = wrong[int(rng.integers(len(wrong)))]
            hyps.append((f"there is {_a(col + ' ' + ob['cls'])}.", 2))
        else:
            n = len(by_cls[ob["cls"]])
            wrong_n = n + 1 if rng.random() < 0.5 or n == 1 else n - 1
            hyps.append((f"there are {NUMBERS[n]} {PLURALS[ob['cls']]}." if n > 1 else f"there is one {ob['cls']}.", 0))
            hyps.append((f"there are {NUMBERS[wrong_n]} {PLURALS[ob['cls']]}.", 2))
        other = obs[int(rng.integers(len(obs)))]
        state = NEUTRAL_STATES[int(rng.integers(len(NEUTRAL_STATES)))]
        hyps.append((f"the {other['colour']} {other['cls']} is {state}.", 1))
        for text, label in hyps:
            rows.append((str(pid), s["img_id"], text, {"label": label, "pair_id": str(pid)}))
            pid += 1
    return rows, {"acc": 1.0}, {"acc": 1.0 / 3, "chance_rule": "uniform (classes balanced 1:1:1)"}


# -------------------------------------------------------------------------------------- VCR


def _vcr(scenes, rng, tok):
    rows = []
    enc = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    for s in scenes:
        obs, by_cls = s["objects"], _by_class(s)
        unique = [c for c, js in by_cls.items() if len(js) == 1]
        absent = [c for c in PLURALS if c not in by_cls]
        if unique and rng.random() < 0.6:
            c = unique[int(rng.integers(len(unique)))]
            ob = obs[by_cls[c][0]]
            q = f"what colour is the {c}?"
            others = [x for x in COLOURS if x != ob["colour"]]
            wrong = [others[int(v)] for v in rng.choice(len(others), 3, replace=False)]
            answers = [ob["colour"]] + wrong
            answer_texts = [f"it is {x}." for x in answers]
            other_size = "small" if ob["size"] == "large" else "large"
            rationales = [f"the {ob['size']} {c} is {ob['colour']}.", f"the {other_size} {c} is {ob['colour']}.",
                          f"the {ob['size']} {c} is {wrong[0]}.",
                          f"the {ob['size']} {absent[int(rng.integers(len(absent)))]} is {ob['colour']}."]
        else:
            c = obs[int(rng.integers(len(obs)))]["cls"]
            n = len(by_cls[c])
            cands = [m for m in range(1, 9) if m != n]
            wrong = [cands[int(v)] for v in rng.choice(len(cands), 3, replace=False)]
            q = f"how many {PLURALS[c]} are there?"
            answer_texts = [f"there are {NUMBERS[m]}." for m in [n] + wrong]
            colours = sorted({obs[j]["colour"] for j in by_cls[c]})
            absent_colour = [x for x in COLOURS if x not in colours]
            rationales = [f"i count {NUMBERS[n]} {PLURALS[c]} in the image.",
                          f"i count {NUMBERS[wrong[0]]} {PLURALS[c]} in the image.",
                          f"i see {_a(absent_colour[0] + ' ' + c)} in the image." if n == 1 else
                          f"i see one {c} in the image.",
                          f"i count {NUMBERS[n]} {PLURALS[absent[int(rng.integers(len(absent)))]]} in the image."]
        pa, pr = rng.permutation(4), rng.permutation(4)
        extra = {"answer_choices": enc([answer_texts[int(k)] for k in pa]),
                 "rationale_choices": enc([rationales[int(k)] for k in pr]),
                 "answer_label": int(np.flatnonzero(pa == 0)[0]), "rationale_label": int(np.flatnonzero(pr == 0)[0]),
                 "objects": []}
        rows.append((f"{s['split']}-{len(rows)}", s["img_id"], q, extra))
    oracle = {"q2a": 1.0, "qa2r": 1.0, "q2ar": 1.0}
    return rows, oracle, {"q2a": 0.25, "qa2r": 0.25, "q2ar": 1 / 16, "chance_rule": "uniform over 4 candidates"}


# -------------------------------------------------------------------------------- retrieval


def _caption_oracles(world_dir: str, scenes: dict[str, dict[str, Any]], domain: str, num_images: int, rng):
    """ITM and retrieval scores of the oracle that reads the hidden scene (:func:`caption_holds`:
    every named object, attribute, count, relation and location checked), on the val captions.

    ITM: the pretraining task's pairs, a caption with its own image or (``neg_prob`` 0.5) with
    another val image drawn at random: the oracle errs only on negatives whose caption happens to
    be true. Retrieval: every caption against the first ``num_images`` val images, ties broken at
    random (not in the oracle's favour)."""
    from vlframe.data.stores import TextStore
    from vlframe.metrics.retrieval import retrieval_recall

    store = TextStore(os.path.join(world_dir, "texts", f"{domain}_val"))
    ids = store.ids()
    all_images = sorted({store.txt2img[t] for t in ids})
    raw = {t: store.get(t).raw for t in ids}
    draws = 5  # random negatives per caption
    neg_true = [caption_holds(raw[t], scenes[img]) for t in ids
                for img in (all_images[int(i)] for i in rng.integers(len(all_images), size=draws))
                if img != store.txt2img[t]]
    neg_prob = 0.5
    itm = {"itm_acc": float((1 - neg_prob) + neg_prob * (1 - np.mean(neg_true))),
           "neg_true_rate": float(np.mean(neg_true))}
    itm_chance = {"itm_acc": 0.5, "chance_rule": "a coin (neg_prob 0.5)"}

    images = all_images[:num_images]
    img_index = {img: i for i, img in enumerate(images)}
    texts = [t for t in ids if store.txt2img[t] in img_index]
    scores = np.array([[float(caption_holds(raw[t], scenes[img])) for img in images] for t in texts])
    scores += rng.uniform(0, 1e-3, scores.shape)  # the oracle breaks ties at random, not in its favour
    txt2img = torch.tensor([img_index[store.txt2img[t]] for t in texts])
    oracle = retrieval_recall(torch.from_numpy(scores), txt2img)
    chance = {f"ir_r{k}": k / len(images) for k in (1, 5, 10)}
    per_img = Counter(store.txt2img[t] for t in texts)
    for k in (1, 5, 10):  # an image's c captions among len(texts) ranked at random: P(one in the top k)
        miss = [np.prod([(len(texts) - c - i) / (len(texts) - i) for i in range(k)]) for c in per_img.values()]
        chance[f"tr_r{k}"] = float(1.0 - np.mean(miss))
    chance["chance_rule"] = f"random ranking of {len(images)} images / {len(texts)} captions"
    return (itm, itm_chance), (oracle, chance)


# ------------------------------------------------------------------------------------ writing


def _write(path: str, rows: list[tuple[str, str, str, dict]], tok, special: dict[str, int]) -> None:
    enc = tok([r[2] for r in rows], add_special_tokens=False)["input_ids"]
    with TextStoreWriter(path, tokenizer_name=TOKENIZER_NAME, special_ids=special, vocab_size=tok.vocab_size) as tw:
        for (txt_id, img_id, text, extra), ids in zip(rows, enc):
            if special["unk"] in ids:
                raise ValueError(f"synthetic task set {path}: {txt_id!r} {text!r} has an unknown word")
            tw.add(txt_id, token_ids=ids, img_id=img_id, raw=text, extra=extra)


def generate_task_sets(world_dir: str, out_dir: str, *, domain: str = "in", seed: int = 0, annotators: int = 10,
                       annotator_accuracy: float = 0.85, retrieval_images: int = 100) -> None:
    """Write every task's train/val stores and ``oracle.json`` into ``out_dir``."""
    from vlframe.data.tokenizer import build_tokenizer

    with open(os.path.join(world_dir, "meta.json"), encoding="utf-8") as f:
        special = json.load(f)["special_ids"]
    tok = build_tokenizer()
    all_scenes = load_scenes(world_dir)
    report: dict[str, Any] = {"params": {"domain": domain, "seed": seed, "annotators": annotators,
                                         "annotator_accuracy": annotator_accuracy}}
    for si, split in enumerate(("train", "val")):
        scenes = [s for s in all_scenes.values() if s["domain"] == domain and s["split"] == split]
        if len(scenes) < 2:
            raise ValueError(f"synthetic task sets: world {world_dir} has {len(scenes)} {domain}/{split} images (need 2)")
        made = {
            "vqa": _vqa(scenes, np.random.default_rng([seed, 10, si]), annotators=annotators, accuracy=annotator_accuracy),
            "refcoco": _refcoco(scenes, np.random.default_rng([seed, 11, si])),
            "nlvr2": _nlvr2(scenes, np.random.default_rng([seed, 12, si]), sentences=max(1, len(scenes) // 2)),
            "snli_ve": _snli_ve(scenes, np.random.default_rng([seed, 13, si])),
            "vcr": _vcr(scenes, np.random.default_rng([seed, 14, si]), tok),
        }
        for task, (rows, oracle, chance) in made.items():
            _write(os.path.join(out_dir, f"{task}_{split}"), rows, tok, special)
            if split == "val":
                report[task] = {"oracle": oracle, "chance": chance, "examples": len(rows)}
    save_answer_vocab(VQA_ANSWERS, os.path.join(out_dir, "vqa_train", VQA_VOCAB_FILE))
    save_answer_vocab(VQA_ANSWERS, os.path.join(out_dir, "vqa_val", VQA_VOCAB_FILE))
    (itm, itm_chance), (oracle, chance) = _caption_oracles(world_dir, all_scenes, domain, retrieval_images,
                                                           np.random.default_rng([seed, 15]))
    report["itm"] = {"oracle": itm, "chance": itm_chance}
    report["retrieval"] = {"oracle": oracle, "chance": chance, "images": retrieval_images}
    with open(os.path.join(out_dir, "oracle.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)


def ensure_task_sets(world_dir: str) -> str:
    """The task sets of ``world_dir`` (generated once under a lock, atomically); returns their folder."""
    final = os.path.join(world_dir, "tasks", f"v{TASKS_FORMAT_VERSION}")
    return make_once(final, marker="oracle.json", generate=lambda out: generate_task_sets(world_dir, out),
                     tmp_prefix=".tasks-tmp-")
