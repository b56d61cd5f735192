"""Data-quality treatments (docs/data.md): long texts, images without regions, empty texts,
NaN features - at write time (writers refuse) and at read time (error, or skip with a count).

Bad records are written straight into the LMDB files, as a store written by other code or a
damaged one would hold them; the vlframe writers refuse to write them.
"""
import json
import logging

import lmdb
import msgpack
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlframe.data.batch import collate
from vlframe.data.dataset import ImageTextDataset
from vlframe.data.stores import DataQualityError, RegionStore, RegionStoreWriter, TextStoreWriter

D, C = 8, 5
SPECIAL = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
LOGGER = "vlframe.data.dataset"


def _image(rng, k, conf_hi=1.0):
    x1 = rng.uniform(0, 0.5, (k, 2))
    return dict(features=rng.normal(size=(k, D)), boxes=np.concatenate([x1, x1 + 0.3], 1),
                soft_labels=rng.dirichlet(np.ones(C), k), conf=rng.uniform(0.3, conf_hi, k))


@pytest.fixture
def stores(tmp_path):
    """4 images (``dim`` has only low-confidence regions), 5 texts (``t_long`` has 40 tokens)."""
    rng = np.random.default_rng(0)
    with RegionStoreWriter(tmp_path / "regions", feat_dim=D, num_labels=C) as w:
        for img, k in [("a", 5), ("b", 7), ("c", 6), ("d", 4)]:
            w.add(img, **_image(rng, k))
        w.add("dim", **{**_image(rng, 3), "conf": np.full(3, 0.05)})
    texts = {"t_a": ([5, 6], "a"), "t_b": ([7, 8, 9], "b"), "t_c": ([10], "c"), "t_d": ([11, 12], "d"),
             "t_long": (list(range(200, 240)), "a"), "t_dim": ([13], "dim")}
    with TextStoreWriter(tmp_path / "texts", tokenizer_name="bert-base-uncased", special_ids=SPECIAL,
                         vocab_size=1000) as w:
        for tid, (ids, img) in texts.items():
            w.add(tid, token_ids=ids, img_id=img)
    return tmp_path


def _ds(root, **kw):
    kw.setdefault("conf_threshold", None)
    return ImageTextDataset(region_store=str(root / "regions"), text_store=str(root / "texts"), **kw)


def _edit_record(path, key: bytes, edit) -> None:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        rec = msgpack.unpackb(txn.get(key), raw=False)
        edit(rec)
        txn.put(key, msgpack.packb(rec, use_bin_type=True))
    env.close()


def _empty_array(d: dict, shape) -> None:
    d["shape"], d["data"] = list(shape), b""


def _make_zero_regions(root, img_id: str) -> None:
    """Rewrite ``img_id`` as an image with K = 0, record and meta consistent with each other."""
    path = root / "regions"
    meta = {}
    _edit_record(path, b"\x00meta", meta.update)
    i = meta["ids"].index(img_id)
    nreg = np.frombuffer(meta["num_regions"]["data"], np.int32).copy()
    conf = np.frombuffer(meta["conf"]["data"], np.float32)
    start = int(nreg[:i].sum())
    conf = np.concatenate([conf[:start], conf[start + nreg[i]:]])
    nreg[i] = 0

    def edit_meta(m):
        m["num_regions"]["data"] = nreg.tobytes()
        m["conf"]["data"], m["conf"]["shape"] = conf.tobytes(), [len(conf)]

    def edit_rec(r):
        for name, tail in [("features", (D,)), ("boxes", (7,)), ("conf", ()), ("soft_labels", (C,))]:
            _empty_array(r[name], (0, *tail))

    _edit_record(path, b"\x00meta", edit_meta)
    _edit_record(path, img_id.encode(), edit_rec)


def _make_empty_text(root, txt_id: str) -> None:
    path = root / "texts"
    _edit_record(path, txt_id.encode(), lambda r: _empty_array(r["ids"], (0,)))
    id2len = json.loads((path / "id2len.json").read_text())
    id2len[txt_id] = 0
    (path / "id2len.json").write_text(json.dumps(id2len))


def _make_nan_features(root, img_id: str, what: str = "features") -> None:
    def edit(r):
        a = np.frombuffer(r[what]["data"], np.dtype(r[what]["dtype"])).copy()
        a[1] = np.nan
        r[what]["data"] = a.tobytes()

    _edit_record(root / "regions", img_id.encode(), edit)


# -- write time -----------------------------------------------------------------------------


def test_writers_refuse_bad_records(tmp_path):
    rng = np.random.default_rng(1)
    with RegionStoreWriter(tmp_path / "r", feat_dim=D, num_labels=C) as w:
        with pytest.raises(ValueError, match=r"img_id 'z': no regions \(K = 0\)") as e:
            w.add("z", features=np.zeros((0, D)), boxes=np.zeros((0, 4)), soft_labels=np.zeros((0, C)))
        assert str(tmp_path / "r") in str(e.value)
        bad = _image(rng, 3)
        bad["features"][2, 1] = np.nan
        with pytest.raises(ValueError, match=r"img_id 'n': features contain NaN"):
            w.add("n", **bad)
        w.add("ok", **_image(rng, 3))
    with TextStoreWriter(tmp_path / "t", tokenizer_name="x", special_ids=SPECIAL, vocab_size=1000) as w:
        with pytest.raises(ValueError, match=r"txt_id 'e': empty text"):
            w.add("e", token_ids=[], img_id="ok")
        w.add("ok", token_ids=[5], img_id="ok")
    ds = ImageTextDataset(region_store=str(tmp_path / "r"), text_store=str(tmp_path / "t"), conf_threshold=None)
    assert ds.txt_ids == ["ok"] and ds.skipped == {}


# -- read time ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_bad", [False, True])
def test_long_text_truncated_with_count_in_log(stores, caplog, skip_bad):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = _ds(stores, max_text_len=12, skip_bad=skip_bad)
    msgs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(msgs) == 1 and "1 of 6 texts are longer than max_text_len=12" in msgs[0]
    assert ds.num_truncated == 1 and len(ds) == 6  # truncated, never dropped
    i = ds.txt_ids.index("t_long")
    assert ds[i].input_ids.tolist() == [101] + list(range(200, 210)) + [102]
    assert ds.text_lengths()[i] == 12 and ds.lengths()[i] == 12 + 5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _ds(stores, max_text_len=42, skip_bad=skip_bad).num_truncated == 0
    assert not caplog.records


def test_zero_region_image(stores, caplog):
    _make_zero_regions(stores, "c")
    assert RegionStore(stores / "regions").num_stored("c") == 0
    with pytest.raises(DataQualityError, match=r"img_id 'c' \(of txt_id 't_c'\) has no regions; 1 such") as e:
        _ds(stores)
    assert e.value.reason == "zero_regions" and e.value.key == "c" and e.value.path == str(stores / "regions")
    assert str(stores / "regions") in str(e.value) and "skip_bad=True" in str(e.value)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = _ds(stores, skip_bad=True)
    assert ds.skipped == {"zero_regions": 1}
    assert [r.getMessage() for r in caplog.records if "skip_bad" in r.getMessage()] == [
        f"image_text dataset (region store {stores / 'regions'}): skip_bad: dropped 1 of 6 examples (zero regions)"]
    assert ds.txt_ids == ["t_a", "t_b", "t_d", "t_long", "t_dim"] and "c" not in ds.image_ids()
    assert ds.lengths().tolist() == [ds[i].num_units for i in range(len(ds))]
    # text_only reads no regions: the image is harmless there
    assert len(_ds(stores, text_only=True)) == 6


def test_no_region_selected(stores, caplog):
    # "dim" has 3 regions, none above 0.2; min_regions=0 then selects nothing
    with pytest.raises(DataQualityError, match=r"img_id 'dim' \(of txt_id 't_dim'\) has no region selected "
                                               r"\(0 of 3 pass conf_threshold=0.2 with min_regions=0\)"):
        _ds(stores, conf_threshold=0.2, min_regions=0)
    assert len(_ds(stores, conf_threshold=0.2, min_regions=1)) == 6  # the paper's min bound keeps it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = _ds(stores, conf_threshold=0.2, min_regions=0, skip_bad=True)
    assert ds.skipped == {"zero_regions": 1} and "t_dim" not in ds.txt_ids and len(ds) == 5
    with pytest.raises(ValueError, match="no example left"):
        _ds(stores, conf_threshold=0.2, min_regions=0, skip_bad=True, txt_ids=["t_dim"])


def test_empty_caption(stores, caplog):
    _make_empty_text(stores, "t_b")
    _make_zero_regions(stores, "c")  # two reasons at once: the error names the first, skip counts each
    with pytest.raises(DataQualityError, match=r"txt_id 't_b' is an empty text \(no tokens\); 1 empty") as e:
        _ds(stores)
    assert e.value.reason == "empty_text" and e.value.key == "t_b" and e.value.path == str(stores / "texts")
    assert str(stores / "texts") in str(e.value)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = _ds(stores, skip_bad=True)
    assert ds.skipped == {"empty_text": 1, "zero_regions": 1}
    logged = sorted(r.getMessage() for r in caplog.records if "skip_bad" in r.getMessage())
    assert logged == [
        f"image_text dataset (region store {stores / 'regions'}): skip_bad: dropped 1 of 6 examples (zero regions)",
        f"image_text dataset (text store {stores / 'texts'}): skip_bad: dropped 1 of 6 examples (empty text)"]
    assert ds.txt_ids == ["t_a", "t_d", "t_long", "t_dim"]
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.text_mask.sum(1).tolist() == [4, 4, 42, 3]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_nan_features_raise_on_read(stores, skip_bad):
    _make_nan_features(stores, "b")
    ds = _ds(stores, skip_bad=skip_bad)  # invisible in the meta: construction succeeds
    assert len(ds) == 6 and ds.skipped == {}
    i = ds.txt_ids.index("t_b")
    with pytest.raises(DataQualityError, match=r"img_id 'b': non-finite values \(NaN/inf\) in features") as e:
        ds[i]
    assert e.value.reason == "non_finite" and e.value.key == "b" and str(stores / "regions") in str(e.value)
    assert ds[0].img_id == "a"  # the other examples read fine
    # through a DataLoader worker the error keeps its type and names the store and image
    loader = DataLoader(ds, batch_size=None, sampler=[i], num_workers=1, collate_fn=lambda e: e)
    with pytest.raises(DataQualityError, match=r"regions: img_id 'b': non-finite"):
        next(iter(loader))


def test_nan_soft_labels_only_checked_when_read(stores):
    from vlframe.data.batch import collate, gather_masked_soft_labels
    from vlframe.data.stores import RegionStore

    _make_nan_features(stores, "d", what="soft_labels")  # NaN in the first region's soft label
    with pytest.raises(DataQualityError, match=r"img_id 'd': non-finite values \(NaN/inf\) in soft_labels"):
        RegionStore(str(stores / "regions")).get("d")  # the store itself checks them by default
    ds = _ds(stores)
    ex = ds[3]  # the dataset leaves the check to the batch, which checks the rows it copies
    assert ex.img_id == "d"
    with pytest.raises(DataQualityError, match=r"img_id 'd': non-finite values \(NaN/inf\) in soft_labels") as e:
        collate([ds[0], ex])
    assert e.value.key == "d" and e.value.reason == "non_finite"
    k = ex.img_feat.shape[0]
    first, second = (torch.arange(k)[None] == 0), (torch.arange(k)[None] == 1)
    with pytest.raises(DataQualityError, match=r"img_id 'd': non-finite"):
        gather_masked_soft_labels([ex], first)
    assert torch.isfinite(gather_masked_soft_labels([ex], second)).all()  # an unused bad row is not read
    lean = _ds(stores, soft_labels=False)[3]  # not read, so not checked: the features are fine
    assert lean.img_id == "d" and lean.soft_labels is None and torch.isfinite(lean.img_feat).all()


def test_quality_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(DataQualityError("m", path="p", key="k", reason="empty_text")))
    assert (str(e), e.path, e.key, e.reason) == ("m", "p", "k", "empty_text")
