"""Errors that help: every checkpoint path fails with one line naming the file and the problem,
before data and model are built; user code keeps its traceback and names the component; the
device, text length and data encoding problems are one line; imports and converters never lose
what was there. Exit codes are those of the tools (run as subprocesses where that matters)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides
from tests.test_bad_input import DEMO, _run
from tests.test_import_captions import coco_json, write_json
from tests.test_no_code_from_data import Payload


def _missing_data(tmp_path) -> list[str]:
    # A data folder that does not exist: had data been built first, this would be the error.
    return [f"data.train={{type: image_text, region_store: {tmp_path}/no_regions, text_store: {tmp_path}/no_texts, feat_dim: 32}}",
            "data.val=null", "--work-dir", str(tmp_path / "run")]


def _real_checkpoint(tmp_path) -> str:
    path = str(tmp_path / "good.pt")
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    return path


DAMAGES = [
    ("missing", "no such file"),
    ("empty", "empty file (0 bytes)"),
    ("truncated", "truncated"),
    ("text", "not a checkpoint (neither a torch file nor safetensors)"),
    ("safetensors", "safetensors header error"),
    ("payload", "refused: it holds objects other than tensors"),
]


# resume reads vlframe training checkpoints (torch files), never safetensors
@pytest.mark.parametrize("key,damage,problem", [(k, d, p) for k in ("train.init_from", "model.pretrained", "train.resume")
                                                for d, p in DAMAGES if not (k == "train.resume" and d == "safetensors")])
def test_every_checkpoint_path_fails_in_one_line_before_data(capsys, tmp_path, key, damage, problem):
    marker = str(tmp_path / "ran")
    path = _damaged(tmp_path, damage, marker)
    line = _run(capsys, DEMO, f"{key}={path}", *_missing_data(tmp_path))
    assert path in line and problem in line and key.split(".")[-1] in line, line
    assert "no_regions" not in line  # checked before the data
    assert not os.path.exists(marker)


def _damaged(tmp_path, damage: str, marker: str) -> str:
    path = str(tmp_path / ("weights.safetensors" if damage == "safetensors" else "weights.pt"))
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated":
        data = open(_real_checkpoint(tmp_path), "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "text":
        open(path, "w").write("model_step_1000\n")
    elif damage == "safetensors":
        header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'  # cut JSON
        open(path, "wb").write(len(header).to_bytes(8, "little") + header)
    elif damage == "payload":
        torch.save({"model": {"w": torch.zeros(1)}, "x": Payload(marker)}, path)
    return path


def _subprocess(*argv, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_user_component_error_keeps_traceback_and_names_component(synth_cache, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "exploding_hook_mod.py").write_text(
        "from vlframe.engine.hooks import Hook\n"
        "from vlframe.registry import HOOKS\n\n\n"
        "@HOOKS.register_module(name='exploding_hook')\n"
        "class ExplodingHook(Hook):\n"
        "    def __init__(self, *, factor: int = 2):\n"
        "        table = {}\n"
        "        self.value = table['missing'] * factor  # a bug in user code\n"
    )
    cfg = proj / "cfg.yaml"
    # custom_imports names the file next to the config; the run starts from another folder
    cfg.write_text(f"_base_: [{DEMO}]\ncustom_imports: [projects.uniter, exploding_hook_mod.py]\n"
                   "hooks: [{type: exploding_hook}]\n")
    out = _subprocess(os.path.join(ROOT, "tools", "train.py"), str(cfg), "--work-dir", str(tmp_path / "run"),
                      *tiny_overrides(synth_cache), "data.val=null", cwd=str(tmp_path))
    assert out.returncode == 1, out.stderr[-3000:]
    err = out.stderr
    assert "Traceback" in err and "exploding_hook_mod.py\", line 9" in err and "KeyError: 'missing'" in err
    assert "while building hooks.0: 'exploding_hook' (exploding_hook_mod.ExplodingHook)" in err


def test_cuda_without_cuda_says_so(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _run(capsys, DEMO, "train.device=cuda", "--work-dir", str(tmp_path))
    assert line == ("error: train.device=cuda: CUDA is not available (this torch is a CPU-only build); use "
                    "train.device=cpu or auto") or "no CUDA device is visible" in line


def test_max_text_len_above_model_positions(capsys, synth_cache, tmp_path):
    line = _run(capsys, DEMO, *tiny_overrides(synth_cache), "model.max_positions=32", "data.train.max_text_len=40",
                "--work-dir", str(tmp_path))
    assert line == ("error: data.train.max_text_len=40 is above the model's 32 text positions (positions beyond "
                    "them have no embedding); lower data.train.max_text_len")


# --------------------------------------------------------------------------- convert_checkpoint


def test_convert_checkpoint_refuses_bad_input_and_its_own_input(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def convert(src, dst) -> tuple[int, str]:  # main's return value is the script's exit code
        code = tool.main(["--from", "original", "--to", "vlframe", src, dst])
        return code, capsys.readouterr().err.strip()

    good = _real_checkpoint(tmp_path)
    before = open(good, "rb").read()
    assert convert(good, good) == (2, f"error: {good}: is the input; refusing to write over it (give another output path)")
    assert open(good, "rb").read() == before
    assert convert(str(tmp_path / "nope.pt"), str(tmp_path / "o.pt")) == (
        2, f"error: input: {tmp_path / 'nope.pt'}: no such file")
    for damage, problem in DAMAGES[1:]:
        sub = tmp_path / damage
        sub.mkdir()
        path = _damaged(sub, damage, str(sub / "ran"))
        code, err = convert(path, str(tmp_path / "o.pt"))
        assert code == 2 and err.startswith(f"error: input: {path}: {problem}") and "\n" not in err, err
        assert not (sub / "ran").exists()
    assert not (tmp_path / "o.pt").exists()


# --------------------------------------------------------------------------- prepare_data


def _prepare(capsys, *argv) -> tuple[int, str]:
    from tools.prepare_data import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_failed_overwrite_import_leaves_the_previous_store(tmp_path):
    from vlframe.data.stores import TextStore

    src = write_json(tmp_path / "coco.json", coco_json(("train",)))
    out = tmp_path / "texts"
    ok = _subprocess(os.path.join(ROOT, "tools", "prepare_data.py"), "coco_karpathy", src, "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    before = TextStore(out / "train").ids()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(coco_json(("train",)))[:-30])
    bad = _subprocess(os.path.join(ROOT, "tools", "prepare_data.py"), "coco_karpathy", str(broken), "--out", str(out),
                      "--overwrite")
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"prepare_data coco_karpathy: {broken}: line 1")
    assert TextStore(out / "train").ids() == before
    assert sorted(os.listdir(out)) == ["train"]  # no half-written sibling left beside it


def test_non_utf8_names_file_and_offset_and_can_be_skipped(capsys, tmp_path):
    data = coco_json(("train",))
    data["images"][0]["sentences"][1]["raw"] = "A \udcff bad byte"
    text = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")  # a raw 0xff byte
    src = tmp_path / "coco.json"
    src.write_bytes(text)
    offset = text.index(b"\xff")
    code, out = _prepare(capsys, "coco_karpathy", str(src), "--out", str(tmp_path / "a"))
    assert code == 2
    assert out.err.strip().startswith(f"prepare_data coco_karpathy: {src}: byte {offset} (line 1): not UTF-8 text")
    code, out = _prepare(capsys, "coco_karpathy", str(src), "--out", str(tmp_path / "b"), "--skip-bad")
    assert code == 0 and "skipped 1: field 'raw' is not valid text" in out.out


def test_lone_surrogate_in_a_caption_is_a_record_error(capsys, tmp_path):
    data = coco_json(("train", "val"))
    sent = data["images"][0]["sentences"][0]
    sent["raw"] = "A surfer \ud83c on a wave"  # half of a surrogate pair, as a \u escape in the JSON
    src = write_json(tmp_path / "coco.json", data)
    code, out = _prepare(capsys, "coco_karpathy", src, "--out", str(tmp_path / "a"))
    assert code == 2 and f"sentence 0 (sentid {sent['sentid']}): field 'raw' is not valid text: lone surrogate " \
                          "U+D83C" in out.err
    code, out = _prepare(capsys, "coco_karpathy", src, "--out", str(tmp_path / "b"), "--skip-bad")
    # the image with the bad caption is left out and counted; the other split is written
    assert code == 0 and "skipped 1: field 'raw' is not valid text" in out.out and "[val]: wrote 2 record(s)" in out.out


def test_non_utf8_jsonl_line_names_offset(tmp_path):
    from vlframe.data.importers.common import DataFormatError, ImportReport, iter_jsonl

    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xc3"}\n{"a": 3}\n')
    with pytest.raises(DataFormatError, match=r"a\.jsonl: line 2 \(byte 16 of the file\): not UTF-8 text"):
        list(iter_jsonl(p))
    report = ImportReport("a", skip_bad=True)
    assert [o["a"] for _, o in iter_jsonl(p, report)] == [1, 3] and report.skipped["not UTF-8 text"] == 1


# --------------------------------------------------------------------------- custom_imports and the cache


def test_custom_imports_next_to_the_config_or_by_path(tmp_path, monkeypatch):
    from vlframe.config import ConfigError, load_and_validate
    from vlframe.registry import MASKERS

    proj, other = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    other.mkdir()
    body = ("from vlframe.masking import JointMasker\nfrom vlframe.registry import MASKERS\n\n"
            "@MASKERS.register_module(name='{name}')\nclass M(JointMasker):\n    pass\n")
    (proj / "near_cfg_masker.py").write_text(body.format(name="near_cfg_masker"))
    (other / "by_path_masker.py").write_text(body.format(name="by_path_masker"))
    cfg = proj / "cfg.yaml"
    cfg.write_text(f"_base_: [{DEMO}]\ncustom_imports: [projects.uniter, near_cfg_masker, ../elsewhere/by_path_masker.py]\n"
                   "tasks: {mlm: {masker: {type: near_cfg_masker}}, mrfr: {masker: {type: by_path_masker}}}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the repo nor the config's folder
    resolved = load_and_validate(cfg)
    assert MASKERS.get("near_cfg_masker") is not None and MASKERS.get("by_path_masker") is not None
    assert resolved.custom_imports[2] == str(other / "by_path_masker.py")  # absolute in the saved config
    load_and_validate(cfg)  # a second load does not register twice
    cfg.write_text(f"_base_: [{DEMO}]\ncustom_imports: [my_missing_heads]\n")
    with pytest.raises(ConfigError) as e:
        load_and_validate(cfg)
    assert str(e.value).startswith("custom_imports[0]: cannot import module 'my_missing_heads'")
    assert "relative to the config file" in str(e.value) and "\n" not in str(e.value)


def test_synthetic_world_goes_to_the_per_user_cache(tmp_path, monkeypatch):
    from vlframe.data.synthetic import default_cache_dir, ensure_world

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run_dir = tmp_path / "somewhere"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    assert default_cache_dir() == str(tmp_path / "xdg" / "vlframe")
    world = ensure_world(None, num_images=20, feat_dim=8)
    assert world.startswith(str(tmp_path / "xdg" / "vlframe")) and os.listdir(run_dir) == []
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "vlframe")
    from vlframe.config import load_config

    assert load_config(DEMO).data.train.cache_dir is None  # the shipped configs use the default
