"""Text importers: COCO / Flickr30K captions in Karpathy's split files, the original UNITER txt_db,
and the shared readers of :mod:`vlframe.data.importers.common` - on small files written here in
the original layouts, plus the genuine txt_db sample (skipped when the fixtures folder is absent)."""
from __future__ import annotations

import argparse
import json
import os
import re

import lmdb
import lz4.frame
import msgpack
import numpy as np
import pytest

from tests.conftest import UNITER_DB
from tests.conftest import needs_fixtures as needs_fixtures_at

from vlframe.data.importers import captions, uniter_txt
from vlframe.data.importers.captions import import_karpathy, read_karpathy
from vlframe.data.importers.common import TOO_LONG, DataFormatError, ImportReport, TextEncoder, iter_jsonl, read_json, require
from vlframe.data.importers.uniter_txt import import_uniter_txt_db
from vlframe.data.stores import RegionStoreWriter, TextStore
from vlframe.data.tokenizer import build_tokenizer

FIXTURES = UNITER_DB
needs_fixtures = needs_fixtures_at("uniter_db_sample", "txt_db")


def ours(text: str) -> list[int]:
    return build_tokenizer()(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# common readers and policy


def test_read_json_names_truncated_file(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text('{"images": [{"filename": "a.jpg"}, {"filen')
    with pytest.raises(DataFormatError, match=r"ann\.json: line 1 column \d+: truncated JSON"):
        read_json(p)
    p.write_text('{"a": 1,, "b": 2}\n')
    with pytest.raises(DataFormatError, match=r"ann\.json: line 1 column 9: malformed JSON"):
        read_json(p)


def test_iter_jsonl_names_line_and_counts_skips(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"q": 1}\n\n{"q": 2\n{"q": 3}\n')
    with pytest.raises(DataFormatError, match=r"qa\.jsonl: line 3: malformed JSON"):
        list(iter_jsonl(p))
    report = ImportReport("qa", skip_bad=True)
    assert list(iter_jsonl(p, report)) == [(1, {"q": 1}), (4, {"q": 3})]
    assert report.skipped == {"malformed JSON line": 1}
    assert "skipped 1: malformed JSON line" in report.summary() and "qa.jsonl: line 3" in report.summary()


def test_require_names_field_and_type():
    with pytest.raises(DataFormatError, match=r"a\.json: record 17 \(question_id 4\): missing field 'answers'"):
        require({"q": 1}, "answers", list, "a.json", "record 17 (question_id 4)")
    with pytest.raises(DataFormatError, match=r"a\.json: record 2: field 'n' should be int, got bool"):
        require({"n": True}, "n", int, "a.json", "record 2")
    assert require({"n": 3}, "n", int, "a.json", "record 2") == 3


def test_text_encoder_matches_tokenizer_and_never_cuts():
    enc = TextEncoder()
    text = "A man riding a wave on top of a surfboard."
    assert enc.encode(text) == ours(text) and len(ours(text)) > 10
    assert enc.encode_many([text, "two dogs"]) == [ours(text), ours("two dogs")]
    kw = enc.store_kwargs()
    assert kw["special_ids"] == {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
    assert kw["vocab_size"] == 30522 and kw["tokenizer_name"] == "bert-base-uncased"


# ---------------------------------------------------------------------------------------------
# Karpathy caption files

COCO_SENTS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park",
    "A plate of food with broccoli and rice.",
    "a red double decker bus driving down a street",
    "A cat sleeping on a laptop keyboard.",
    "Several people stand near a train station platform.",
    "A kitchen with white cabinets and a stove.",
    "Zebras grazing in the tall grass.",
]


def coco_json(splits=("train", "restval", "val", "test")) -> dict:
    images, sentid = [], 0
    for i, split in enumerate(splits):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        cocoid = 9 + 100 * i
        sents = []
        for _ in range(2):
            sents.append({"raw": COCO_SENTS[sentid % len(COCO_SENTS)], "tokens": COCO_SENTS[sentid].lower().split(),
                          "sentid": sentid, "imgid": i})
            sentid += 1
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid,
                       "imgid": i, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})
    return {"images": images, "dataset": "coco"}


def write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return os.fspath(path)


def test_coco_karpathy_one_store_per_split(tmp_path):
    src = write_json(tmp_path / "dataset_coco.json", coco_json())
    reports = import_karpathy(src, tmp_path / "out")
    assert sorted(reports) == ["restval", "test", "train", "val"]
    assert all(r.written == 2 and r.total_skipped == 0 for r in reports.values())
    data = coco_json()
    for img in data["images"]:
        store = TextStore(tmp_path / "out" / img["split"])
        assert store.meta["tokenizer_name"] == "bert-base-uncased"
        assert store.img2txts == {str(img["cocoid"]): [str(s["sentid"]) for s in img["sentences"]]}
        for s in img["sentences"]:
            rec = store.get(str(s["sentid"]))
            assert rec.token_ids.tolist() == ours(s["raw"])
            assert rec.img_id == str(img["cocoid"]) and rec.raw == s["raw"]
            assert rec.extra == {"karpathy_split": img["split"]}


def test_coco_restval_into_train_split_choice_and_id_template(tmp_path):
    src = write_json(tmp_path / "dataset_coco.json", coco_json())
    reports = import_karpathy(src, tmp_path / "out", splits=["train", "restval", "test"], restval_into_train=True,
                              img_id="{stem_lower}.npz", max_text_len=5)
    assert sorted(reports) == ["test", "train"]
    train = TextStore(tmp_path / "out" / "train")
    assert sorted(train.img2txts) == ["coco_train2014_000000000009.npz", "coco_train2014_000000000109.npz"]
    assert sorted(train.ids(), key=int) == ["0", "1", "2", "3"]
    assert train.get("2").token_ids.tolist() == ours(COCO_SENTS[2])  # kept whole (the one --max-text-len rule) ...
    assert reports["train"].noted[TOO_LONG] == 4 and reports["test"].noted[TOO_LONG] == 2  # ... and counted
    assert train.get("2").extra == {"karpathy_split": "restval"}
    assert not os.path.exists(tmp_path / "out" / "val")
    with pytest.raises(ValueError, match=r"unknown field \{cocoid\.real\}"):
        import_karpathy(src, tmp_path / "o2", img_id="{cocoid.real}")
    with pytest.raises(ValueError, match=r"only_train\.json: no captions for split\(s\) \['val'\]"):
        write_json(tmp_path / "only_train.json", coco_json(splits=("train",)))
        import_karpathy(tmp_path / "only_train.json", tmp_path / "o3", splits=["val"])


def test_flickr30k_uses_filename_stem(tmp_path):
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentids": [0, 1], "sentences": [
            {"raw": "Two young guys with shaggy hair look at their hands.", "tokens": [], "sentid": 0, "imgid": 0},
            {"raw": "Two friends enjoy time spent together.", "tokens": [], "sentid": 1, "imgid": 0}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "test", "sentids": [2], "sentences": [
            {"raw": "Several men in hard hats are operating a giant pulley system.", "tokens": [], "sentid": 2,
             "imgid": 1}]},
    ]}
    src = write_json(tmp_path / "dataset_flickr30k.json", data)
    import_karpathy(src, tmp_path / "out")
    train, test = TextStore(tmp_path / "out" / "train"), TextStore(tmp_path / "out" / "test")
    assert train.txt2img == {"0": "1000092795", "1": "1000092795"} and test.txt2img == {"2": "10002456"}
    assert test.get("2").token_ids.tolist() == ours(data["images"][1]["sentences"][0]["raw"])


def test_region_store_check_names_image_or_skips_with_count(tmp_path):
    src = write_json(tmp_path / "dataset_coco.json", coco_json())
    rng = np.random.default_rng(0)
    with RegionStoreWriter(tmp_path / "feats", feat_dim=4, num_labels=None) as w:
        for cocoid in (9, 109, 309):  # image 209 (val) has no features
            w.add(str(cocoid), features=rng.normal(size=(2, 4)), boxes=np.array([[0, 0, .5, .5], [.1, .1, 1, 1]]))
    with pytest.raises(DataFormatError, match=r"dataset_coco\.json: image '209': has no features in region store"):
        import_karpathy(src, tmp_path / "out", region_store=tmp_path / "feats")
    reports = import_karpathy(src, tmp_path / "out2", region_store=tmp_path / "feats", skip_bad=True)
    assert reports["(parse)"].skipped == {"image has no features": 1, "caption of an image without features": 2}
    assert reports["val"].written == 0 and reports["train"].written == 2
    assert len(TextStore(tmp_path / "out2" / "val")) == 0


@pytest.mark.parametrize("kind, match", [
    ("missing", r"dataset_coco\.json: image 1 \(COCO_train2014_000000000109\.jpg\): missing field 'sentences'"),
    ("type", r"dataset_coco\.json: image 2 \(COCO_val2014_000000000209\.jpg\) sentence 1: field 'sentid' should be "
             r"int, got str"),
    ("split", r"dataset_coco\.json: image 0 \(COCO_train2014_000000000009\.jpg\): split 'dev' is not one of"),
    ("empty", r"dataset_coco\.json: image 3 \(COCO_val2014_000000000309\.jpg\) sentence 0 \(sentid 6\): empty caption"),
    ("dup", r"dataset_coco\.json: image 1 \(COCO_train2014_000000000109\.jpg\) sentence 0 \(sentid 0\): sentid used"),
    ("cocoid", r"dataset_coco\.json: image 3 \(COCO_val2014_000000000309\.jpg\): missing field 'cocoid'"),
])
def test_karpathy_malformed_records(tmp_path, kind, match):
    data = coco_json()
    imgs = data["images"]
    if kind == "missing":
        del imgs[1]["sentences"]
    elif kind == "type":
        imgs[2]["sentences"][1]["sentid"] = "5"
    elif kind == "split":
        imgs[0]["split"] = "dev"
    elif kind == "empty":
        imgs[3]["sentences"][0]["raw"] = "  "
    elif kind == "dup":
        imgs[1]["sentences"][0]["sentid"] = 0
    elif kind == "cocoid":
        del imgs[3]["cocoid"]
    src = write_json(tmp_path / "dataset_coco.json", data)
    with pytest.raises(DataFormatError, match=match):
        read_karpathy(src)
    report = ImportReport("k", skip_bad=True)
    _, caps = read_karpathy(src, report=report)
    assert report.total_skipped == 1 and len(caps) == 6  # the whole bad image is left out, counted once


def test_karpathy_truncated_file_and_cli(tmp_path, capsys):
    src = tmp_path / "dataset_coco.json"
    text = json.dumps(coco_json())
    src.write_text(text[: len(text) // 2])
    with pytest.raises(DataFormatError, match=r"dataset_coco\.json: line 1 column \d+: truncated JSON"):
        import_karpathy(src, tmp_path / "out")
    src.write_text(text)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    captions.register_cli(sub)
    uniter_txt.register_cli(sub)
    args = parser.parse_args(["coco_karpathy", str(src), "--out", str(tmp_path / "out"), "--splits", "val,test",
                              "--max-text-len", "3"])
    reports = args.func(args)
    assert sorted(reports) == ["test", "val"]
    out = capsys.readouterr().out
    assert "dataset_coco.json [val]: wrote 2 record(s), skipped 0" in out and f"kept 2: {TOO_LONG}" in out
    assert TextStore(tmp_path / "out" / "val").get("4").token_ids.tolist() == ours(COCO_SENTS[4])


# ---------------------------------------------------------------------------------------------
# UNITER txt_db, written the way the original writer writes it

META = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [106, 28996]}


def txt_value(d: dict) -> bytes:
    return lz4.frame.compress(msgpack.packb(d, use_bin_type=True))


def write_txt_db(folder, records: dict[str, dict], *, values: dict[str, bytes] | None = None,
                 side: dict[str, dict] | None = None) -> str:
    path = os.fspath(folder)
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, d in records.items():
            txn.put(key.encode("utf-8"), (values or {}).get(key) or txt_value(d))
    env.close()
    txt2img = {k: d["img_fname"] for k, d in records.items()}
    img2txts: dict = {}
    for k, d in records.items():
        img2txts.setdefault(d["img_fname"] if isinstance(d["img_fname"], str) else d["img_fname"][0], []).append(k)
    files = {"meta.json": META, "id2len.json": {k: len(d["input_ids"]) for k, d in records.items()},
             "txt2img.json": txt2img, "img2txts.json": img2txts}
    files.update(side or {})
    for name, obj in files.items():
        write_json(os.path.join(path, name), obj)
    return path


def vqa_records() -> dict[str, dict]:
    return {
        "262148000": {"input_ids": [1327, 1110, 1103, 1299, 1833, 136], "img_fname": "coco_val2014_000000262148.npz",
                      "raw": "What is the man doing?", "question_id": 262148000,
                      "target": {"labels": [12, 40], "scores": [1.0, 0.3]}},
        "262148001": {"input_ids": [1327, 2942, 1110, 1103, 2365, 136], "img_fname": "coco_val2014_000000262148.npz",
                      "raw": "What color is the shirt?", "question_id": 262148001,
                      "target": {"labels": [3], "scores": [0.9]}},
        "nlvr2-0": {"input_ids": [1247, 1132, 1160, 6363, 119], "img_fname": ["nlvr2_a-img0.npz", "nlvr2_a-img1.npz"],
                    "raw": "There are two dogs.", "target": 1},
    }


def test_txt_db_keeps_original_ids_and_extra_fields(tmp_path):
    recs = vqa_records()
    db = write_txt_db(tmp_path / "vqa.db", recs)
    report = import_uniter_txt_db(db, tmp_path / "out")
    assert report.written == 3 and report.total_skipped == 0
    store = TextStore(tmp_path / "out")
    assert store.meta["tokenizer_name"] == "bert-base-cased" and store.vocab_size == 28996
    assert store.special_ids == {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
    for key, d in recs.items():
        rec = store.get(key)
        assert rec.token_ids.tolist() == d["input_ids"] and rec.raw == d["raw"]
    assert store.get("262148000").extra == {"question_id": 262148000, "target": {"labels": [12, 40], "scores": [1.0, 0.3]}}
    pair = store.get("nlvr2-0")
    assert pair.img_id == "nlvr2_a-img0.npz" and pair.extra == {"target": 1, "img_fname": recs["nlvr2-0"]["img_fname"]}
    assert store.img2txts["coco_val2014_000000262148.npz"] == ["262148000", "262148001"]


def test_txt_db_retokenize_through_cli(tmp_path, capsys):
    db = write_txt_db(tmp_path / "vqa.db", vqa_records())
    parser = argparse.ArgumentParser()
    uniter_txt.register_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["uniter_txt_db", db, "--out", str(tmp_path / "out"), "--retokenize", "--max-text-len", "4"])
    report = args.func(args)
    assert report.written == 3 and report.noted[TOO_LONG] == 3
    assert "wrote 3 record(s), skipped 0" in capsys.readouterr().out
    store = TextStore(tmp_path / "out")
    assert store.meta["tokenizer_name"] == "bert-base-uncased" and store.vocab_size == 30522
    assert store.get("262148001").token_ids.tolist() == ours("What color is the shirt?")  # kept whole


@pytest.mark.parametrize("kind, match", [
    ("truncated", r"record '262148001': not a complete lz4 frame"),
    ("msgpack", r"record '262148001': unreadable msgpack value"),
    ("missing", r"record '262148001': missing field 'input_ids'"),
    ("vocab", r"record '262148001': input_ids outside the vocabulary \[0, 28996\)"),
    ("txt2img", r"record '262148001': img_fname 'coco_val2014_000000262148\.npz' but txt2img\.json says 'x\.npz'"),
    ("id2len", r"id2len\.json: id 'ghost': listed but not in the LMDB"),
])
def test_txt_db_corrupt_records_are_named(tmp_path, kind, match):
    recs = vqa_records()
    d = recs["262148001"]
    values, side = {}, {}
    if kind == "truncated":
        values["262148001"] = txt_value(d)[:-7]
    elif kind == "msgpack":
        values["262148001"] = lz4.frame.compress(msgpack.packb(d, use_bin_type=True)[:-5])
    elif kind == "missing":
        values["262148001"] = txt_value({k: v for k, v in d.items() if k != "input_ids"})
    elif kind == "vocab":
        values["262148001"] = txt_value({**d, "input_ids": [1327, 40000]})
    elif kind == "txt2img":
        side["txt2img.json"] = {**{k: r["img_fname"] for k, r in recs.items()}, "262148001": "x.npz"}
    elif kind == "id2len":
        side["id2len.json"] = {**{k: len(r["input_ids"]) for k, r in recs.items()}, "ghost": 3}
    db = write_txt_db(tmp_path / "vqa.db", recs, values=values, side=side)
    with pytest.raises(DataFormatError, match=match):
        import_uniter_txt_db(db, tmp_path / "out")
    report = import_uniter_txt_db(db, tmp_path / "out2", skip_bad=True)
    assert report.total_skipped == 1 and report.written == (3 if kind == "id2len" else 2)


def test_txt_db_bad_meta(tmp_path):
    db = write_txt_db(tmp_path / "t.db", vqa_records(), side={"meta.json": {**META, "v_range": [106]}})
    with pytest.raises(DataFormatError, match=r"meta\.json: meta: field 'v_range' should be \[first, end\] ints"):
        import_uniter_txt_db(db, tmp_path / "out")


@needs_fixtures
def test_original_txt_db_round_trip(tmp_path):
    src = os.path.join(FIXTURES, "txt_db", "fake.db")
    report = import_uniter_txt_db(src, tmp_path / "out")
    store = TextStore(tmp_path / "out")
    side = {n: read_json(os.path.join(src, n)) for n in ("txt2img.json", "img2txts.json", "id2len.json", "meta.json")}
    assert report.written == len(side["id2len.json"]) == len(store)
    assert store.txt2img == side["txt2img.json"]
    assert store.img2txts == side["img2txts.json"]
    assert store.id2len == side["id2len.json"]
    meta = side["meta.json"]
    assert store.meta["tokenizer_name"] == meta["bert"] and store.vocab_size == meta["v_range"][1]
    assert {store.special_ids[k] for k in ("cls", "sep", "mask", "unk")} == {meta[k] for k in ("CLS", "SEP", "MASK", "UNK")}
    # token ids equal the ones in the original LMDB, read here independently
    env = lmdb.open(src, readonly=True, lock=False, create=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            d = msgpack.unpackb(lz4.frame.decompress(value), raw=False)
            rec = store.get(key.decode())
            assert rec.token_ids.tolist() == d["input_ids"]
            assert rec.img_id == d["img_fname"] and rec.raw == d["raw"]
    env.close()


@needs_fixtures
def test_original_txt_db_retokenized(tmp_path):
    src = os.path.join(FIXTURES, "txt_db", "fake.db")
    import_uniter_txt_db(src, tmp_path / "out", retokenize=True)
    store = TextStore(tmp_path / "out")
    some = store.ids()[:5]
    for txt_id in some:
        rec = store.get(txt_id)
        assert rec.token_ids.tolist() == ours(rec.raw)
    assert re.fullmatch(r"fake_\d{6}\.npz", store.get(some[0]).img_id)


def test_every_importer_module_registers_its_subcommands():
    import importlib

    from tests.conftest import ROOT
    from tools.prepare_data import build_parser
    from vlframe.data.importers import CLI_MODULES

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in CLI_MODULES:  # a clash of subcommand names would raise here
        importlib.import_module(name).register_cli(sub)
    # one list: tools/prepare_data.py offers exactly these, and the README names exactly these
    tool = build_parser()._subparsers._group_actions[0].choices
    assert list(tool) == list(sub.choices)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    listed = {"synthetic"} | set(re.search(r"prepare_data\.py \{([^}]*)\}", readme).group(1).replace("\n", "")
                                   .replace(" ", "").split(","))
    assert listed == set(sub.choices)
    args = parser.parse_args(["uniter_txt_db", "x.db", "--out", "o", "--retokenize", "--skip-bad"])
    assert args.func is uniter_txt.run_cli and args.retokenize and args.skip_bad and args.check_side_files
