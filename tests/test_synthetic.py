import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vlframe.data import synthetic
from vlframe.data.stores import RegionStore, TextStore
from vlframe.data.synthetic import (
    CLASSES,
    COLOURS,
    NUMBERS,
    PLURALS,
    SIZES,
    ensure_world,
    generate_world,
    load_scenes,
)
from vlframe.data.tokenizer import build_tokenizer

TINY = dict(seed=3, num_images=40, feat_dim=32, val_fraction=0.2)
PLURAL_TO_CLASS = {p: c for c, p in PLURALS.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp("synth") / "w"), **TINY)


def _texts(world_dir):
    return {name: TextStore(os.path.join(world_dir, "texts", name))
            for name in sorted(os.listdir(os.path.join(world_dir, "texts")))}


def _region_records(world_dir):
    s = RegionStore(os.path.join(world_dir, "regions"), conf_threshold=None)
    return s, {i: s.get(i) for i in s.ids()}


def test_layout_and_meta(world):
    meta = json.loads(Path(world, "meta.json").read_text())
    assert meta["classes"][0] == "background" and meta["classes"][1:] == CLASSES
    assert meta["num_labels"] == len(CLASSES) + 1 and meta["params"]["seed"] == 3
    assert sorted(meta["splits"]) == ["in_train", "in_val", "out_train", "out_val"]
    texts = _texts(world)
    assert sorted(texts) == meta["splits"]
    s = RegionStore(os.path.join(world, "regions"))
    assert len(s) == 40 and s.feat_dim == 32 and s.num_labels == len(CLASSES) + 1
    for name, t in texts.items():
        assert t.meta["tokenizer_name"] == "bert-base-uncased"
        assert t.special_ids == {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
        assert meta["counts"][f"{name}_texts"] == len(t)
        assert all(t.get(i).extra["domain"] == name.split("_")[0] for i in t.ids())
    # the class and colour words are single bert-base-uncased tokens (MLM targets)
    tok = build_tokenizer()
    for w in CLASSES + COLOURS + SIZES:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


def test_deterministic(world, tmp_path):
    again = generate_world(str(tmp_path / "again"), **TINY)
    for name in ["scenes.jsonl", "meta.json"] + [f"texts/{d}/{f}" for d in os.listdir(Path(world, "texts"))
                                                  for f in ("id2len.json", "txt2img.json", "img2txts.json")]:
        assert Path(world, name).read_bytes() == Path(again, name).read_bytes(), name
    (s1, r1), (s2, r2) = _region_records(world), _region_records(again)
    assert s1.ids() == s2.ids()
    for i in s1.ids():
        for f in ("features", "boxes", "soft_labels", "conf"):
            np.testing.assert_array_equal(getattr(r1[i], f), getattr(r2[i], f))
        assert (r1[i].width, r1[i].height) == (r2[i].width, r2[i].height)
    t1, t2 = _texts(world), _texts(again)
    for name in t1:
        for i in t1[name].ids():
            a, b = t1[name].get(i), t2[name].get(i)
            assert (a.raw, a.img_id, a.extra) == (b.raw, b.img_id, b.extra)
            np.testing.assert_array_equal(a.token_ids, b.token_ids)
    other = generate_world(str(tmp_path / "other"), **{**TINY, "seed": 4})
    assert Path(world, "scenes.jsonl").read_bytes() != Path(other, "scenes.jsonl").read_bytes()


def _check_caption(text: str, scene: dict, extra: dict) -> None:
    objs = scene["objects"]
    words = text.rstrip(".").split()

    def exists(**attrs):
        return any(all(o[k] == v for k, v in attrs.items()) for o in objs)

    for k, w in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else None
        if w in COLOURS and nxt in CLASSES:  # "... red dog", possibly "small red dog"
            attrs = {"colour": w, "cls": nxt}
            if k > 0 and words[k - 1] in SIZES:
                attrs["size"] = words[k - 1]
            assert exists(**attrs), (text, attrs)
        if w in SIZES and nxt in CLASSES:
            assert exists(size=w, cls=nxt), text
        if w in NUMBERS and nxt in PLURAL_TO_CLASS:
            assert sum(o["cls"] == PLURAL_TO_CLASS[nxt] for o in objs) == NUMBERS.index(w), text
        if w == "the" and nxt in CLASSES and words[k + 2] == "is":  # "the dog is red": the only dog
            same = [o for o in objs if o["cls"] == nxt]
            assert len(same) == 1 and same[0]["colour"] == words[k + 3], text
    ids = extra["objects"]
    mentioned = [objs[i] for i in ids]
    for o in mentioned:  # the recorded objects carry the class words the caption names
        assert o["cls"] in words or PLURALS[o["cls"]] in words, (text, o)
    if extra["template"] == "relation":
        (a, b) = mentioned
        ca = [(a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2]
        cb = [(b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2]
        truth = {"to the left of": ca[0] < cb[0], "to the right of": ca[0] > cb[0],
                 "above": ca[1] < cb[1], "below": ca[1] > cb[1]}
        rels = [r for r in truth if f" {r} " in f" {text} "]
        assert len(rels) == 1 and truth[rels[0]], text


def test_captions_grounded_and_tokenised(world):
    scenes = load_scenes(world)
    tok = build_tokenizer()
    n = 0
    for name, t in _texts(world).items():
        for i in t.ids():
            r = t.get(i)
            assert 100 not in r.token_ids  # no [UNK]
            assert r.token_ids.tolist() == tok(r.raw, add_special_tokens=False)["input_ids"]
            assert r.img_id in scenes and scenes[r.img_id]["domain"] == r.extra["domain"]
            _check_caption(r.raw, scenes[r.img_id], r.extra)
            n += 1
    assert n == 40 * 5
    templates = {t.get(i).extra["template"] for t in _texts(world).values() for i in t.ids()}
    assert {"single", "relation", "pair"} <= templates


def test_splits_are_image_disjoint(world):
    texts = _texts(world)
    scenes = load_scenes(world)
    train = {img for n, t in texts.items() if n.endswith("train") for img in t.img2txts}
    val = {img for n, t in texts.items() if n.endswith("val") for img in t.img2txts}
    assert train and val and not train & val
    assert train | val == set(scenes)
    for n, t in texts.items():
        assert all(scenes[img]["split"] == n.split("_")[1] for img in t.img2txts)
        assert all(len(v) == 5 for v in t.img2txts.values())
    assert len(val) == 8  # 20% of each domain's images


def test_regions_follow_the_scene(world):
    scenes = load_scenes(world)
    s, recs = _region_records(world)
    main_hits, mains, clutter_bg, clutter = 0, 0, 0, 0
    for img_id, r in recs.items():
        sc = scenes[img_id]
        soft = r.soft_labels.astype(np.float32)
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=2e-3)
        np.testing.assert_allclose(r.conf, 1.0 - soft[:, 0], atol=1e-3)  # conf consistent with soft label
        assert (r.features >= 0).all()
        assert len(sc["regions"]) == r.num_regions  # scene regions are in store order
        np.testing.assert_allclose([g["conf"] for g in sc["regions"]], r.conf, atol=1e-4)
        np.testing.assert_allclose([g["box"] for g in sc["regions"]], r.boxes[:, :4], atol=1e-4)
        assert (r.width, r.height) == (sc["width"], sc["height"])
        assert 3 <= len(sc["objects"]) <= 8
        for k, g in enumerate(sc["regions"]):
            if g["kind"] == "main":
                mains += 1
                main_hits += int(np.argmax(soft[k, 1:]) + 1 == sc["objects"][g["object"]]["label"])
            elif g["kind"] == "clutter":
                clutter += 1
                clutter_bg += int(soft[k, 0] > 0.5)
        assert sorted(g["object"] for g in sc["regions"] if g["kind"] == "main") == list(range(len(sc["objects"])))
    assert main_hits / mains > 0.9
    assert clutter_bg / clutter > 0.6


def test_features_carry_class_and_colour(world):
    # a nearest-class-mean probe on main boxes recovers class and colour well above chance
    scenes = load_scenes(world)
    _, recs = _region_records(world)
    x, cls, col = [], [], []
    for img_id, r in recs.items():
        for k, g in enumerate(scenes[img_id]["regions"]):
            if g["kind"] == "main":
                ob = scenes[img_id]["objects"][g["object"]]
                x.append(r.features[k].astype(np.float32))
                cls.append(ob["label"])
                col.append(COLOURS.index(ob["colour"]))
    x, cls, col = np.array(x), np.array(cls), np.array(col)
    for y in (cls, col):
        means = {c: x[y == c].mean(0) for c in np.unique(y)}
        keys = np.array(list(means))
        pred = keys[np.argmin([[np.linalg.norm(v - means[c]) for c in keys] for v in x], axis=1)]
        chance = max(np.bincount(y)) / len(y)
        assert (pred == y).mean() > chance + 0.3


def test_region_counts_in_configured_range(world, tmp_path):
    raw = RegionStore(os.path.join(world, "regions"), conf_threshold=None).num_regions_array()
    assert raw.min() >= 10 and raw.max() <= 40
    sel = RegionStore(os.path.join(world, "regions")).num_regions_array()  # UNITER's 0.2 / 10 / 100
    assert sel.min() >= 10 and sel.max() <= 40 and len(np.unique(sel)) > 3
    w = generate_world(str(tmp_path / "narrow"), seed=1, num_images=20, feat_dim=8, regions_range=(12, 20),
                       domains=("in",))
    raw = RegionStore(os.path.join(w, "regions"), conf_threshold=None).num_regions_array()
    assert raw.min() >= 12 and raw.max() <= 20
    assert sorted(os.listdir(os.path.join(w, "texts"))) == ["in_train", "in_val"]


def test_domains_differ(world):
    scenes = load_scenes(world)
    s = RegionStore(os.path.join(world, "regions"), conf_threshold=None)
    raw = dict(zip(s.ids(), s.num_regions_array()))
    by = {d: [i for i, sc in scenes.items() if sc["domain"] == d] for d in ("in", "out")}
    assert len(by["out"]) == 12  # out_fraction 0.3 of 40
    assert np.mean([raw[i] for i in by["out"]]) > np.mean([raw[i] for i in by["in"]])
    mean_feat = {d: np.mean([s.get(i).features.astype(np.float32).mean() for i in ids]) for d, ids in by.items()}
    assert mean_feat["out"] > mean_feat["in"]  # the out domain's feature shift
    texts = _texts(world)
    in_caps = [texts["in_train"].get(i).raw for i in texts["in_train"].ids()]
    out_caps = [texts["out_train"].get(i).raw for i in texts["out_train"].ids()]
    assert all(c.startswith(("a ", "an ", "there are")) for c in in_caps)
    assert not any(c.startswith(("a ", "an ", "there are")) for c in out_caps)


def test_ensure_world_caches(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate_world
    monkeypatch.setattr(synthetic, "generate_world", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = dict(seed=5, num_images=12, feat_dim=8, captions_per_image=2)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_world(str(tmp_path), **params))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and paths[0] == paths[1]
    stamp = os.stat(os.path.join(paths[0], "meta.json")).st_mtime_ns
    assert ensure_world(str(tmp_path), **params) == paths[0] and len(calls) == 1
    assert os.stat(os.path.join(paths[0], "meta.json")).st_mtime_ns == stamp
    # defaults spelled out hash like defaults left out
    assert ensure_world(str(tmp_path), **params, val_fraction=0.1) == paths[0] and len(calls) == 1
    assert os.path.basename(paths[0]).startswith("synth-")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synth-tmp-")]
    other = ensure_world(str(tmp_path), **{**params, "seed": 6})
    assert other != paths[0] and len(calls) == 2
    with pytest.raises(TypeError, match="unknown parameter"):
        ensure_world(str(tmp_path), num_imgs=3)


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="domains"):
        generate_world(str(tmp_path / "a"), num_images=10, domains=("in", "moon"))
    with pytest.raises(ValueError, match="regions_range"):
        generate_world(str(tmp_path / "b"), num_images=10, regions_range=(4, 6))
    generate_world(str(tmp_path / "c"), num_images=4, feat_dim=4, captions_per_image=1)
    with pytest.raises(FileExistsError, match="already exists"):
        generate_world(str(tmp_path / "c"), num_images=4)


def test_prepare_data_cli(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    out = tmp_path / "cli"
    assert prepare_data.main(["synthetic", "--out", str(out), "--seed", "2", "--num-images", "10",
                              "--feat-dim", "16", "--captions-per-image", "2"]) == 0
    assert "synthetic world written" in capsys.readouterr().out
    s = RegionStore(out / "regions")
    assert len(s) == 10 and s.feat_dim == 16
    assert json.loads((out / "meta.json").read_text())["params"]["captions_per_image"] == 2
    with pytest.raises(SystemExit):
        prepare_data.main(["synthetic", "--out", str(out)])
    assert "already exists" in capsys.readouterr().err


def _scene(*objects):
    return {"objects": [{"cls": c, "colour": col, "size": size, "box": box} for c, col, size, box in objects]}


def test_caption_holds_hand_cases():
    from vlframe.data.synthetic import caption_holds

    left, right, top = [0.0, 0.4, 0.2, 0.6], [0.7, 0.4, 0.9, 0.6], [0.4, 0.0, 0.6, 0.2]
    s = _scene(("dog", "red", "small", left), ("car", "blue", "large", right), ("dog", "green", "large", top))
    assert caption_holds("a small red dog to the left of a blue car.", s)
    assert not caption_holds("a small red dog to the right of a blue car.", s)  # relation false
    assert not caption_holds("a large red dog to the left of a blue car.", s)  # size false
    assert not caption_holds("a red dog and a red car.", s)  # colour false
    assert caption_holds("there are two dogs.", s) and not caption_holds("there are three dogs.", s)
    assert caption_holds("two dogs and a blue car.", s)
    assert caption_holds("the car is blue and the dog is red.", _scene(("car", "blue", "small", left),
                                                                     ("dog", "red", "small", right)))
    assert not caption_holds("the car is blue and the dog is red.", s)  # "the dog" is not unique here
    assert caption_holds("a red dog on the left.", s) and not caption_holds("a blue car on the left.", s)
    assert caption_holds("a green dog at the top.", s)
    # distinct phrases need distinct objects
    assert not caption_holds("a red dog with a red dog and a blue car.", s)
    assert caption_holds("red dog with green dog and blue car.", s)
    assert caption_holds("close up of a large blue car.", s)


def test_every_caption_holds_of_its_own_scene_and_rarely_of_another(world):
    from vlframe.data.synthetic import caption_holds

    scenes = load_scenes(world)
    own, other = [], []
    imgs = sorted(scenes)
    for store in _texts(world).values():
        for t in store.ids():
            rec, img = store.get(t), store.txt2img[t]
            own.append(caption_holds(rec.raw, scenes[img]))
            other.append(caption_holds(rec.raw, scenes[imgs[(imgs.index(img) + 7) % len(imgs)]]))
    assert all(own), "a caption the world wrote is false of its own scene"
    assert np.mean(other) < 0.2
