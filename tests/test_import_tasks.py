"""Task-annotation importers (VQA v2, NLVR2, SNLI-VE, RefCOCO*, VCR) on small format-faithful files.

Every input file is written here into tmp_path in its public layout; round trips read the records
back from our text store and compare them with the input and with tokenising the raw text.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle

import numpy as np
import pytest

from vlframe.data.importers.common import DataFormatError
from vlframe.data.importers.tasks import (
    SafeUnpickler,
    TOO_LONG,
    VQA_VOCAB_FILE,
    import_nlvr2,
    import_refcoco,
    import_snli_ve,
    import_vcr,
    import_vqa,
    load_plain_pickle,
    nlvr2_image_names,
    register_cli,
)
from vlframe.data.stores import RegionStoreWriter, TextStore
from vlframe.data.tokenizer import build_tokenizer
from vlframe.data.vqa_vocab import (
    answer_scores,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    soft_score,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def region_store(path, img_ids, dim=8):
    rng = np.random.default_rng(0)
    with RegionStoreWriter(str(path), feat_dim=dim, num_labels=None) as w:
        for img in img_ids:
            w.add(img, features=rng.standard_normal((3, dim)), boxes=np.array([[0, 0, .5, .5], [.1, .2, .9, .8], [0, 0, 1, 1]]))
    return str(path)


# --------------------------------------------------------------------------- VQA answer handling


@pytest.mark.parametrize("raw, want", [
    ("Two", "2"), ("none", "0"), ("The dog.", "dog"), ("a cat", "cat"), ("yes/no", "yes no"),
    ("1,000", "1000"), ("3.5", "3.5"), ("Dont know", "don't know"), ("couldnt've", "couldn't've"),
    ("red, white", "red white"), ("hi - there", "hi there"), ("t-shirt", "t shirt"),
    ("  Left\tside\n", "left side"), ("it's", "it's"), ("well", "well"), ("10:30", "10:30"),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def brute_force_accuracy(answer, humans):
    # The official definition, literally: mean over every subset leaving one human out.
    accs = [min(1.0, sum(h == answer for h in subset) / 3.0)
            for subset in itertools.combinations(humans, len(humans) - 1)]
    return sum(accs) / len(accs)


@pytest.mark.parametrize("m", [10, 3, 7])
def test_soft_score_is_official_leave_one_out_average(m):
    for n in range(m + 1):
        humans = ["x"] * n + [f"o{i}" for i in range(m - n)]
        assert soft_score(n, m) == pytest.approx(brute_force_accuracy("x", humans), abs=1e-12)
    assert [round(soft_score(n), 10) for n in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]


def test_answer_scores_normalise_before_counting():
    humans = ["Two", "2", "two.", "3", "three", "yes", "yes", "yes", "yes", "no"]
    s = answer_scores(humans)
    assert s == pytest.approx({"2": 0.9, "3": 0.6, "yes": 1.0, "no": 0.3})


def test_build_and_load_answer_vocab(tmp_path):
    mc = ["yes"] * 5 + ["No"] * 5 + ["2"] * 3 + ["two"] + ["cat"] * 4 + ["dog"] * 3
    assert build_answer_vocab(mc, min_count=4) == ["no", "yes", "2", "cat"]  # count desc, then text
    (tmp_path / "v.txt").write_text("yes\nno\n2\n", encoding="utf-8")
    write_json(tmp_path / "v.json", ["yes", "no"])
    write_json(tmp_path / "a2l.json", {"no": 1, "yes": 0})
    assert load_answer_vocab(tmp_path / "v.txt") == ["yes", "no", "2"]
    assert load_answer_vocab(tmp_path / "v.json") == ["yes", "no"]
    assert load_answer_vocab(tmp_path / "a2l.json") == ["yes", "no"]
    write_json(tmp_path / "bad.json", {"no": 1, "yes": 2})
    with pytest.raises(ValueError, match=r"bad\.json: labels must be the integers 0\.\.1"):
        load_answer_vocab(tmp_path / "bad.json")
    (tmp_path / "dup.txt").write_text("yes\nno\nyes\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup\.txt: answer 'yes' appears twice"):
        load_answer_vocab(tmp_path / "dup.txt")


# --------------------------------------------------------------------------- VQA v2 import


def vqa_files(tmp_path, *, annotate=True):
    info = {"info": {"description": "VQA v2"}, "license": {"name": "CC"}, "task_type": "Open-Ended",
            "data_type": "mscoco", "data_subtype": "val2014"}
    questions = [
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
        {"image_id": 42, "question": "What color is the frisbee?", "question_id": 421},
        {"image_id": 7, "question": "Is it raining?", "question_id": 70},
    ]
    q = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", info | {"questions": questions})
    if not annotate:
        return q, None

    def answers(texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]

    anns = [
        {"question_id": 420, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": answers(["2", "two", "2", "2", "3", "2", "2", "three", "2", "4"])},
        {"question_id": 421, "image_id": 42, "answer_type": "other", "question_type": "what color is the",
         "multiple_choice_answer": "red", "answers": answers(["red", "Red", "red and white", "red", "pink", "red",
                                                              "orange", "red.", "red", "red"])},
        {"question_id": 70, "image_id": 7, "answer_type": "yes/no", "question_type": "is it",
         "multiple_choice_answer": "no", "answers": answers(["no"] * 10)},
    ]
    a = write_json(tmp_path / "v2_mscoco_val2014_annotations.json",
                   {k: v for k, v in info.items() if k != "task_type"} | {"annotations": anns})
    return q, a


def test_vqa_round_trip(tmp_path, tok):
    q, a = vqa_files(tmp_path)
    vocab = ["yes", "no", "2", "3", "red", "4", "pink"]
    rep = import_vqa(q, a, out=tmp_path / "out", answer_vocab=vocab,
                     img_id_format="COCO_{data_subtype}_{image_id:012d}")
    assert rep.written == 3 and rep.total_skipped == 0
    store = TextStore(tmp_path / "out")
    r = store.get("420")
    assert r.raw == "How many dogs are there?"
    assert r.token_ids.tolist() == ids_of(tok, r.raw)
    assert r.img_id == "COCO_val2014_000000000042"
    # "2": 6 + "two" = 7 humans -> 1.0; "3"/"three": 2 -> 0.6; "4": 1 -> 0.3
    assert r.extra == {"question_id": 420, "answers": [2, 3, 5], "scores": pytest.approx([1.0, 0.6, 0.3]),
                       "answer_type": "number", "question_type": "how many"}
    r = store.get("421")  # red x7 (incl. "Red", "red.") -> 1.0, pink 0.3; "red and white", "orange" not in vocab
    assert r.extra["answers"] == [4, 6] and r.extra["scores"] == pytest.approx([1.0, 0.3])
    assert store.get("70").extra["answers"] == [1] and store.get("70").extra["scores"] == [1.0]
    assert store.img2txts["COCO_val2014_000000000042"] == ["420", "421"]
    assert load_answer_vocab(tmp_path / "out" / VQA_VOCAB_FILE) == vocab


def test_vqa_builds_vocab_and_test_split(tmp_path, tok):
    q, a = vqa_files(tmp_path)
    rep = import_vqa(q, a, out=tmp_path / "out", min_answer_count=1)
    vocab = load_answer_vocab(tmp_path / "out" / VQA_VOCAB_FILE)
    assert sorted(vocab) == ["2", "no", "red"]  # the multiple_choice_answers
    assert rep.written == 3
    rec = TextStore(tmp_path / "out").get("421")
    assert [vocab[i] for i in rec.extra["answers"]] == ["red"]
    # test split: questions only, no targets
    (tmp_path / "t").mkdir()
    qt, _ = vqa_files(tmp_path / "t", annotate=False)
    rep = import_vqa(qt, out=tmp_path / "test")
    store = TextStore(tmp_path / "test")
    assert rep.written == 3 and store.get("70").extra == {"question_id": 70} and store.get("70").img_id == "7"
    assert not (tmp_path / "test" / VQA_VOCAB_FILE).exists()


def test_vqa_missing_field_names_file_and_record(tmp_path):
    q, a = vqa_files(tmp_path)
    data = json.loads(a.read_text())
    del data["annotations"][1]["answers"]
    write_json(a, data)
    with pytest.raises(DataFormatError, match=r"v2_mscoco_val2014_annotations\.json: record 1 \(question_id 421\): missing field 'answers'"):
        import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"])
    assert not (tmp_path / "out").exists()  # strict failure writes nothing
    rep = import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"], skip_bad=True)
    assert rep.written == 2 and rep.skipped == {"missing field 'answers'": 1, "question without annotation": 1}
    assert "skipped 1: missing field 'answers'" in rep.summary()


def test_vqa_wrong_type_and_truncated(tmp_path):
    q, a = vqa_files(tmp_path)
    data = json.loads(q.read_text())
    data["questions"][2]["question_id"] = "70"
    write_json(q, data)
    with pytest.raises(DataFormatError, match=r"questions\.json: record 2: field 'question_id' should be int, got str"):
        import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"])
    text = a.read_text()
    a.write_text(text[: len(text) // 2])
    with pytest.raises(DataFormatError, match=r"annotations\.json: line 1 column \d+: truncated JSON"):
        import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"])


def test_vqa_missing_image_features(tmp_path):
    q, a = vqa_files(tmp_path)
    rs = region_store(tmp_path / "regions", ["42"])
    with pytest.raises(DataFormatError, match=r"questions\.json: record 2 \(question_id 70\): image '7' has no features"):
        import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"], region_store=rs)
    rep = import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"], region_store=rs, skip_bad=True)
    assert rep.written == 2 and rep.skipped == {"image not in region store": 1}
    assert TextStore(tmp_path / "out").ids() == ["420", "421"]


def test_too_long_texts_are_kept_and_counted(tmp_path, tok):
    q, a = vqa_files(tmp_path)
    rep = import_vqa(q, a, out=tmp_path / "out", answer_vocab=["2"], max_text_len=5)
    store = TextStore(tmp_path / "out")
    long_ones = [i for i in store.ids() if len(ids_of(tok, store.get(i).raw)) > 5]
    assert rep.written == 3 and rep.noted[TOO_LONG] == len(long_ones) == 2
    assert store.id2len["420"] == len(ids_of(tok, "How many dogs are there?"))  # not cut
    assert f"kept 2: {TOO_LONG}" in rep.summary()


# --------------------------------------------------------------------------- NLVR2


def nlvr2_rows():
    return [
        {"validation": {"r1": "T"}, "sentence": "The left image contains twice the number of dogs as the right image.",
         "left_url": "http://example.org/a.jpg", "writer": "103", "label": "True", "identifier": "dev-850-0-0",
         "extra_validations": {}, "synset": "n02099601", "query": "golden retriever 15", "directory": 21,
         "right_url": "http://example.org/b.jpg"},
        {"sentence": "One image shows exactly two brown acorns.", "label": "False", "identifier": "dev-12-3-1",
         "synset": "n12267677", "query": "acorn 7"},
    ]


def test_nlvr2_round_trip(tmp_path, tok):
    src = write_jsonl(tmp_path / "dev.json", nlvr2_rows())
    rep = import_nlvr2(src, out=tmp_path / "out", img_id_format="nlvr2_{name}.npz",
                       region_store=region_store(tmp_path / "r", [f"nlvr2_dev-850-0-img{i}.npz" for i in (0, 1)]
                                                 + [f"nlvr2_dev-12-3-img{i}.npz" for i in (0, 1)]))
    assert rep.written == 2
    store = TextStore(tmp_path / "out")
    r = store.get("dev-850-0-0")
    assert r.img_id == "nlvr2_dev-850-0-img0.npz"
    assert r.extra == {"img_ids": ["nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"], "label": 1,
                       "identifier": "dev-850-0-0"}
    assert r.token_ids.tolist() == ids_of(tok, nlvr2_rows()[0]["sentence"])
    assert store.get("dev-12-3-1").extra["label"] == 0
    assert nlvr2_image_names("test1-0-1-0") == ("test1-0-1-img0", "test1-0-1-img1")


def test_nlvr2_malformed_line_bad_label_and_missing_right_image(tmp_path):
    rows = nlvr2_rows()
    src = tmp_path / "dev.json"
    src.write_text(json.dumps(rows[0]) + "\n" + '{"sentence": "broken", "label": "Tr\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataFormatError, match=r"dev\.json: line 2: malformed JSON"):
        import_nlvr2(src, out=tmp_path / "out")
    rep = import_nlvr2(src, out=tmp_path / "out", skip_bad=True)
    assert rep.written == 2 and rep.skipped == {"malformed JSON line": 1}

    rows[1]["label"] = "maybe"
    write_jsonl(src, rows)
    with pytest.raises(DataFormatError, match=r"dev\.json: line 2 \(identifier dev-12-3-1\): label 'maybe'"):
        import_nlvr2(src, out=tmp_path / "out2")
    rows[1]["label"] = "False"
    write_jsonl(src, rows)
    rs = region_store(tmp_path / "r", ["dev-850-0-img0", "dev-850-0-img1", "dev-12-3-img0"])  # no right image
    with pytest.raises(DataFormatError, match=r"dev\.json: line 2 \(identifier dev-12-3-1\): image 'dev-12-3-img1' has no features"):
        import_nlvr2(src, out=tmp_path / "out2", region_store=rs)


# --------------------------------------------------------------------------- SNLI-VE


def snli_rows():
    base = {"annotator_labels": ["neutral"], "captionID": "3416050480.jpg#4", "sentence1": "A man in a blue shirt.",
            "sentence1_binary_parse": "( ( A man ) )", "sentence2_parse": "(ROOT (S))"}
    return [
        base | {"Flikr30kID": "3416050480.jpg", "gold_label": "entailment", "pairID": "3416050480.jpg#4r1e",
                "sentence2": "A man is outdoors."},
        base | {"Flikr30kID": "3416050480.jpg", "gold_label": "neutral", "pairID": "3416050480.jpg#4r1n",
                "sentence2": "The man is waiting for his wife."},
        base | {"Flikr30kID": "2267923837.jpg", "gold_label": "contradiction", "pairID": "2267923837.jpg#2r1c",
                "sentence2": "Nobody is there."},
        base | {"Flikr30kID": "2267923837.jpg", "gold_label": "-", "pairID": "2267923837.jpg#2r1x",
                "sentence2": "Something happens."},
    ]


def test_snli_ve_round_trip(tmp_path, tok):
    src = write_jsonl(tmp_path / "snli_ve_dev.jsonl", snli_rows())
    rep = import_snli_ve(src, out=tmp_path / "out", region_store=region_store(tmp_path / "r", ["3416050480", "2267923837"]))
    assert rep.written == 3 and rep.skipped == {"no gold label ('-': annotators disagreed)": 1}
    store = TextStore(tmp_path / "out")
    got = {i: (store.get(i).extra["label"], store.get(i).img_id) for i in store.ids()}
    assert got == {"3416050480.jpg#4r1e": (0, "3416050480"), "3416050480.jpg#4r1n": (1, "3416050480"),
                   "2267923837.jpg#2r1c": (2, "2267923837")}
    r = store.get("3416050480.jpg#4r1n")
    assert r.raw == "The man is waiting for his wife." and r.token_ids.tolist() == ids_of(tok, r.raw)
    assert r.extra["pair_id"] == "3416050480.jpg#4r1n"


def test_snli_ve_errors(tmp_path):
    rows = snli_rows()[:3]
    del rows[2]["sentence2"]
    src = write_jsonl(tmp_path / "snli_ve_dev.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"snli_ve_dev\.jsonl: line 3 \(pairID 2267923837\.jpg#2r1c\): missing field 'sentence2'"):
        import_snli_ve(src, out=tmp_path / "out")
    rows[2]["sentence2"] = "x"
    rows[1]["gold_label"] = "Neutral"
    write_jsonl(src, rows)
    with pytest.raises(DataFormatError, match=r"line 2 .*gold_label 'Neutral' is not one of entailment, neutral, contradiction"):
        import_snli_ve(src, out=tmp_path / "out")
    rs = region_store(tmp_path / "r", ["3416050480"])
    rep = import_snli_ve(src, out=tmp_path / "out", region_store=rs, skip_bad=True)
    assert rep.written == 1 and rep.skipped == {"unknown gold_label": 1, "image not in region store": 1}


# --------------------------------------------------------------------------- RefCOCO


def refcoco_files(tmp_path):
    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000581_1.jpg", "ann_id": 1001, "ref_id": 0,
         "image_id": 581, "split": "train", "category_id": 1,
         "sentences": [{"tokens": ["man", "on", "left"], "raw": "Man on left", "sent_id": 0, "sent": "man on left"},
                       {"tokens": ["guy", "in", "red"], "raw": "guy in red", "sent_id": 1, "sent": "guy in red"}]},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000900_7.jpg", "ann_id": 1002, "ref_id": 1,
         "image_id": 900, "split": "testA", "category_id": 18,
         "sentences": [{"tokens": ["dog"], "raw": "dog!", "sent_id": 2, "sent": "dog"}]},
    ]
    p = tmp_path / "refs(unc).p"
    with open(p, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    inst = {"info": {}, "licenses": [],
            "images": [{"id": 581, "file_name": "COCO_train2014_000000000581.jpg", "width": 640, "height": 480},
                       {"id": 900, "file_name": "COCO_train2014_000000000900.jpg", "width": 500, "height": 400}],
            "annotations": [{"id": 1001, "image_id": 581, "bbox": [64.0, 48.0, 320.0, 240.0], "category_id": 1,
                             "area": 76800.0, "iscrowd": 0, "segmentation": [[64, 48, 384, 48, 384, 288]]},
                            {"id": 1002, "image_id": 900, "bbox": [0, 100, 250, 300], "category_id": 18,
                             "area": 75000.0, "iscrowd": 0, "segmentation": []}],
            "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                           {"id": 18, "name": "dog", "supercategory": "animal"}]}
    return p, write_json(tmp_path / "instances.json", inst)


def test_refcoco_round_trip(tmp_path, tok):
    refs, inst = refcoco_files(tmp_path)
    rep = import_refcoco(refs, inst, out=tmp_path / "out", img_id_format="{file_stem}")
    assert rep.written == 3
    store = TextStore(tmp_path / "out")
    r = store.get("1")
    assert r.raw == "guy in red" and r.token_ids.tolist() == ids_of(tok, "guy in red")
    assert r.img_id == "COCO_train2014_000000000581"
    assert r.extra == {"ref_id": 0, "ann_id": 1001, "target_box": pytest.approx([0.1, 0.1, 0.6, 0.6]),
                       "category_id": 1, "split": "train"}
    assert store.get("2").extra["target_box"] == pytest.approx([0.0, 0.25, 0.5, 1.0])
    rep = import_refcoco(refs, inst, out=tmp_path / "testA", splits=["testA"])
    assert TextStore(tmp_path / "testA").ids() == ["2"] and TextStore(tmp_path / "testA").get("2").img_id == "900"
    assert rep.skipped == {"sentence of split 'train' (not in splits)": 2}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refcoco_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    with open(evil, "wb") as f:
        pickle.dump([{"ref_id": 0, "payload": _Evil(marker)}], f, protocol=2)
    (tmp_path / "x").mkdir()
    _, inst = refcoco_files(tmp_path / "x")
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p: refused global (posix|nt|os)\.system"):
        import_refcoco(evil, inst, out=tmp_path / "out")
    assert not marker.exists()
    # a class instance is refused the same way, even a harmless one
    with open(evil, "wb") as f:
        pickle.dump({"a": argparse.Namespace(x=1)}, f, protocol=4)
    with pytest.raises(DataFormatError, match=r"refused global argparse\.Namespace"):
        load_plain_pickle(evil)
    assert issubclass(SafeUnpickler, pickle.Unpickler)


def test_refcoco_errors(tmp_path):
    refs, inst = refcoco_files(tmp_path)
    data = pickle.loads(refs.read_bytes())
    data[1]["ann_id"] = 555
    with open(refs, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p: record 1 \(ref_id 1\): ann_id 555 is not in .*instances\.json"):
        import_refcoco(refs, inst, out=tmp_path / "out")
    rep = import_refcoco(refs, inst, out=tmp_path / "out", skip_bad=True)
    assert rep.written == 2 and rep.skipped == {"ann_id not in instances": 1}
    data[1]["ann_id"] = 1002
    data[0]["sentences"][1]["sent"] = 7
    with open(refs, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataFormatError, match=r"record 0 \(ref_id 0\) sentences\[1\] \(sent_id 1\): field 'sent' should be str"):
        import_refcoco(refs, inst, out=tmp_path / "out2")
    refs.write_bytes(refs.read_bytes()[:40])
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p: truncated pickle"):
        import_refcoco(refs, inst, out=tmp_path / "out2")
    rs = region_store(tmp_path / "r", ["900"])
    data[0]["sentences"][1]["sent"] = "guy in red"
    with open(refs, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataFormatError, match=r"record 0 \(ref_id 0\) sentences\[0\] \(sent_id 0\): image '581' has no features"):
        import_refcoco(refs, inst, out=tmp_path / "out2", region_store=rs)


# --------------------------------------------------------------------------- VCR


def vcr_rows():
    return [
        {"movie": "3015_CHARLIE_ST_CLOUD", "objects": ["person", "person", "car"],
         "interesting_scores": [0], "answer_likelihood": "likely",
         "img_fn": "lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935-00.24.00.783@0.jpg",
         "metadata_fn": "lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935-00.24.00.783@0.json",
         "answer_orig": "He is worried.", "question_orig": "Why is 1 looking at 3?", "rationale_orig": "...",
         "question": ["Why", "is", [0], "looking", "at", [2], "?"],
         "answer_match_iter": [3, 0, 2, 1], "answer_sources": [1, 2, 3, 4],
         "answer_choices": [["He", "is", "worried", "."], [[0, 1], "are", "lost", "."],
                            ["The", [2], "is", "red", "."], ["Nothing", "."]],
         "answer_label": 0,
         "rationale_choices": [[[0], "frowns", "."], ["It", "rains", "."], [[1], "waves", "."], ["No", "."]],
         "rationale_label": 2, "img_id": "val-0", "question_number": 1, "annot_id": "val-0", "match_fold": "val-0",
         "match_index": 0},
        {"movie": "1054_Harry_Potter", "objects": ["person", "dog"],
         "img_fn": "lsmdc_1054_Harry_Potter/1054_Harry_Potter_00.01.03.000-00.01.05.000@2.jpg",
         "metadata_fn": "lsmdc_1054_Harry_Potter/x.json", "question_orig": "What is 2 doing?",
         "question": ["What", "is", [1], "doing", "?"],
         "answer_choices": [["Sleeping", "."], ["Barking", "at", [0], "."]], "answer_label": 1,
         "rationale_choices": [["Its", "mouth", "is", "open", "."], ["Dogs", "sleep", "."]], "rationale_label": 0,
         "annot_id": "val-1"},
    ]


def test_vcr_round_trip(tmp_path, tok):
    src = write_jsonl(tmp_path / "val.jsonl", vcr_rows())
    rep = import_vcr(src, out=tmp_path / "out")
    assert rep.written == 2
    store = TextStore(tmp_path / "out")
    r = store.get("val-0")
    assert r.raw == "Why is person looking at car ?"
    assert r.img_id == "lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935-00.24.00.783@0"
    assert r.token_ids.tolist() == ids_of(tok, r.raw)
    e = r.extra
    assert e["answer_label"] == 0 and e["rationale_label"] == 2 and e["objects"] == ["person", "person", "car"]
    texts = ["He is worried .", "person and person are lost .", "The car is red .", "Nothing ."]
    assert e["answer_choices"] == [ids_of(tok, t) for t in texts]
    assert e["rationale_choices"][0] == ids_of(tok, "person frowns .")
    ids = r.token_ids.tolist()
    assert [(tok.convert_ids_to_tokens(ids[s:t]), o) for s, t, o in e["object_refs"]] == [(["person"], 0), (["car"], 2)]
    assert e["answer_refs"][1] == [[0, 1, 0], [2, 3, 1]] and e["answer_refs"][0] == []
    assert e["rationale_refs"][2] == [[0, 1, 1]]


def test_vcr_names_and_test_split(tmp_path, tok):
    rows = vcr_rows()
    for r in rows:
        del r["answer_label"], r["rationale_label"]
    src = write_jsonl(tmp_path / "test.jsonl", rows)
    rep = import_vcr(src, out=tmp_path / "out", ref_style="name", img_id_format="{movie}")
    store = TextStore(tmp_path / "out")
    r = store.get("val-0")
    assert rep.written == 2 and "answer_label" not in r.extra and "rationale_label" not in r.extra
    assert r.raw == "Why is Casey looking at car ?" and r.img_id == "3015_CHARLIE_ST_CLOUD"
    ids = r.token_ids.tolist()
    s, t, o = r.extra["object_refs"][0]
    assert tok.decode(ids[s:t]) == "casey" and o == 0


def test_vcr_errors(tmp_path):
    rows = vcr_rows()
    rows[1]["question"] = ["What", "is", [5], "?"]
    src = write_jsonl(tmp_path / "val.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"val\.jsonl: line 2 \(annot_id val-1\) question: token 2 refers to object 5 but there are 2 objects"):
        import_vcr(src, out=tmp_path / "out")
    rows[1]["question"] = ["What", "?"]
    rows[1]["answer_label"] = 4
    write_jsonl(src, rows)
    with pytest.raises(DataFormatError, match=r"line 2 \(annot_id val-1\): answer_label 4 is not in 0\.\.1"):
        import_vcr(src, out=tmp_path / "out")
    rows[1]["answer_label"] = 1
    rows[0]["objects"] = "person"
    write_jsonl(src, rows)
    with pytest.raises(DataFormatError, match=r"line 1 \(annot_id val-0\): field 'objects' should be list"):
        import_vcr(src, out=tmp_path / "out")
    rep = import_vcr(src, out=tmp_path / "out", skip_bad=True)
    assert rep.written == 1 and rep.skipped == {"field 'objects' has the wrong type": 1}


# --------------------------------------------------------------------------- shared behaviour and CLI


def test_duplicate_ids_existing_output_and_bad_format(tmp_path):
    rows = nlvr2_rows()
    src = write_jsonl(tmp_path / "dev.json", rows + [rows[0]])
    with pytest.raises(DataFormatError, match=r"dev\.json: line 3 \(identifier dev-850-0-0\): text id 'dev-850-0-0' already used by line 1"):
        import_nlvr2(src, out=tmp_path / "out")
    import_nlvr2(src, out=tmp_path / "out", skip_bad=True)
    with pytest.raises(FileExistsError, match="already exists"):
        import_nlvr2(src, out=tmp_path / "out", skip_bad=True)
    with pytest.raises(ValueError, match=r"img_id_format: unknown field \{image_id\}"):
        import_nlvr2(src, out=tmp_path / "o2", img_id_format="{image_id}")
    with pytest.raises(ValueError, match=r"img_id_format: unknown field \{name.__class__\}"):
        import_nlvr2(src, out=tmp_path / "o2", img_id_format="{name.__class__}")
    with pytest.raises(ValueError, match=r"img_id_format: nested fields"):
        import_nlvr2(src, out=tmp_path / "o2", img_id_format="{name:{name.__class__}}")


def test_cli_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="cmd", required=True))
    src = write_jsonl(tmp_path / "snli_ve_dev.jsonl", snli_rows())
    args = parser.parse_args(["snli_ve", "--jsonl", str(src), "--out", str(tmp_path / "out"), "--max-text-len", "5"])
    rep = args.func(args)
    assert rep.written == 3 and rep.noted[TOO_LONG] == 1
    assert "snli_ve: wrote 3 record(s), skipped 1" in capsys.readouterr().out
    q, a = vqa_files(tmp_path)
    (tmp_path / "vocab.txt").write_text("2\nno\nred\n")
    args = parser.parse_args(["vqa", "--questions", str(q), "--annotations", str(a), "--answer-vocab",
                              str(tmp_path / "vocab.txt"), "--out", str(tmp_path / "vqa")])
    assert args.func(args).written == 3
    assert TextStore(tmp_path / "vqa").get("70").extra["answers"] == [1]
    for cmd in ("nlvr2", "refcoco", "vcr"):
        assert parser.parse_args([cmd, "--out", "x"] + (["--refs", "r", "--instances", "i"] if cmd == "refcoco"
                                                         else ["--jsonl", "j"])).func is not None


def test_vqa_vocab_from_train_val_files_counts_bad_sources(tmp_path):
    q, a = vqa_files(tmp_path)
    data = json.loads(a.read_text())
    extra = data | {"annotations": [dict(x, question_id=x["question_id"] + 1000) for x in data["annotations"]]}
    del extra["annotations"][0]["multiple_choice_answer"]
    train = write_json(tmp_path / "v2_mscoco_train2014_annotations.json", extra)
    with pytest.raises(DataFormatError, match=r"train2014_annotations\.json: record 0: missing field 'multiple_choice_answer'"):
        import_vqa(q, a, out=tmp_path / "out", vocab_annotations=[train, a], min_answer_count=2)
    rep = import_vqa(q, a, out=tmp_path / "out", vocab_annotations=[train, a], min_answer_count=2, skip_bad=True)
    # "2" once in train (its record is bad) + once in val -> below 2; "red", "no" twice each
    assert load_answer_vocab(tmp_path / "out" / VQA_VOCAB_FILE) == ["no", "red"]
    assert rep.skipped == {"vocabulary source: missing field 'multiple_choice_answer'": 1}
    assert rep.noted == {"no answer in the answer vocabulary": 1}  # question 420: no "2" in the vocabulary
