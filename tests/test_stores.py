import os
import pickle

import lmdb
import msgpack
import numpy as np
import pytest

from vlframe.data.stores import (
    DataQualityError,
    RegionStore,
    RegionStoreWriter,
    TextStore,
    TextStoreWriter,
    all_finite,
    box7,
)

D, C = 8, 5
SPECIAL = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}


def _image(rng, k, d=D, c=C):
    x1 = rng.uniform(0, 0.5, k)
    y1 = rng.uniform(0, 0.5, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.1, 0.5, k), y1 + rng.uniform(0.1, 0.5, k)], 1)
    soft = rng.dirichlet(np.ones(c), k)
    conf = rng.uniform(0, 1, k)
    return dict(features=rng.normal(size=(k, d)).astype(np.float32), boxes=boxes, soft_labels=soft, conf=conf)


@pytest.fixture
def region_store(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"img{i}": _image(rng, k) for i, k in enumerate([3, 12, 30])}
    path = tmp_path / "regions"
    with RegionStoreWriter(path, feat_dim=D, num_labels=C) as w:
        for i, (img_id, im) in enumerate(images.items()):
            w.add(img_id, **im, width=640 + i, height=480)
    return path, images


def test_box7_from_4_and_6():
    b = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    out = box7(b)
    np.testing.assert_allclose(out, [[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16], [0, 0, 1, 1, 1, 1, 1]], rtol=1e-6)
    assert out.dtype == np.float32
    b6 = np.array([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]])
    np.testing.assert_allclose(box7(b6), out[:1], rtol=1e-6)
    with pytest.raises(ValueError, match="K, 4"):
        box7(np.zeros((2, 5)))


def test_region_round_trip(region_store):
    path, images = region_store
    s = RegionStore(path, conf_threshold=None, max_regions=100)
    assert len(s) == 3 and s.ids() == ["img0", "img1", "img2"] and "img1" in s and "nope" not in s
    assert s.feat_dim == D and s.num_labels == C
    for i, (img_id, im) in enumerate(images.items()):
        r = s.get(img_id)
        order = np.argsort(-im["conf"], kind="stable")
        assert r.features.dtype == np.float16 and r.boxes.dtype == np.float32 and r.conf.dtype == np.float32
        np.testing.assert_array_equal(r.features, im["features"][order].astype(np.float16))
        np.testing.assert_allclose(r.features.astype(np.float32), im["features"][order], atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(r.boxes, box7(im["boxes"])[order], rtol=1e-6)
        np.testing.assert_allclose(r.soft_labels, im["soft_labels"][order], atol=1e-3)
        np.testing.assert_allclose(r.conf, im["conf"][order].astype(np.float32))
        assert np.all(np.diff(r.conf) <= 0)
        assert (r.width, r.height) == (640 + i, 480)


def test_region_selection(region_store):
    path, images = region_store
    confs = {k: np.sort(v["conf"])[::-1] for k, v in images.items()}

    def expected(img_id, t, lo, hi):
        n = len(confs[img_id])
        return min(n, min(hi, max(lo, int((confs[img_id] > t).sum()))))

    for t, lo, hi in [(0.2, 10, 100), (0.5, 2, 8), (0.9, 0, 100), (0.0, 1, 5)]:
        s = RegionStore(path, conf_threshold=t, min_regions=lo, max_regions=hi)
        for img_id in images:
            k = expected(img_id, t, lo, hi)
            assert s.num_regions(img_id) == k
            r = s.get(img_id)
            assert r.features.shape == (k, D) and r.boxes.shape == (k, 7) and r.conf.shape == (k,)
            np.testing.assert_allclose(r.conf, confs[img_id][:k].astype(np.float32))
    s = RegionStore(path, fixed_regions=7)
    assert [s.num_regions(i) for i in images] == [3, 7, 7]
    s = RegionStore(path, conf_threshold=None, max_regions=20)
    assert [s.num_regions(i) for i in images] == [3, 12, 20]
    np.testing.assert_array_equal(s.num_regions_array(), [3, 12, 20])


def test_region_store_pickles_and_reopens(region_store):
    path, _ = region_store
    s = RegionStore(path)
    r0 = s.get("img2")
    s2 = pickle.loads(pickle.dumps(s))
    r1 = s2.get("img2")
    np.testing.assert_array_equal(r0.features, r1.features)
    assert s2.num_regions("img2") == s.num_regions("img2")


def test_conf_defaults_to_non_background_probability(tmp_path):
    soft = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    with RegionStoreWriter(tmp_path / "r", feat_dim=2, num_labels=3) as w:
        w.add("a", features=np.ones((2, 2)), boxes=[[0, 0, 1, 1], [0, 0, 0.5, 0.5]], soft_labels=soft)
    r = RegionStore(tmp_path / "r", conf_threshold=None).get("a")
    np.testing.assert_allclose(r.conf, [0.9, 0.1], rtol=1e-6)  # sorted: second region first
    np.testing.assert_allclose(r.boxes[0], [0, 0, 0.5, 0.5, 0.5, 0.5, 0.25])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=np.ones((2, D + 1))), r"dim 9, the store's feat_dim is 8"),
        (dict(features=np.array([[np.nan] * D, [0.0] * D])), "NaN"),
        (dict(features=np.ones((0, D)), boxes=np.zeros((0, 4)), soft_labels=np.zeros((0, C))), "no regions"),
        (dict(boxes=np.array([[0, 0, 1.5, 1], [0, 0, 1, 1]])), "normalised"),
        (dict(boxes=np.zeros((3, 4))), r"boxes must be \[K=2"),
        (dict(soft_labels=np.ones((2, C + 1)) / (C + 1)), r"soft_labels must be \[K=2, C=5\]"),
        (dict(conf=[0.5]), "conf must have K=2"),
    ],
)
def test_region_writer_validation(tmp_path, kwargs, match):
    good = dict(features=np.ones((2, D)), boxes=np.array([[0, 0, 1, 1], [0.1, 0.1, 0.2, 0.2]]),
                soft_labels=np.ones((2, C)) / C)
    path = tmp_path / "r"
    with RegionStoreWriter(path, feat_dim=D, num_labels=C) as w:
        with pytest.raises(ValueError, match=match) as e:
            w.add("bad_img", **{**good, **kwargs})
        assert str(path) in str(e.value) and "bad_img" in str(e.value)
        w.add("ok", **good)
        with pytest.raises(ValueError, match="duplicate img_id 'ok'"):
            w.add("ok", **good)
    assert RegionStore(path).ids() == ["ok"]


def test_region_reader_errors(tmp_path, region_store):
    path, _ = region_store
    with pytest.raises(ValueError, match=rf"{path}.*dim 8 but 16 is expected"):
        RegionStore(path, expect_feat_dim=16)
    assert RegionStore(path, expect_feat_dim=8).feat_dim == 8
    with pytest.raises(KeyError, match="unknown img_id 'nope'") as e:
        RegionStore(path).get("nope")
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        RegionStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a region store"):
        RegionStore(tmp_path / "empty")
    # a writer that failed part-way leaves nothing under the store's name (it wrote aside)
    with pytest.raises(RuntimeError):
        with RegionStoreWriter(tmp_path / "half", feat_dim=D, num_labels=C) as w:
            w.add("a", **_image(np.random.default_rng(1), 3))
            raise RuntimeError("crash")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        RegionStore(tmp_path / "half")
    assert not [n for n in os.listdir(tmp_path) if "half" in n]
    with pytest.raises(FileExistsError):
        RegionStoreWriter(path, feat_dim=D, num_labels=C)


def test_region_corrupt_record(region_store):
    path, _ = region_store
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"img1", b"\xc1 not msgpack")
        rec = msgpack.unpackb(txn.get(b"img2"), raw=False)
        rec["features"]["data"] = rec["features"]["data"][:-4]  # truncated array
        txn.put(b"img2", msgpack.packb(rec, use_bin_type=True))
        rec = msgpack.unpackb(txn.get(b"img0"), raw=False)
        feats = np.frombuffer(rec["features"]["data"], np.float16).copy()
        feats[0] = np.nan
        rec["features"]["data"] = feats.tobytes()
        txn.put(b"img0", msgpack.packb(rec, use_bin_type=True))
    env.close()
    s = RegionStore(path)
    for img_id, what in [("img1", "corrupt record"), ("img2", "cannot be decoded"), ("img0", "non-finite")]:
        with pytest.raises(ValueError, match=what) as e:
            s.get(img_id)
        assert str(path) in str(e.value) and repr(img_id) in str(e.value)
        assert isinstance(e.value, DataQualityError) == (img_id == "img0")


def _text_store(path, **kw):
    return TextStoreWriter(path, tokenizer_name="bert-base-uncased", special_ids=SPECIAL, vocab_size=1000, **kw)


def test_text_round_trip_and_maps(tmp_path):
    path = tmp_path / "t"
    with _text_store(path) as w:
        w.add("t0", token_ids=[5, 6, 7], img_id="a", raw="x y z", extra={"answers": ["yes"], "score": 1.0})
        w.add("t1", token_ids=np.array([8], np.int64), img_id="a")
        w.add("t2", token_ids=[9, 10], img_id="b", extra={"img2": "c"})
        w.add("t3", token_ids=[11])
    s = TextStore(path)
    assert len(s) == 4 and s.ids() == ["t0", "t1", "t2", "t3"]
    assert s.id2len == {"t0": 3, "t1": 1, "t2": 2, "t3": 1}
    assert s.txt2img == {"t0": "a", "t1": "a", "t2": "b"}
    assert s.img2txts == {"a": ["t0", "t1"], "b": ["t2"]}
    assert s.meta["special_ids"] == SPECIAL and s.vocab_size == 1000 and s.meta["count"] == 4
    assert s.meta["tokenizer_name"] == "bert-base-uncased"
    r = s.get("t0")
    assert r.token_ids.dtype == np.int32 and r.token_ids.tolist() == [5, 6, 7]
    assert (r.img_id, r.raw, r.extra) == ("a", "x y z", {"answers": ["yes"], "score": 1.0})
    assert s.get("t3").img_id is None and s.get("t3").extra == {}
    assert pickle.loads(pickle.dumps(s)).get("t2").extra == {"img2": "c"}
    with pytest.raises(KeyError, match="unknown txt_id 'zz'"):
        s.get("zz")


def test_text_writer_validation(tmp_path):
    path = tmp_path / "t"
    with _text_store(path) as w:
        with pytest.raises(ValueError, match=r"txt_id 'e'.*empty text") as e:
            w.add("e", token_ids=[])
        assert str(path) in str(e.value)
        with pytest.raises(ValueError, match=r"txt_id 'o'.*token id 1000 outside the vocabulary \[0, 1000\)"):
            w.add("o", token_ids=[1, 1000])
        with pytest.raises(ValueError, match="token id -1"):
            w.add("n", token_ids=[-1])
        with pytest.raises(ValueError, match="msgpack"):
            w.add("x", token_ids=[1], extra={"bad": object()})
        w.add("ok", token_ids=[1])
        with pytest.raises(ValueError, match="duplicate txt_id 'ok'"):
            w.add("ok", token_ids=[2])
    assert TextStore(path).ids() == ["ok"]
    with pytest.raises(FileNotFoundError):
        TextStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a text store"):
        TextStore(tmp_path / "empty")
    with pytest.raises(ValueError, match="special_ids lacks"):
        TextStoreWriter(tmp_path / "u", tokenizer_name="x", special_ids={"cls": 1}, vocab_size=10)


def test_text_corrupt_record(tmp_path):
    path = tmp_path / "t"
    with _text_store(path) as w:
        w.add("t0", token_ids=[5, 6, 7])
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        rec = msgpack.unpackb(txn.get(b"t0"), raw=False)
        rec["ids"]["data"] = np.array([5, 6, 7, 8], np.int32).tobytes()
        rec["ids"]["shape"] = [4]
        txn.put(b"t0", msgpack.packb(rec, use_bin_type=True))
    env.close()
    with pytest.raises(ValueError, match=r"txt_id 't0': corrupt record") as e:
        TextStore(path).get("t0")
    assert os.fspath(path) in str(e.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_matches_numpy(dtype):
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal, np.inf, -np.inf, np.nan,
                        -np.nan], dtype=dtype)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.normal(scale=10.0, size=(int(rng.integers(0, 6)), 7)).astype(dtype)
        if a.size and rng.random() < 0.5:
            a.flat[rng.integers(a.size)] = special[rng.integers(len(special))]
        assert all_finite(a) == bool(np.isfinite(a).all())
        assert all_finite(a[:2]) == bool(np.isfinite(a[:2]).all())
    assert all_finite(special[:6]) and not any(all_finite(special[i:i + 1]) for i in range(6, 10))
    assert not all_finite(np.array([[1.0, np.nan]], np.float64)[:, ::-1])  # other dtypes/layouts: numpy


def test_region_get_without_soft_labels(region_store):
    path, images = region_store
    s = RegionStore(path, conf_threshold=None)
    full, lean = s.get("img1"), s.get("img1", soft_labels=False)
    assert lean.soft_labels is None and full.soft_labels.shape == (12, C)
    np.testing.assert_array_equal(lean.features, full.features)
    assert not lean.features.flags.writeable  # a view of the record, not a copy
    assert [s.num_stored(i) for i in images] == [3, 12, 30]
    assert RegionStore(path, fixed_regions=2).num_stored("img2") == 30
