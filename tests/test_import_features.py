"""Region-feature importers: bottom-up-attention TSV, UNITER img_db (msgpack and npz values) and
UNITER npz folders, on small files written here in the original layouts, plus the genuine samples
written by the original UNITER code (skipped when the fixtures folder is absent)."""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest

from tests.conftest import UNITER_DB
from tests.conftest import needs_fixtures as needs_fixtures_at

from vlframe.data.importers.common import DataFormatError
from vlframe.data.importers.features import (TSV_LAYOUTS, import_npz_dir, import_tsv, import_uniter_img_db,
                                             iter_uniter_img_db, register_cli)
from vlframe.data.stores import RegionStore, box7

FIXTURES = UNITER_DB
D, C = 16, 9  # small feature / label sizes keep the tests fast


def b64(a: np.ndarray, dtype=np.float32) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def make_image(rng, k: int, w: int, h: int, *, cls: bool = True):
    x1 = rng.uniform(0, w / 2, k)
    y1 = rng.uniform(0, h / 2, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, k), y1 + rng.uniform(1, h / 2, k)], 1).astype(np.float32)
    feats = rng.normal(size=(k, D)).astype(np.float32)
    prob = rng.dirichlet(np.ones(C), size=k).astype(np.float32) if cls else None
    return boxes, feats, prob


def tsv_line(cols: list[str]) -> str:
    return "\t".join(cols) + "\n"


def write_tsv(path, images, *, layout: int = 7) -> None:
    """Images as bottom-up-attention's generate_tsv.py writes them (``layout`` = column count)."""
    with open(path, "w") as f:
        for img_id, w, h, boxes, feats, prob, objs in images:
            k = len(boxes)
            if layout in (6, 7):
                cols = [str(img_id), str(w), str(h), str(k), b64(boxes), b64(feats)]
                if layout == 7:
                    cols.append(b64(prob))
            else:  # LXMERT order: height before width, then object / attribute predictions
                obj_id, obj_conf = objs
                cols = [str(img_id), str(h), str(w), b64(obj_id, np.int64), b64(obj_conf), b64(obj_id, np.int64),
                        b64(obj_conf), str(k), b64(boxes), b64(feats)]
            f.write(tsv_line(cols))


def sample_images(rng, n=3, cls=True):
    out = []
    for i in range(n):
        k = 3 + 2 * i
        w, h = 640 - 40 * i, 480 + 10 * i
        boxes, feats, prob = make_image(rng, k, w, h, cls=cls)
        objs = (rng.integers(0, 1600, k), rng.uniform(0.05, 1, k).astype(np.float32))
        out.append((1000 + i, w, h, boxes, feats, prob, objs))
    return out


def by_conf(conf: np.ndarray) -> np.ndarray:
    # the store keeps regions highest confidence first (stable for ties)
    return np.argsort(-conf.astype(np.float32), kind="stable")


def test_tsv_with_cls_prob_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = sample_images(rng)
    write_tsv(tmp_path / "feats.tsv", images, layout=7)
    report = import_tsv(tmp_path / "feats.tsv", tmp_path / "store")
    assert report.written == 3 and report.total_skipped == 0
    store = RegionStore(tmp_path / "store", conf_threshold=None)
    assert store.ids() == ["1000", "1001", "1002"] and store.feat_dim == D and store.num_labels == C
    for img_id, w, h, boxes, feats, prob, _ in images:
        rec = store.get(str(img_id))
        conf = prob[:, 1:].max(1)  # best non-background class
        o = by_conf(conf)
        np.testing.assert_allclose(rec.conf, conf[o], rtol=0, atol=0)
        np.testing.assert_allclose(rec.features.astype(np.float32), feats[o], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rec.boxes, box7(boxes[o] / np.array([w, h, w, h], np.float32)), atol=1e-6)
        np.testing.assert_allclose(rec.soft_labels.astype(np.float32), prob[o], atol=1e-3)
        assert (rec.width, rec.height) == (w, h)


def test_tsv_plain_six_columns_conf_one(tmp_path):
    rng = np.random.default_rng(1)
    images = sample_images(rng, n=2, cls=False)
    write_tsv(tmp_path / "a.tsv", images, layout=6)
    import_tsv(tmp_path / "a.tsv", tmp_path / "store")
    store = RegionStore(tmp_path / "store", conf_threshold=None)
    assert store.num_labels is None
    rec = store.get("1001")
    _, w, h, boxes, feats, _, _ = images[1]
    assert rec.soft_labels is None
    np.testing.assert_array_equal(rec.conf, np.ones(len(boxes), np.float32))
    np.testing.assert_allclose(rec.features.astype(np.float32), feats, atol=1e-3)
    np.testing.assert_allclose(rec.boxes[:, :4], boxes / np.array([w, h, w, h], np.float32), atol=1e-6)


def test_tsv_lxmert_layout_uses_objects_conf_and_height_first(tmp_path):
    rng = np.random.default_rng(2)
    images = sample_images(rng, n=2)
    write_tsv(tmp_path / "lx.tsv", images, layout=10)
    import_tsv(tmp_path / "lx.tsv", tmp_path / "store")
    store = RegionStore(tmp_path / "store", conf_threshold=None)
    for img_id, w, h, boxes, feats, _, (_, obj_conf) in images:
        rec = store.get(str(img_id))
        o = by_conf(obj_conf)
        np.testing.assert_array_equal(rec.conf, obj_conf[o])
        assert (rec.width, rec.height) == (w, h)
        np.testing.assert_allclose(rec.boxes[:, :4], boxes[o] / np.array([w, h, w, h], np.float32), atol=1e-6)


def test_tsv_explicit_fields(tmp_path):
    rng = np.random.default_rng(3)
    boxes, feats, prob = make_image(rng, 4, 100, 50)
    # a dump with its own column order: features before boxes, probabilities first
    with open(tmp_path / "x.tsv", "w") as f:
        f.write(tsv_line([b64(prob), "img7", "100", "50", "4", b64(feats), b64(boxes)]))
    import_tsv(tmp_path / "x.tsv", tmp_path / "store", fields="cls_prob,image_id,image_w,image_h,num_boxes,features,boxes")
    rec = RegionStore(tmp_path / "store", conf_threshold=None).get("img7")
    o = by_conf(prob[:, 1:].max(1))
    np.testing.assert_allclose(rec.boxes[:, :4], boxes[o] / np.array([100, 50, 100, 50], np.float32), atol=1e-6)
    with pytest.raises(ValueError, match="unknown TSV column"):
        import_tsv(tmp_path / "x.tsv", tmp_path / "s2", fields="image_id,image_w,image_h,num_boxes,boxes,features,bogus")


def _good_rows(rng, n=2):
    rows = []
    for img_id, w, h, boxes, feats, prob, _ in sample_images(rng, n=n):
        rows.append([str(img_id), str(w), str(h), str(len(boxes)), b64(boxes), b64(feats), b64(prob)])
    return rows


@pytest.mark.parametrize("kind, match", [
    ("columns", r"bad\.tsv: line 2: 6 column\(s\), expected 7"),
    ("size", r"bad\.tsv: line 2 \(image_id 1001\): column 'boxes' has \d+ bytes, expected num_boxes\*4\*4"),
    ("feat_dim", r"bad\.tsv: line 2 \(image_id 1001\): column 'features' has \d+ bytes, expected num_boxes\*16\*4"),
    ("base64", r"bad\.tsv: line 2 \(image_id 1001\): column 'features' is not valid base64"),
    ("nan", r"bad\.tsv: line 2 \(image_id 1001\): features contains NaN"),
    ("int", r"bad\.tsv: line 2 \(image_id 1001\): column 'num_boxes' is not an integer"),
    ("truncated", r"bad\.tsv: line 3 \(image_id 1002\): truncated last line: column 'cls_prob'"),
    ("truncated_cols", r"bad\.tsv: line 3: truncated last line: 6 column\(s\), expected 7"),
])
def test_tsv_malformed_lines_name_file_and_line(tmp_path, kind, match):
    rng = np.random.default_rng(4)
    rows = _good_rows(rng, n=3)
    bad = rows[1]
    k = int(bad[3])
    if kind == "columns":
        bad.pop()
    elif kind == "size":
        bad[4] = b64(np.zeros((k - 1, 4)))
    elif kind == "feat_dim":
        bad[5] = b64(np.zeros((k, D + 1)))
    elif kind == "base64":
        bad[5] = bad[5][:-3] + "*=="
    elif kind == "nan":
        f = np.zeros((k, D), np.float32)
        f[1, 2] = np.nan
        bad[5] = b64(f)
    elif kind == "int":
        bad[3] = "five"
    text = "".join(tsv_line(r) for r in rows)
    if kind == "truncated":  # a copy that stopped in the middle of the last line's last column
        text = text.rstrip("\n")[: len(text) - len(rows[2][6]) // 2]
    elif kind == "truncated_cols":  # ... or before its last column
        text = text.rstrip("\n")[: len(text) - len(rows[2][6]) - 2]
    (tmp_path / "bad.tsv").write_text(text)
    with pytest.raises(DataFormatError, match=match):
        import_tsv(tmp_path / "bad.tsv", tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="folder not found"):  # the stopped import left nothing
        RegionStore(tmp_path / "store")
    # skip mode: the bad line is counted by reason, the others are written
    report = import_tsv(tmp_path / "bad.tsv", tmp_path / "store", skip_bad=True, overwrite=True)
    assert report.written == 2 and report.total_skipped == 1
    assert "skipped 1:" in report.summary()
    assert len(RegionStore(tmp_path / "store", conf_threshold=None)) == 2


def test_tsv_unknown_column_count_and_empty(tmp_path):
    (tmp_path / "odd.tsv").write_text("a\tb\tc\n")
    with pytest.raises(DataFormatError, match=r"odd\.tsv: line 1: 3 column\(s\); known layouts have"):
        import_tsv(tmp_path / "odd.tsv", tmp_path / "s")
    (tmp_path / "odd.tsv").write_text("a\tb\tc\n")
    with pytest.raises(DataFormatError, match=r"no image could be read; .*'wrong column count': 1"):
        import_tsv(tmp_path / "odd.tsv", tmp_path / "s2", skip_bad=True)
    assert sorted(TSV_LAYOUTS) == [6, 7, 10, 11]


def test_tsv_cli_subcommand(tmp_path, capsys):
    rng = np.random.default_rng(5)
    write_tsv(tmp_path / "f.tsv", sample_images(rng, n=2), layout=7)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["tsv_features", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "o"), "--feat-dim", str(D)])
    report = args.func(args)
    assert report.written == 2
    assert "wrote 2 record(s), skipped 0" in capsys.readouterr().out
    args = parser.parse_args(["tsv_features", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "o2"), "--feat-dim", "32"])
    with pytest.raises(DataFormatError, match=r"f\.tsv: line 1 \(image_id 1000\): column 'features'"):
        args.func(args)


# ---------------------------------------------------------------------------------------------
# UNITER img_db / npz, written the way the original convert scripts write them


def uniter_dump(rng, n: int, *, dim: int = D, labels: int = C) -> dict[str, np.ndarray]:
    x1, y1 = rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n)
    w, h = rng.uniform(0.05, 0.5, n), rng.uniform(0.05, 0.5, n)
    norm_bb = np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float16)
    conf = np.sort(rng.uniform(0, 1, n))[::-1].astype(np.float16)[:, None]
    return {"features": rng.normal(size=(n, dim)).astype(np.float16), "norm_bb": norm_bb, "conf": conf,
            "soft_labels": rng.dirichlet(np.ones(labels), size=n).astype(np.float16)}


def encode_msgpack(d) -> bytes:
    return msgpack.packb(d, default=msgpack_numpy.encode, use_bin_type=True)


def encode_npz(d) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **d)
    return buf.getvalue()


def write_img_db(folder, dumps: dict[str, dict], *, compressed=False, values: dict[str, bytes] | None = None,
                 nbb: bool = True) -> str:
    """An img_db as UNITER writes it: one value per image, ``__keys__``, and the nbb side file."""
    name = "feat_th0.2_max100_min10" + ("_compressed" if compressed else "")
    path = os.path.join(folder, name)
    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, d in dumps.items():
            value = (values or {}).get(key) or (encode_npz(d) if compressed else encode_msgpack(d))
            txn.put(key.encode("utf-8"), value)
        txn.put(b"__keys__", json.dumps(list(dumps)).encode("utf-8"))
    env.close()
    if nbb:
        with open(os.path.join(folder, "nbb_th0.2_max100_min10.json"), "w") as f:
            json.dump({k: int(d["features"].shape[0]) for k, d in dumps.items()}, f)
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_uniter_img_db_round_trip(tmp_path, compressed):
    rng = np.random.default_rng(6)
    dumps = {f"coco_val2014_{i:012d}.npz": uniter_dump(rng, 10 + 3 * i) for i in range(3)}
    db = write_img_db(tmp_path, dumps, compressed=compressed)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["uniter_img_db", db, "--out", str(tmp_path / "store")])
    assert args.func(args).written == 3
    store = RegionStore(tmp_path / "store", conf_threshold=None)
    assert store.ids() == list(dumps) and (store.feat_dim, store.num_labels) == (D, C)
    for key, d in dumps.items():
        rec = store.get(key)
        assert (rec.width, rec.height) == (0, 0)
        np.testing.assert_array_equal(rec.features, d["features"])  # fp16 in, fp16 out: exact
        np.testing.assert_array_equal(rec.boxes, box7(d["norm_bb"].astype(np.float32)))
        np.testing.assert_array_equal(rec.conf, d["conf"][:, 0].astype(np.float32))
        np.testing.assert_array_equal(rec.soft_labels, d["soft_labels"])


def _corrupt(kind, d):
    if kind == "truncated":
        return encode_msgpack(d)[:-100], r"record 'b\.npz': unreadable msgpack value"
    if kind == "truncated_npz":
        return encode_npz(d)[:-100], r"record 'b\.npz': unreadable npz value"
    if kind == "missing":
        return encode_msgpack({k: v for k, v in d.items() if k != "norm_bb"}), r"record 'b\.npz': missing field 'norm_bb'"
    if kind == "dim":
        return encode_msgpack({**d, "features": d["features"][:, :-1]}), \
            r"record 'b\.npz': features has shape \[\d+, 15\], expected \[\*, 16\]"
    if kind == "nan":
        f = d["features"].copy()
        f[0, 0] = np.nan
        return encode_msgpack({**d, "features": f}), r"record 'b\.npz': features contains NaN"
    if kind == "boxes":
        return encode_msgpack({**d, "norm_bb": d["norm_bb"][:, :4]}), r"record 'b\.npz': norm_bb has shape"
    if kind == "not_array":
        return encode_msgpack({**d, "conf": [0.5]}), r"record 'b\.npz': field 'conf' is a list, not an array"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "truncated_npz", "missing", "dim", "nan", "boxes", "not_array"])
def test_uniter_img_db_corrupt_values_are_named(tmp_path, kind):
    rng = np.random.default_rng(7)
    dumps = {n: uniter_dump(rng, 12) for n in ("a.npz", "b.npz", "c.npz")}
    value, match = _corrupt(kind, dumps["b.npz"])
    db = write_img_db(tmp_path, dumps, values={"b.npz": value}, nbb=False)
    with pytest.raises(DataFormatError, match=re.escape(db) + ": " + match):
        import_uniter_img_db(db, tmp_path / "store")
    report = import_uniter_img_db(db, tmp_path / "store2", skip_bad=True)
    assert report.written == 2 and report.total_skipped == 1
    assert RegionStore(tmp_path / "store2", conf_threshold=None).ids() == ["a.npz", "c.npz"]


def test_uniter_img_db_nbb_and_keys_checks(tmp_path):
    rng = np.random.default_rng(8)
    dumps = {n: uniter_dump(rng, 11) for n in ("a.npz", "b.npz")}
    db = write_img_db(tmp_path, dumps)
    with open(tmp_path / "nbb_th0.2_max100_min10.json", "w") as f:
        json.dump({"a.npz": 11, "b.npz": 12}, f)
    with pytest.raises(DataFormatError, match=r"record 'b\.npz': 11 boxes, .*nbb_th0\.2_max100_min10\.json says 12"):
        import_uniter_img_db(db, tmp_path / "s")
    assert import_uniter_img_db(db, tmp_path / "s2", nbb=None).written == 2
    env = lmdb.open(db, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", json.dumps(["a.npz", "zz.npz"]).encode())
    env.close()
    with pytest.raises(DataFormatError, match=r"record 'zz\.npz': listed in __keys__ but absent"):
        import_uniter_img_db(db, tmp_path / "s3", nbb=None)
    with pytest.raises(DataFormatError, match="not an LMDB folder"):
        import_uniter_img_db(tmp_path, tmp_path / "s4")


def test_npz_folder_round_trip_and_bad_file(tmp_path):
    rng = np.random.default_rng(9)
    src = tmp_path / "npz"
    src.mkdir()
    dumps = {f"img{i}.npz": uniter_dump(rng, 15 + i) for i in range(2)}
    for name, d in dumps.items():
        np.savez_compressed(src / name, **d)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["uniter_npz", str(src), "--out", str(tmp_path / "store"), "--feat-dim", str(D)])
    assert args.func(args).written == 2
    store = RegionStore(tmp_path / "store", conf_threshold=None)
    for name, d in dumps.items():
        np.testing.assert_array_equal(store.get(name).features, d["features"])
        np.testing.assert_array_equal(store.get(name).soft_labels, d["soft_labels"])
    (src / "img9.npz").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"img9\.npz: file: not an npz"):
        import_npz_dir(src, tmp_path / "s2")
    report = import_npz_dir(src, tmp_path / "s3", skip_bad=True)
    assert report.written == 2 and report.skipped == {"not an npz file": 1}


# ---------------------------------------------------------------------------------------------
# the genuine samples written by the original UNITER code

needs_fixtures = needs_fixtures_at("uniter_db_sample")


@needs_fixtures
@pytest.mark.parametrize("variant", ["feat_th0.2_max100_min10", "feat_th0.2_max100_min10_compressed"])
def test_original_img_db_equals_npz_cut_to_nbb(variant):
    db = os.path.join(FIXTURES, "img_db", "fake", variant)
    with open(os.path.join(FIXTURES, "img_db", "fake", "nbb_th0.2_max100_min10.json")) as f:
        nbb = json.load(f)
    records = {r.img_id: r for r in iter_uniter_img_db(db)}  # also checks every count against nbb
    assert sorted(records) == sorted(nbb)
    npz_names = sorted(os.listdir(os.path.join(FIXTURES, "npz")))
    assert npz_names
    for name in npz_names:
        with np.load(os.path.join(FIXTURES, "npz", name)) as z:
            n = nbb[name]
            rec = records[name]
            np.testing.assert_array_equal(rec.features, z["features"][:n])
            np.testing.assert_array_equal(rec.boxes, z["norm_bb"][:n])
            np.testing.assert_array_equal(rec.conf, z["conf"][:n, 0])
            np.testing.assert_array_equal(rec.soft_labels, z["soft_labels"][:n])


@needs_fixtures
def test_original_dumps_give_the_same_region_store(tmp_path):
    """npz folder -> store with UNITER's selection (th 0.2, 10..100) == img_db -> store as cut."""
    base = os.path.join(FIXTURES, "img_db", "fake")
    import_npz_dir(os.path.join(FIXTURES, "npz"), tmp_path / "from_npz")
    import_uniter_img_db(os.path.join(base, "feat_th0.2_max100_min10"), tmp_path / "plain")
    import_uniter_img_db(os.path.join(base, "feat_th0.2_max100_min10_compressed"), tmp_path / "comp")
    from_npz = RegionStore(tmp_path / "from_npz", conf_threshold=0.2, min_regions=10, max_regions=100)
    plain = RegionStore(tmp_path / "plain", conf_threshold=None)
    comp = RegionStore(tmp_path / "comp", conf_threshold=None)
    assert len(plain) == len(comp) == 24 and plain.feat_dim == 2048 and plain.num_labels == 1601
    for name in from_npz.ids():
        a, b, c = from_npz.get(name), plain.get(name), comp.get(name)
        assert a.num_regions == b.num_regions == c.num_regions
        for field in ("features", "boxes", "conf", "soft_labels"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            np.testing.assert_array_equal(getattr(b, field), getattr(c, field))


@needs_fixtures
def test_original_img_db_opened_read_only(tmp_path):
    # The fixture folder is read-only: reading must neither need a lock file nor write one.
    db = os.path.join(FIXTURES, "img_db", "fake", "feat_th0.2_max100_min10")
    before = sorted(os.listdir(db))
    assert sum(1 for _ in iter_uniter_img_db(db)) == 24
    assert sorted(os.listdir(db)) == before



def test_tsv_store_refusal_and_binary_junk_name_file_and_line(tmp_path):
    rng = np.random.default_rng(10)
    rows = _good_rows(rng, n=2)
    rows[1][1] = "20"  # image_w far too small: the normalised boxes leave [0, 1]
    (tmp_path / "w.tsv").write_text("".join(tsv_line(r) for r in rows))
    with pytest.raises(DataFormatError, match=r"w\.tsv: line 2 \(image_id 1001\): region store .*boxes must be normalised"):
        import_tsv(tmp_path / "w.tsv", tmp_path / "s")
    report = import_tsv(tmp_path / "w.tsv", tmp_path / "s2", skip_bad=True)
    assert report.written == 1 and report.skipped == {"refused by the store": 1}
    good = tsv_line(_good_rows(rng, n=1)[0]).encode()
    (tmp_path / "bin.tsv").write_bytes(good + b"\xff\xfe\x00junk\n" + good.replace(b"1000", b"1002", 1))
    with pytest.raises(DataFormatError, match=r"bin\.tsv: line 2: not UTF-8 text"):
        import_tsv(tmp_path / "bin.tsv", tmp_path / "s3")
    report = import_tsv(tmp_path / "bin.tsv", tmp_path / "s4", skip_bad=True)
    assert report.written == 2 and report.skipped == {"not UTF-8 text": 1}
    assert RegionStore(tmp_path / "s4", conf_threshold=None).ids() == ["1000", "1002"]
