"""Pictures: the explicit attention path against SDPA, and the PNGs (attention grid, word-region
boxes, training curves) produced into a temp folder, with the expected size, differing between
two different inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from projects.uniter.uniter.model import UniterModel
from tests.conftest import ROOT
from vlframe import visualize as V
from vlframe.data.dataset import SyntheticPairs
from vlframe.modules.transformer import SelfAttention, attention_weights

import matplotlib  # noqa: E402,F401  (an install requirement: a missing one must fail, not skip)


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def tiny(synth_cache):
    torch.manual_seed(0)
    ds = SyntheticPairs(cache_dir=synth_cache, split="val", num_images=120, feat_dim=32)
    model = UniterModel(vocab_size=ds.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, img_dim=32).eval()
    return model, ds


def test_explicit_attention_equals_sdpa_and_only_when_asked(tiny):
    model, ds = tiny
    from vlframe.data.batch import collate

    batch = collate([ds[0], ds[1], ds[2]], soft_labels=False)  # different lengths: padding inside
    with torch.no_grad():
        fast = model(batch)
        with attention_weights(model) as maps:
            slow = model(batch)
    torch.testing.assert_close(slow.sequence[slow.sequence_mask], fast.sequence[fast.sequence_mask], atol=1e-5, rtol=0)
    assert len(maps) == 2 and maps[0].shape[:2] == (3, 2)
    keys = fast.sequence_mask[:, None, None, :].expand_as(maps[0])
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert torch.all(w[~keys] == 0)  # padded keys get no weight
    assert all(m.weights_sink is None for m in model.modules() if isinstance(m, SelfAttention))
    with torch.no_grad():
        model(batch)
    assert len(maps) == 2  # nothing recorded outside the block


def test_attention_pictures(tiny, tmp_path):
    model, ds = tiny
    atts = []
    for i in (0, 5):
        batch, tokens = V.example_batch(ds, i)
        att = V.pair_attention(model, batch, tokens)
        assert att.maps.shape == (2, 2, att.text_len + att.num_regions, att.text_len + att.num_regions)
        atts.append(att)
        V.attention_grid(att, str(tmp_path / f"grid{i}.png"))
        V.word_region_attention(att, V.pick_word(att.tokens, None), str(tmp_path / f"word{i}.png"))
    g0, g5 = _png(tmp_path / "grid0.png"), _png(tmp_path / "grid5.png")
    assert g0.shape == (int((2.2 * 2 + 0.6) * 100), int(2.2 * 2 * 100), 3)  # rows: layers, columns: heads
    assert g0.shape == g5.shape and not np.array_equal(g0, g5)
    w0, w5 = _png(tmp_path / "word0.png"), _png(tmp_path / "word5.png")
    assert w0.shape == (540, 500, 3) and not np.array_equal(w0, w5)
    # another word of the same pair gives another picture
    V.word_region_attention(atts[0], 1, str(tmp_path / "word0b.png"))
    assert not np.array_equal(_png(tmp_path / "word0b.png"), w0)
    with pytest.raises(ValueError, match="word index 99 outside"):
        V.word_region_attention(atts[0], 99, str(tmp_path / "x.png"))


def _metrics(path, seed):
    g = np.random.default_rng(seed)
    with open(path, "w") as f:
        for step in range(10, 210, 10):
            for task in ("mlm", "itm"):
                f.write(json.dumps({"step": step, f"train/{task}/loss": float(3 * np.exp(-step / 80) + g.random())}) + "\n")
            if step % 100 == 0:
                f.write(json.dumps({"step": step, "val/mlm/acc": step / 400, "val/itm/itm_acc": 0.5 + step / 1000}) + "\n")


def test_training_curves_and_the_tool(tmp_path):
    _metrics(tmp_path / "a.jsonl", 0)
    _metrics(tmp_path / "b.jsonl", 1)
    V.training_curves(str(tmp_path / "a.jsonl"), str(tmp_path / "a.png"))
    r = subprocess.run([sys.executable, "tools/visualize.py", "curves", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "b.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    assert a.shape == (320, 900, 3) and a.shape == b.shape and not np.array_equal(a, b)
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    r = subprocess.run([sys.executable, "tools/visualize.py", "curves", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "c.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2: not a JSON record" in r.stderr
