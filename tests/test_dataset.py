import dataclasses
import json
import logging
import os
import pickle

import numpy as np
import pytest

from tests.conftest import UNITER_DB, needs_fixtures
import torch
from torch.utils.data import DataLoader

from vlframe.data.batch import collate
from vlframe.data.dataset import ImageTextDataset, SyntheticPairs
from vlframe.data.stores import RegionStore, RegionStoreWriter, TextStoreWriter, box7
from vlframe.registry import DATASETS, build

D, C = 6, 4
SPECIAL = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
TINY_WORLD = dict(seed=1, num_images=24, feat_dim=16, captions_per_image=2)
FIXTURES = UNITER_DB
NPZ = os.path.join(FIXTURES, "npz")
NBB = os.path.join(FIXTURES, "img_db", "fake", "nbb_th0.2_max100_min10.json")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    images = {}
    with RegionStoreWriter(root / "regions", feat_dim=D, num_labels=C) as w:
        for i, k in enumerate([4, 15, 25]):
            x1 = rng.uniform(0, 0.5, (k, 2))
            im = dict(features=rng.uniform(0, 2, (k, D)), boxes=np.concatenate([x1, x1 + 0.3], 1),
                      soft_labels=rng.dirichlet(np.ones(C), k), conf=rng.uniform(0, 1, k))
            w.add(f"img{i}", **im)
            images[f"img{i}"] = im
    texts = {"t0": ([5, 6, 7], "img0"), "t1": (list(range(200, 280)), "img1"), "t2": ([9], "img2"),
             "t3": ([10, 11], "img1")}
    with TextStoreWriter(root / "texts", tokenizer_name="bert-base-uncased", special_ids=SPECIAL,
                         vocab_size=1000) as w:
        for tid, (ids, img) in texts.items():
            w.add(tid, token_ids=ids, img_id=img, extra={"label": tid})
    return root, images, texts


def _ds(root, **kw):
    return ImageTextDataset(region_store=str(root / "regions"), text_store=str(root / "texts"), **kw)


def test_examples(stores, caplog):
    root, images, texts = stores
    with caplog.at_level(logging.WARNING, logger="vlframe.data.dataset"):
        ds = _ds(root, max_text_len=20)
    assert len(ds) == 4 and ds.txt_ids == ["t0", "t1", "t2", "t3"]
    assert ds.num_truncated == 1
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    assert ds.special_ids == SPECIAL and ds.vocab_size == 1000 and ds.feat_dim == D
    store = RegionStore(root / "regions")
    for i, tid in enumerate(ds.txt_ids):
        ex = ds[i]
        ids, img = texts[tid]
        assert ex.txt_id == tid and ex.img_id == img and ex.extra == {"label": tid}
        assert ex.input_ids.dtype == torch.long
        expected = [101] + ids[:18] + [102]
        assert ex.input_ids.tolist() == expected
        k = store.num_regions(img)
        # fp16 as stored, straight from the record; collate makes them float32
        assert ex.img_feat.shape == (k, D) and ex.img_feat.dtype == torch.float16
        assert ex.img_pos.shape == (k, 7) and ex.img_pos.dtype == torch.float32
        assert ex.soft_labels.shape == (k, C) and ex.soft_labels.dtype == torch.float16
        order = np.argsort(-images[img]["conf"], kind="stable")[:k]
        np.testing.assert_array_equal(ex.img_feat.numpy(), images[img]["features"][order].astype(np.float16))
        np.testing.assert_allclose(ex.img_pos.numpy(), box7(images[img]["boxes"])[order], rtol=1e-6)
        np.testing.assert_allclose(ex.soft_labels.numpy(), images[img]["soft_labels"][order], atol=1e-3)
    assert ds[-1].txt_id == "t3"
    with pytest.raises(IndexError):
        ds[4]
    assert ds.text_ids(1).tolist() == [101] + texts["t1"][0][:18] + [102]


def test_lengths_match_examples(stores):
    root, _, _ = stores
    for kw in [dict(max_text_len=20), dict(max_text_len=60, conf_threshold=None, max_regions=12),
               dict(fixed_regions=5)]:
        ds = _ds(root, **kw)
        units = [ds[i].num_units for i in range(len(ds))]
        assert ds.lengths().tolist() == units
        assert ds.text_lengths().tolist() == [ds[i].input_ids.numel() for i in range(len(ds))]
        assert ds.region_lengths().tolist() == [ds[i].img_feat.shape[0] for i in range(len(ds))]
        batch = collate([ds[i] for i in range(len(ds))])
        assert batch.num_units == sum(units)
    assert _ds(root, max_text_len=60).num_truncated == 1  # 80 ids + CLS/SEP > 60
    assert _ds(root, max_text_len=90).num_truncated == 0


def test_images_subset_and_picklable(stores):
    root, images, _ = stores
    ds = _ds(root, txt_ids=["t3", "t0"])
    assert ds.txt_ids == ["t3", "t0"] and ds.image_ids() == ["img0", "img1"]
    assert _ds(root).image_ids() == ["img0", "img1", "img2"]
    feat, pos, soft = ds.image_example("img2")
    assert feat.shape[0] == pos.shape[0] == soft.shape[0] == RegionStore(root / "regions").num_regions("img2")
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[0].img_feat, ds[0].img_feat)
    # forked workers open their own LMDB environments
    loader = DataLoader(_ds(root), batch_size=2, num_workers=2, collate_fn=collate)
    got = [t for b in loader for t in b.txt_ids]
    assert got == ["t0", "t1", "t2", "t3"]


def test_errors(stores, tmp_path):
    root, _, _ = stores
    with pytest.raises(ValueError, match=r"regions: features have dim 6 but 8 is expected"):
        _ds(root, feat_dim=8)
    with pytest.raises(KeyError, match="'nope'"):
        _ds(root, txt_ids=["t0", "nope"])
    with pytest.raises(ValueError, match="max_text_len"):
        _ds(root, max_text_len=2)
    with TextStoreWriter(tmp_path / "t", tokenizer_name="x", special_ids=SPECIAL, vocab_size=1000) as w:
        w.add("x0", token_ids=[1], img_id="imgX")
    with pytest.raises(ValueError, match=r"txt_id 'x0' refers to img_id 'imgX'"):
        ImageTextDataset(region_store=str(root / "regions"), text_store=str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError):
        ImageTextDataset(region_store=str(tmp_path / "none"), text_store=str(root / "texts"))


def test_registry_build(stores):
    root, _, _ = stores
    ds = build({"type": "image_text", "region_store": str(root / "regions"), "text_store": str(root / "texts"),
                "max_text_len": 30}, DATASETS)
    assert isinstance(ds, ImageTextDataset) and len(ds) == 4 and ds.max_text_len == 30


def test_synthetic_pairs(tmp_path):
    cache = str(tmp_path / "cache")
    parts = {(s, d): SyntheticPairs(cache_dir=cache, split=s, domain=d, **TINY_WORLD)
             for s in ("train", "val") for d in ("in", "out", "all")}
    world = parts[("train", "in")].world_dir
    assert all(p.world_dir == world for p in parts.values())
    for s in ("train", "val"):
        a, i, o = parts[(s, "all")], parts[(s, "in")], parts[(s, "out")]
        assert len(a) == len(i) + len(o) and set(a.txt_ids) == set(i.txt_ids) | set(o.txt_ids)
        assert all(t.startswith("in") for t in i.txt_ids) and all(t.startswith("out") for t in o.txt_ids)
        assert set(a.image_ids()) == set(a.scenes())
    assert not set(parts[("train", "all")].image_ids()) & set(parts[("val", "all")].image_ids())
    ds = parts[("train", "all")]
    ex = ds[0]
    assert ex.img_feat.shape[1] == 16 and ex.soft_labels.shape[1] == ds.num_labels
    assert ex.input_ids[0] == 101 and ex.input_ids[-1] == 102 and ex.extra["domain"] in ("in", "out")
    assert ds.lengths().tolist() == [ds[i].num_units for i in range(len(ds))]
    built = build({"type": "synthetic", "cache_dir": cache, "split": "val", "domain": "out", **TINY_WORLD}, DATASETS)
    assert built.world_dir == world and built.txt_ids == parts[("val", "out")].txt_ids
    with pytest.raises(ValueError, match="domain must be"):
        SyntheticPairs(cache_dir=cache, domain="moon", **TINY_WORLD)
    with pytest.raises(ValueError, match="split must be"):
        SyntheticPairs(cache_dir=cache, split="test", **TINY_WORLD)
    with pytest.raises(ValueError, match=r"generated with domains=\['in'\]"):
        SyntheticPairs(cache_dir=cache, domain="out", domains=("in",), **TINY_WORLD)


def _keep_fp16_collate(examples):
    from vlframe.data.batch import collate_keeps_fp16

    with collate_keeps_fp16():
        return collate(examples)


def test_collate_precision_and_to(stores):
    root, images, _ = stores
    ds = _ds(root)
    exs = [ds[i] for i in range(len(ds))]
    b32 = collate(exs)
    assert b32.img_feat.dtype == b32.soft_labels.dtype == b32.img_pos.dtype == torch.float32
    for i, e in enumerate(exs):  # one exact copy of the stored fp16 values, zero padding after
        k = e.img_feat.shape[0]
        assert torch.equal(b32.img_feat[i, :k], e.img_feat.float()) and not b32.img_feat[i, k:].any()
        assert torch.equal(b32.soft_labels[i, :k], e.soft_labels.float()) and not b32.soft_labels[i, k:].any()
        assert torch.equal(b32.img_pos[i, :k], e.img_pos) and not b32.img_pos[i, k:].any()
    b16 = collate(exs, keep_fp16=True)
    assert b16.img_feat.dtype == b16.soft_labels.dtype == torch.float16 and b16.img_pos.dtype == torch.float32
    assert _keep_fp16_collate(exs).img_feat.dtype == torch.float16 and collate(exs).img_feat.dtype == torch.float32
    moved = b16.to("cpu")  # fp16 travels, float32 arrives
    assert moved.img_feat.dtype == moved.soft_labels.dtype == torch.float32
    for name in ("input_ids", "text_mask", "img_feat", "img_pos", "img_mask", "soft_labels"):
        assert torch.equal(getattr(moved, name), getattr(b32, name)), name
    assert b32.to("cpu").img_feat is b32.img_feat  # float32 on its device: no copy
    # mixed precision examples are promoted, never silently narrowed
    mixed = [exs[0], dataclasses.replace(exs[1], img_feat=exs[1].img_feat.float())]
    assert collate(mixed, keep_fp16=True).img_feat.dtype == torch.float32


def test_worker_batches_in_fp16_equal_main_process(stores):
    root, _, _ = stores
    ds = _ds(root)
    main = [collate([ds[i] for i in idx]) for idx in ([0, 1], [2, 3])]
    loader = DataLoader(ds, batch_sampler=[[0, 1], [2, 3]], num_workers=1, collate_fn=_keep_fp16_collate)
    got = list(loader)
    assert [b.img_feat.dtype for b in got] == [torch.float16] * 2
    for a, b in zip(main, got):
        b = b.to("cpu")
        assert b.txt_ids == a.txt_ids
        for name in ("input_ids", "img_feat", "img_pos", "img_mask", "soft_labels"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_soft_labels_not_read(stores):
    root, _, _ = stores
    ds = _ds(root, soft_labels=False)
    ex = ds[1]
    assert ex.soft_labels is None and torch.equal(ex.img_feat, _ds(root)[1].img_feat)
    assert collate([ds[i] for i in range(len(ds))]).soft_labels is None
    assert ds.num_labels == C  # the store still says what it holds
    full = [_ds(root)[i] for i in range(len(ds))]
    lean = collate(full, soft_labels=False)  # a task that does not use them leaves them out
    assert lean.soft_labels is None and torch.equal(lean.img_feat, collate(full).img_feat)


@needs_fixtures("uniter_db_sample", "npz")
def test_original_uniter_features_pass_unchanged(tmp_path):
    """Detector dumps written by the original UNITER code: the fp16 features and soft labels reach
    the Example bit for bit, K follows the original nbb file, and collate makes exact float32."""
    from vlframe.data.importers.features import import_npz_dir

    import_npz_dir(NPZ, tmp_path / "regions")
    names = sorted(os.listdir(NPZ))
    with TextStoreWriter(tmp_path / "texts", tokenizer_name="bert-base-cased", special_ids=SPECIAL,
                         vocab_size=1000) as w:
        for i, name in enumerate(names):
            w.add(f"t{i}", token_ids=[5 + i, 6], img_id=name)
    with open(NBB) as f:
        nbb = json.load(f)
    ds = ImageTextDataset(region_store=str(tmp_path / "regions"), text_store=str(tmp_path / "texts"),
                          conf_threshold=0.2, min_regions=10, max_regions=100)
    ref = [np.load(os.path.join(NPZ, n)) for n in names]
    exs = [ds[i] for i in range(len(ds))]
    for e, r, name in zip(exs, ref, names):
        k = nbb[name]
        assert e.img_feat.dtype == torch.float16 and e.img_feat.shape == (k, 2048)
        np.testing.assert_array_equal(e.img_feat.numpy(), r["features"][:k])
        np.testing.assert_array_equal(e.soft_labels.numpy(), r["soft_labels"][:k])
    batch = collate(exs)
    for i, (e, r, name) in enumerate(zip(exs, ref, names)):
        k = nbb[name]
        np.testing.assert_array_equal(batch.img_feat[i, :k].numpy(), r["features"][:k].astype(np.float32))
        np.testing.assert_array_equal(batch.soft_labels[i, :k].numpy(), r["soft_labels"][:k].astype(np.float32))
