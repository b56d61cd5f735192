"""Weights in and out: export to safetensors and load it back (init_from, model.pretrained), and
paths through vlframe.io (iopath): init_from and a config served over HTTP by a server this test
starts on the loopback address."""
import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate, load_config
from vlframe.engine.trainer import Trainer

CONFIG = os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml")


def _trainer(cache, work, *extra):
    over = tiny_overrides(cache) + ["train.max_steps=0", "data.val=null", "train.phases=[]",
                                    "tasks={mlm: {type: mlm}, itm: {type: itm}}", *extra]
    return Trainer(load_and_validate(CONFIG, over), work_dir=str(work))


@pytest.fixture(scope="module")
def source(synth_cache, tmp_path_factory):
    """A checkpoint (step 0, seed 1) and its model state."""
    work = tmp_path_factory.mktemp("source")
    t = _trainer(synth_cache, work, "seed=1")
    t.train()
    return str(work / "checkpoints" / "ckpt_0000000.pt"), {k: v.clone() for k, v in t.model.state_dict().items()}


def _same(state, module):
    mine = module.state_dict()
    assert set(mine) == set(state)
    for k, v in state.items():
        assert torch.equal(mine[k], v), k


def test_export_then_init_from_safetensors(source, synth_cache, tmp_path):
    ckpt, state = source
    out = tmp_path / "weights.safetensors"
    r = subprocess.run([sys.executable, "tools/export.py", ckpt, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} ({len(state)} tensors)" in r.stdout
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(state)
    t = _trainer(synth_cache, tmp_path / "run", "seed=2", f"train.init_from={out}")
    assert not torch.equal(t.model.state_dict()["model.pooler.weight"], state["model.pooler.weight"])  # another init
    t.train()
    _same(state, t.model)
    assert f"initialised from {out}: {len(state)} keys copied, 0 newly initialised, 0 unused" in (tmp_path / "run" / "init_report.txt").read_text()


def test_model_pretrained_reads_exported_safetensors(source, tmp_path):
    from projects.uniter.uniter.model import UniterModel
    from vlframe.engine.checkpoint import export_weights

    ckpt, state = source
    out = str(tmp_path / "w.safetensors")
    export_weights(ckpt, out)
    m = UniterModel(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, img_dim=32, pretrained=out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state["model." + k]), k
    assert m.init_report.initialised == [] and all(k.startswith("tasks.") for k in m.init_report.unused)


def test_export_refuses_bad_targets(source, tmp_path):
    ckpt, _ = source
    for target, message in [(ckpt, "must end with .safetensors"), (str(tmp_path / "x.pt"), "must end with .safetensors")]:
        r = subprocess.run([sys.executable, "tools/export.py", ckpt, target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    bogus = tmp_path / "not_a_checkpoint.pt"
    torch.save({"step": 3}, bogus)
    r = subprocess.run([sys.executable, "tools/export.py", str(bogus), str(tmp_path / "o.safetensors")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not a vlframe checkpoint" in r.stderr and str(bogus) in r.stderr


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serve a fresh folder on 127.0.0.1 (a free port); remote downloads cached under tmp."""
    root = tmp_path / "served"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VLFRAME_CACHE", str(tmp_path / "cache"))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_init_from_over_http(http_root, source, synth_cache, tmp_path):
    root, url = http_root
    ckpt, state = source
    (root / "ckpt.pt").write_bytes(open(ckpt, "rb").read())
    t = _trainer(synth_cache, tmp_path / "run", "seed=3", f"train.init_from={url}/ckpt.pt")
    t.train()
    _same(state, t.model)
    # A missing remote file is refused before data and model are built, naming the key and URL.
    with pytest.raises(ValueError, match=f"^train.init_from: {url}/nothing.pt: cannot fetch {url}/nothing.pt: HTTPError"):
        _trainer(synth_cache, tmp_path / "run2", f"train.init_from={url}/nothing.pt")


def test_config_over_http_with_relative_bases(http_root):
    root, url = http_root
    (root / "base").mkdir()
    (root / "base" / "b.yaml").write_text("train: {max_steps: 7, lr: 0.5}\n")
    (root / "run.yaml").write_text("_base_: [base/b.yaml]\ntrain: {lr: 0.25}\n")
    cfg = load_config(f"{url}/run.yaml")
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.25
    (root / "broken.yaml").write_text("_base_: [base/none.yaml]\n")
    with pytest.raises(FileNotFoundError, match=f"config file not found: {url}/base/none.yaml"):
        load_config(f"{url}/broken.yaml")
