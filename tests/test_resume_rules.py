"""No good checkpoint is ever deleted, and resume refuses what it should: a changed config, a
folder of unreadable checkpoints, weights without optimizer state. After a resume each step is
logged once (metrics.jsonl and TensorBoard); each start's config is kept."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine import checkpoint as ckpt
from vlframe.engine.trainer import Trainer

CONFIG = "configs/uniter/pretrain_tiny_synth.yaml"
FAST = ["data.val=null", "train.val_interval=100"]


def _trainer(cache, work, *extra) -> Trainer:
    return Trainer(load_and_validate(CONFIG, tiny_overrides(cache) + FAST + list(extra)), work_dir=str(work))


def test_damaged_high_step_file_never_costs_a_good_checkpoint(synth_cache, tmp_path):
    cdir = tmp_path / "checkpoints"
    cdir.mkdir()
    (cdir / "ckpt_9999999.pt").write_bytes(b"PK\x03\x04 half a zip")  # damaged, the highest step
    torch.save({"weights": torch.zeros(2)}, cdir / "ckpt_9999998.pt")  # readable, but not a vlframe checkpoint
    with pytest.raises(ckpt.CheckpointError, match="none is readable"):  # resume=auto refuses such a folder
        _trainer(synth_cache, tmp_path, "train.keep_ckpts=1")
    t = _trainer(synth_cache, tmp_path, "train.keep_ckpts=1", "train.resume=never")
    written = []
    for step in range(1, 5):
        t.step = step
        written.append(t.save())
        # the one just written survives and reads back; it is the only good one (keep_ckpts=1)
        good = [p for _, p in ckpt.list_checkpoints(str(cdir)) if ckpt.readable(p)]
        assert good == [written[-1]] and ckpt.load(written[-1])["step"] == step
    assert (cdir / "ckpt_9999999.pt").exists() and (cdir / "ckpt_9999998.pt").exists()  # left for inspection
    t2 = _trainer(synth_cache, tmp_path, "train.keep_ckpts=1", "train.max_steps=4")
    assert t2._start.path == written[-1]  # resume=auto skips both and takes the newest good one


def test_orphaned_temp_files_are_removed_at_start(synth_cache, tmp_path):
    cdir = tmp_path / "checkpoints"
    cdir.mkdir()
    orphan = cdir / ".ckpt_0000004.pt.k2j3h4.tmp"
    orphan.write_bytes(b"x" * 100)
    mine = cdir / "notes.tmp"  # not ours: untouched
    mine.write_text("keep")
    _trainer(synth_cache, tmp_path)
    assert not orphan.exists() and mine.exists()


@pytest.fixture(scope="module")
def trained(synth_cache, tmp_path_factory):
    """A 4-step run (checkpoints at 2 and 4) to resume in various ways; copied per test."""
    work = tmp_path_factory.mktemp("trained")
    _trainer(synth_cache, work, "train.max_steps=4", "train.ckpt_interval=2", "train.keep_ckpts=3").train()
    return work


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change,keys", [
    (["model.hidden_size=48", "model.intermediate_size=96"], ["model.hidden_size", "model.intermediate_size"]),
    (["tasks={mlm: {type: mlm}}"], ["tasks.itm", "tasks.mrfr"]),
    (["tasks.itm.ot_solver={type: sinkhorn}"], ["tasks.itm.ot_solver.type"]),
])
def test_resume_with_a_changed_config_is_refused_naming_the_keys(synth_cache, trained, tmp_path, change, keys):
    work = _copy(trained, tmp_path / "run")
    before = (work / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointError) as e:
        _trainer(synth_cache, work, "train.max_steps=6", *change)
    msg = str(e.value)
    assert "\n" not in msg and "ckpt_0000004.pt" in msg
    for k in keys:
        assert k in msg
    assert "--work-dir" in msg and "train.resume=never" in msg and "train.resume_changed_config=true" in msg
    assert (work / "config.yaml").read_text() == before  # the refused run wrote nothing
    if "ot_solver" in change[0]:  # the explicit way out continues anyway (the weights still fit)
        t = _trainer(synth_cache, work, "train.max_steps=5", "train.resume_changed_config=true", *change)
        t.train()
        assert t.step == 5


def test_resume_with_only_max_steps_raised_continues(synth_cache, trained, tmp_path):
    work = _copy(trained, tmp_path / "run")
    t = _trainer(synth_cache, work, "train.max_steps=6", "train.ckpt_interval=2", "train.keep_ckpts=3",
                 "train.log_interval=2")
    t.train()
    assert t.step == 6
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # each step once
    assert sorted(os.listdir(work)) >= ["checkpoints", "config.1.yaml", "config.yaml"]  # each start's config kept
    assert "max_steps: 4" in (work / "config.1.yaml").read_text() and "max_steps: 6" in (work / "config.yaml").read_text()


def test_resume_after_a_kill_logs_each_step_once(synth_cache, trained, tmp_path):
    work = _copy(trained, tmp_path / "run")
    os.unlink(work / "checkpoints" / "ckpt_0000004.pt")  # as if killed after step 4's logs, before its save
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/mlm/loss": 1.0}\n{"step": 6, "tr')  # ... and mid-line
    t = _trainer(synth_cache, work, "train.max_steps=4", "train.ckpt_interval=2", "train.keep_ckpts=3")
    assert t._start.path.endswith("ckpt_0000002.pt")
    t.train()
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tb"))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        tb_steps = [e.step for e in acc.Scalars(tag)]
        assert tb_steps == sorted(set(tb_steps)), (tag, tb_steps)  # one curve: steps 3-4 not drawn twice
    assert any(e.step == 4 for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag))


def test_folder_of_unreadable_checkpoints_stops_naming_them(synth_cache, tmp_path):
    cdir = tmp_path / "checkpoints"
    cdir.mkdir()
    (cdir / "ckpt_0000002.pt").write_bytes(b"")
    (cdir / "ckpt_0000004.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    with pytest.raises(ckpt.CheckpointError) as e:
        _trainer(synth_cache, tmp_path)
    msg = str(e.value)
    assert "ckpt_0000002.pt (empty file" in msg and "ckpt_0000004.pt (truncated" in msg and "\n" not in msg
    assert not (tmp_path / "config.yaml").exists()


def test_weights_without_optimizer_state_are_refused_for_resume(synth_cache, trained, tmp_path):
    state = ckpt.load(str(trained / "checkpoints" / "ckpt_0000004.pt"))
    weights = str(tmp_path / "weights.pt")
    torch.save({"model": state["model"]}, weights)  # what convert_checkpoint writes
    with pytest.raises(ckpt.CheckpointError, match=r"train\.resume=.*weights\.pt: not a vlframe training checkpoint.*"
                                                   r"train\.init_from="):
        _trainer(synth_cache, tmp_path / "a", f"train.resume={weights}")
    torch.save({"model": state["model"], "step": 4}, weights)
    with pytest.raises(ckpt.CheckpointError, match=r"no optimizer state.*train\.init_from="):
        _trainer(synth_cache, tmp_path / "b", f"train.resume={weights}")


def test_keep_best_keeps_the_best_validation_checkpoint(synth_cache, tmp_path):
    t = Trainer(load_and_validate(CONFIG, tiny_overrides(synth_cache) + [
        "train.max_steps=3", "train.val_interval=1", "train.keep_ckpts=1", "train.keep_best=val/itm/ot_pos",
        "train.keep_best_mode=min", "tasks={itm: {type: itm}}", "train.phases=[]"]), work_dir=str(tmp_path))
    seen = []
    orig = t.validate

    def validate():
        out = orig()
        seen.append((t.step, out["val/itm/ot_pos"]))
        return out

    t.validate = validate
    t.train()
    best_step, best = min(seen, key=lambda sv: sv[1])
    state = ckpt.load(str(tmp_path / "checkpoints" / "best.pt"))
    assert state["step"] == best_step and state["hooks"][-1]["best"] == pytest.approx(best)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "checkpoints"))] == [3]  # pruning spares best.pt
