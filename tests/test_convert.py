"""The checkpoint converter: original UNITER <-> vlframe (and BERT -> vlframe), keys, ties, CLI."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import FIXTURES
from tests.conftest import needs_fixtures as needs_fixtures_at

from projects.uniter.uniter.convert import (
    DEFAULT_TASKS,
    convert_file,
    original_to_vlframe,
    read_state_dict,
    vlframe_to_original,
)
from projects.uniter.uniter.model import UniterModel
from vlframe.engine.trainer import VLModule
from vlframe.registry import TASKS, build
from vlframe.tasks.base import DataInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fixtures = needs_fixtures_at("uniter_ref_tiny.pt")
MASK_EMB = "uniter.img_embeddings.mask_embedding.weight"
TINY = dict(vocab_size=120, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=40)


def tiny_module(seed: int = 0, names: dict[str, str] | None = None, img_dim: int = 12, labels: int = 7) -> VLModule:
    """A randomly initialised tiny model with every pretraining head (named as ``names`` says)."""
    torch.manual_seed(seed)
    model = UniterModel(**TINY, img_dim=img_dim)
    info = DataInfo(
        special_ids={"cls": 1, "sep": 2, "mask": 3, "pad": 0, "unk": 4},
        vocab_size=TINY["vocab_size"],
        feat_dim=img_dim,
        num_labels=labels,
    )
    tasks = {}
    for kind in DEFAULT_TASKS:
        t = build({"type": kind}, TASKS)
        t.setup(model=model, info=info)
        tasks[(names or {}).get(kind, kind)] = t
    # Random values everywhere (fresh heads start with zero biases and unit norms).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for t in tasks.values():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return VLModule(model, tasks)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        if k not in skip:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def ref_state():
    return torch.load(os.path.join(FIXTURES, "uniter_ref_tiny.pt"), map_location="cpu", weights_only=True)[
        "state_dict"
    ]


@needs_fixtures
def test_fixture_round_trip_is_exact(ref_state):
    ours = original_to_vlframe(ref_state)
    assert ours.unmapped == []
    assert all(k.startswith(("model.", "tasks.")) for k in ours.state_dict)
    back = vlframe_to_original(ours.state_dict).state_dict
    assert_same(back, ref_state, skip=(MASK_EMB,))
    # mask_embedding row 0 is forced to 0 by the original at every masked forward: only row 1 is
    # a weight. The exported row 0 is that zero; row 1 comes back exactly.
    assert torch.equal(back[MASK_EMB][1], ref_state[MASK_EMB][1])
    assert torch.equal(back[MASK_EMB][0], torch.zeros_like(back[MASK_EMB][0]))
    row1 = ref_state[MASK_EMB][1]
    canonical = dict(ref_state, **{MASK_EMB: torch.stack([torch.zeros_like(row1), row1])})
    assert_same(vlframe_to_original(original_to_vlframe(canonical).state_dict).state_dict, canonical)
    # Exported ties are the very tensor of their backbone weight, as in the original's state dict.
    assert back["cls.predictions.decoder.weight"] is back["uniter.embeddings.word_embeddings.weight"]
    assert back["feat_regress.weight"] is back["uniter.img_embeddings.img_linear.weight"]


@needs_fixtures
def test_fixture_heads_land_where_vlframe_reads_them(ref_state):
    s = original_to_vlframe(ref_state, names={"mrc_kl": "mrckl"}).state_dict
    ln = ref_state["cls.predictions.transform.LayerNorm.weight"]
    assert torch.equal(s["tasks.mlm.head.transform.norm.weight"], ln)
    assert torch.equal(s["tasks.mlm.head.bias"], ref_state["cls.predictions.bias"])
    assert torch.equal(s["tasks.mrfr.head.transform.dense.weight"], ref_state["feat_regress.net.0.weight"])
    assert torch.equal(s["tasks.mrfr.head.bias"], ref_state["feat_regress.bias"])
    for name in ("mrc", "mrckl"):  # the original's one region classifier, once per task
        assert torch.equal(s[f"tasks.{name}.head.out.weight"], ref_state["region_classifier.net.3.weight"])
        assert torch.equal(s[f"tasks.{name}.head.transform.norm.bias"], ref_state["region_classifier.net.2.bias"])
    assert torch.equal(s["tasks.itm.head.weight"], ref_state["itm_output.weight"])
    assert torch.equal(s["model.img_embed.mask_embedding"], ref_state[MASK_EMB][1])
    assert not any(k.startswith("tasks.mrc_kl.") for k in s)
    assert not any("decoder" in k or k.endswith("feat_regress.weight") for k in s)  # ties dropped


@needs_fixtures
def test_tied_weight_mismatch_is_reported(ref_state):
    for head_key in ("cls.predictions.decoder.weight", "feat_regress.weight"):
        bad = dict(ref_state)
        bad[head_key] = ref_state[head_key].clone()
        bad[head_key][0, 0] += 1e-3
        with pytest.raises(ValueError, match=re.escape(head_key) + r" should be tied to .* differs by up to 0\.001"):
            original_to_vlframe(bad)
        assert original_to_vlframe(bad, atol=2e-3).unmapped == []  # a tolerance lets fp16 round-offs through


def test_random_model_round_trip_is_exact():
    vl = tiny_module(names={"mrc_kl": "mrckl"})
    ours = vl.state_dict()
    orig = vlframe_to_original(ours, names={"mrc_kl": "mrckl"}).state_dict
    # original -> vlframe -> original is the identity.
    assert_same(vlframe_to_original(original_to_vlframe(orig).state_dict).state_dict, orig)
    # vlframe -> original -> vlframe too, except that the original's single region classifier is
    # MRC-kl's, which both region tasks get back.
    again = original_to_vlframe(orig, names={"mrc_kl": "mrckl"}).state_dict
    expected = dict(ours)
    for k in [k for k in ours if k.startswith("tasks.mrc.head.")]:
        expected[k] = ours[k.replace("tasks.mrc.", "tasks.mrckl.")]
    assert_same(again, expected)
    # The converted state dict loads strictly into a fresh module of the same configuration.
    fresh = tiny_module(seed=1, names={"mrc_kl": "mrckl"})
    fresh.load_state_dict(again, strict=True)


def test_subset_of_tasks_and_strictness():
    orig = vlframe_to_original(tiny_module().state_dict()).state_dict
    only = original_to_vlframe(orig, tasks=["mlm", "itm"]).state_dict
    assert {k.split(".")[1] for k in only if k.startswith("tasks.")} == {"mlm", "itm"}
    extra = dict(orig, **{"vqa_output.0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"no vlframe name: \['vqa_output\.0\.weight'\]"):
        original_to_vlframe(extra)
    assert original_to_vlframe(extra, strict=False).unmapped == ["vqa_output.0.weight"]
    with pytest.raises(ValueError, match="no original weights for \\['vqa'\\]"):
        original_to_vlframe(orig, tasks=["vqa"])
    no_heads = {k: v for k, v in orig.items() if k.startswith("uniter.")}
    with pytest.raises(ValueError, match="task 'itm' \\(itm\\): the checkpoint lacks \\['itm_output.weight'"):
        original_to_vlframe(no_heads, tasks=["itm"])
    ours = tiny_module().state_dict()
    ours["tasks.vqa.head.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"no original name: \['tasks\.vqa\.head\.weight'\]"):
        vlframe_to_original(ours)
    assert vlframe_to_original(ours, strict=False).unmapped == ["tasks.vqa.head.weight"]


def test_shape_errors_name_the_key():
    orig = vlframe_to_original(tiny_module().state_dict()).state_dict
    bad = dict(orig, **{"itm_output.weight": torch.zeros(3, TINY["hidden_size"])})
    with pytest.raises(ValueError, match=r"itm_output\.weight \(-> tasks\.itm\.head\.weight\): shape \(3, 16\)"):
        original_to_vlframe(bad)
    bad = dict(orig, **{"cls.predictions.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"cls\.predictions\.bias .*vocabulary"):
        original_to_vlframe(bad)
    bad = dict(orig, **{"feat_regress.weight": torch.zeros(16, 3)})
    with pytest.raises(ValueError, match=r"feat_regress\.weight should be tied .* shape"):
        original_to_vlframe(bad)


def test_convert_file_to_vlframe_safetensors(tmp_path):
    """In-process file conversion; safetensors holds no aliasing, so the two region heads that
    share the original's tensor are written as copies."""
    orig = vlframe_to_original(tiny_module().state_dict()).state_dict
    torch.save(orig, tmp_path / "model_step_1.pt")
    out = str(tmp_path / "vl.safetensors")
    assert convert_file(str(tmp_path / "model_step_1.pt"), out, source="original", target="vlframe") == []
    assert_same(read_state_dict(out), original_to_vlframe(orig).state_dict)
    extra = dict(orig, **{"bogus.weight": torch.ones(1)})
    torch.save(extra, tmp_path / "extra.pt")
    skipped = convert_file(str(tmp_path / "extra.pt"), out, source="original", target="vlframe", strict=False)
    assert skipped == ["bogus.weight"]
    with pytest.raises(ValueError, match=r"extra\.pt: original checkpoint keys with no vlframe name"):
        convert_file(str(tmp_path / "extra.pt"), out, source="original", target="vlframe")
    with pytest.raises(ValueError, match="cannot convert from 'original' to 'original'"):
        convert_file(str(tmp_path / "extra.pt"), out, source="original", target="original")


def _read_key_list(path: str) -> dict[str, tuple[tuple[int, ...], str | None]]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            shape = tuple(int(x) for x in re.findall(r"\d+", cols[1]))
            tied = cols[3].removeprefix("tied-to ").strip() if len(cols) > 3 else None
            out[cols[0]] = (shape, tied)
    return out


@needs_fixtures
def test_base_key_list_converts_both_ways():
    keys = _read_key_list(os.path.join(FIXTURES, "uniter_base_state_dict_keys.txt"))
    assert len(keys) == 230
    state = {k: torch.empty(shape, device="meta") for k, (shape, _) in keys.items()}
    for k, (_, tied) in keys.items():
        if tied:
            state[k] = state[tied]
    ours = original_to_vlframe(state)
    assert ours.unmapped == []
    # Every parameter of a base UniterModel and of the five heads is produced, with its shape.
    with torch.device("meta"):
        model = UniterModel(vocab_size=28996)
    expected = {"model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict.items() if k.startswith("model.")} == expected
    assert {k.split(".")[1] for k in ours.state_dict if k.startswith("tasks.")} == set(DEFAULT_TASKS)
    back = vlframe_to_original(ours.state_dict).state_dict
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: s for k, (s, _) in keys.items()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_both_directions_and_bert(tmp_path):
    orig = vlframe_to_original(tiny_module().state_dict()).state_dict
    src = tmp_path / "model_step_10.pt"
    torch.save(orig, src)

    r = _cli("--from", "original", "--to", "vlframe", str(src), str(tmp_path / "vl.pt"), "--name", "mrc_kl=mrckl")
    assert r.returncode == 0, r.stderr
    vl = torch.load(tmp_path / "vl.pt", weights_only=True)
    assert set(vl) == {"model"}  # the layout train.init_from reads
    assert_same(vl["model"], original_to_vlframe(orig, names={"mrc_kl": "mrckl"}).state_dict)

    out = str(tmp_path / "back.safetensors")
    r = _cli("--from", "vlframe", "--to", "original", str(tmp_path / "vl.pt"), out, "--name", "mrc_kl=mrckl")
    assert r.returncode == 0, r.stderr
    assert_same(read_state_dict(str(tmp_path / "back.safetensors")), orig)

    r = _cli("--from", "vlframe", "--to", "original", str(src), str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "model_step_10.pt" in r.stderr and "no 'model.*' key" in r.stderr

    # BERT (transformers' pretraining layout, safetensors folder) -> backbone + MLM head.
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=120,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
    )
    bert = BertForPreTraining(cfg)
    bert.save_pretrained(tmp_path / "bert")
    r = _cli("--from", "bert", "--to", "vlframe", str(tmp_path / "bert"), str(tmp_path / "init.pt"), "--img-dim", "12")
    assert r.returncode == 0, r.stderr
    init = torch.load(tmp_path / "init.pt", weights_only=True)["model"]
    ref = bert.state_dict()
    assert torch.equal(init["model.text_embed.word.weight"], ref["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(init["model.encoder.layers.1.ffn_out.weight"], ref["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(init["tasks.mlm.head.transform.dense.weight"], ref["cls.predictions.transform.dense.weight"])
    assert torch.equal(init["tasks.mlm.head.bias"], ref["cls.predictions.bias"])
    vlm = tiny_module()
    missing, unexpected = vlm.load_state_dict(init, strict=False)
    assert unexpected == [] and all(k.startswith("tasks.") and not k.startswith("tasks.mlm.") for k in missing)
