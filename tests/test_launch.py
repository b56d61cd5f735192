"""The launcher without a cluster: the submission a ``slurm:`` section makes (``--dry-run``),
checks before submission, sweeps expanded and run locally, the results table, and the log of a
resumed run holding each step once. The real-SLURM side is tests/test_slurm.py."""
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics

import pytest

from vlframe.config import load_and_validate
from tests.conftest import ROOT, tiny_overrides

DEMO = os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _tiny(cache, steps, *extra):
    return [*tiny_overrides(cache), f"train.max_steps={steps}", "train.phases=[]", "train.warmup_steps=0",
            f"train.val_interval={steps}", *extra]


def _sbatch_lines(text):
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_dry_run_prints_config_and_the_exact_sbatch_script(capsys, tmp_path):
    args = [DEMO, "--dry-run", "--work-dir", str(tmp_path / "run"), "launcher=slurm", "slurm.nodes=2",
            "slurm.gpus_per_node=8", "slurm.tasks_per_node=8", "slurm.cpus_per_task=10", "slurm.mem_gb=480",
            "slurm.partition=learnfair", "slurm.account=vl", "slurm.qos=high", "slurm.time_min=4320",
            "slurm.constraint=volta32gb", "slurm.job_name=uniter_base", "slurm.additional={dependency: afterok:123}"]
    assert _tool("train")(args) == 0
    out = capsys.readouterr().out
    steps = int(load_and_validate(DEMO, []).train.max_steps)  # the recipe's own, printed resolved
    assert "# resolved config" in out and "launcher: slurm" in out and f"max_steps: {steps}" in out
    lines = _sbatch_lines(out)
    for want in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10", "--mem=480GB",
                 "--partition=learnfair", "--account=vl", "--qos=high", "--time=4320", "--constraint=volta32gb",
                 "--job-name=uniter_base", "--dependency=afterok:123", "--signal=USR2@120"):
        assert f"#SBATCH {want}" in lines, want
    assert any(f"{tmp_path / 'run'}/slurm/%j/%j_0_log.out" in line for line in lines), "logs in the run folder"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_no_gpu_request_at_all_when_gpus_per_node_is_0(capsys, tmp_path):
    assert _tool("train")([DEMO, "--dry-run", "--work-dir", str(tmp_path / "run"), "launcher=slurm"]) == 0
    flags = {line.split("=")[0] for line in _sbatch_lines(capsys.readouterr().out)}
    assert not any("gpu" in f or "gres" in f for f in flags), flags
    assert flags.isdisjoint({"#SBATCH --mem", "#SBATCH --partition", "#SBATCH --account", "#SBATCH --qos",
                             "#SBATCH --constraint"})  # nothing asked, nothing requested


def test_every_slurm_key_changes_the_submission():
    """No key of the slurm: section is accepted and ignored."""
    from omegaconf import OmegaConf

    from vlframe.config import apply_defaults, load_config
    from vlframe.config.schema import SlurmConfig
    from vlframe.launch.slurm import describe_submission

    base = apply_defaults(load_config(DEMO), DEMO)
    before = describe_submission(base, "/w/run", job_name="run").split("# submitit", 1)[1]
    new = {"nodes": 3, "tasks_per_node": 4, "gpus_per_node": 2, "cpus_per_task": 5, "mem_gb": 1.5,
           "partition": "p", "account": "a", "qos": "q", "time_min": 7, "constraint": "c", "job_name": "j",
           "setup": ["module load cuda"], "additional": {"exclusive": True}, "signal_delay_s": 33,
           "max_num_timeout": 9, "array_parallelism": 2}
    assert set(new) == {f.name for f in dataclasses.fields(SlurmConfig)}
    for key, value in new.items():
        cfg = base.copy()
        OmegaConf.update(cfg, f"slurm.{key}", value, merge=False)
        after = describe_submission(cfg, "/w/run", job_name="run").split("# submitit", 1)[1]
        assert after != before, f"slurm.{key} changes nothing"


def test_refused_before_anything_runs_naming_key_or_path(capsys, tmp_path, synth_cache):
    main = _tool("train")
    assert main([DEMO, "--work-dir", str(tmp_path), "launcher=slurmm"]) == 2
    assert "launcher" in capsys.readouterr().err
    missing = tmp_path / "gone.pt"
    assert main([DEMO, "--work-dir", str(tmp_path), *_tiny(synth_cache, 1), f"train.init_from={missing}"]) == 2
    err = capsys.readouterr().err
    assert "train.init_from" in err and str(missing) in err
    assert not (tmp_path / "config.yaml").exists()


def test_sweep_expansion_names_and_errors(tmp_path):
    from vlframe.config import ConfigError
    from vlframe.launch.sweep import expand, read_sweep_file

    f = tmp_path / "s.yaml"
    f.write_text("grid:\n  tasks.mlm.masker: [{type: conditional}, {type: joint}]\n  tasks.mrfr.masker: [{type: joint}]\n"
                 "points:\n  - {train.lr: 1.0e-4}\n  - {_name: fast, train.lr: 1.0e-3}\nseeds: [0, 1]\n")
    runs = expand(read_sweep_file(f))
    assert len(runs) == 2 * 2 * 1 * 2
    names = [r.name for r in runs]
    assert names[0] == "lr-0.0001_mlm.masker-conditional_mrfr.masker-joint_seed-0"
    assert "fast_mlm.masker-joint_mrfr.masker-joint_seed-1" in names
    assert len(set(names)) == len(names) and len({r.group for r in runs}) == 4
    assert runs[0].overrides == ['train.lr=0.0001', 'tasks.mlm.masker={"type": "conditional"}',
                                 'tasks.mrfr.masker={"type": "joint"}', "seed=0"]
    f.write_text("grid: {train.lr: [1, 2]}\nseed: [0]\n")
    with pytest.raises(ConfigError, match="unknown key.*seed"):
        read_sweep_file(f)


def test_sweep_typo_is_refused_naming_point_and_key(tmp_path, synth_cache, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("grid:\n  train.lr: [1.0e-3, 1.0e-4]\n  tasks.mlm.maskr: [{type: joint}]\n")
    assert _tool("sweep")([DEMO, str(f), "--sweep-dir", str(tmp_path / "sw"), "--local", *_tiny(synth_cache, 1)]) == 2
    err = capsys.readouterr().err
    assert "sweep point lr-0.001_maskr-joint" in err and "tasks.mlm.maskr" in err
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_local_sweep_with_seeds_gives_mean_and_std_skips_finished_and_resumes_failed(tmp_path, synth_cache, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("grid:\n  tasks.itm.neg_prob: [0.5]\nseeds: [0, 1]\n")
    out_dir = tmp_path / "sw"
    main = _tool("sweep")
    args = [DEMO, str(f), "--sweep-dir", str(out_dir), "--local", *_tiny(synth_cache, 2, "train.ckpt_interval=1")]
    assert main(args) == 0
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == ["neg_prob-0.5_seed-0", "neg_prob-0.5_seed-1"]
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to run" in capsys.readouterr().out
    # seed 1 "failed" after its checkpoint at step 1: only it runs again, resuming.
    failed = out_dir / "neg_prob-0.5_seed-1"
    (failed / "done.json").unlink()
    (failed / "checkpoints" / "ckpt_0000002.pt").unlink()
    assert main(args) == 0
    status = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("neg")}
    assert status == {"neg_prob-0.5_seed-0": "finished", "neg_prob-0.5_seed-1": "todo"}
    with open(failed / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh if "/loss" in line and "train/" in line]
    assert steps == [1, 2] and (failed / "done.json").is_file()

    assert main(["collect", str(out_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].strip("| ").split(" | ")
    row = table[2].strip("| ").split(" | ")
    assert header[:3] == ["point", "neg_prob", "runs"] and row[:3] == ["neg_prob-0.5", "0.5", "2/2"]
    assert "val/mlm/mlm_loss mean" in header and "val/mlm/mlm_loss std" in header
    finals = []
    for seed in (0, 1):
        with open(out_dir / f"neg_prob-0.5_seed-{seed}" / "metrics.jsonl") as fh:
            recs = [json.loads(line) for line in fh if "val/mlm/mlm_loss" in line]
        finals.append(recs[-1]["val/mlm/mlm_loss"])
    assert finals[0] != finals[1], "the seeds must give different runs"
    assert float(row[header.index("val/mlm/mlm_loss mean")]) == pytest.approx(statistics.fmean(finals), abs=1e-4)
    assert float(row[header.index("val/mlm/mlm_loss std")]) == pytest.approx(statistics.stdev(finals), abs=1e-4)
    assert (out_dir / "results.csv").read_text().count("\n") == 2


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(tmp_path, synth_cache):
    """A run that died after logging steps past its last checkpoint: those steps are trained
    again on resume, and metrics.jsonl holds each step once, with the uninterrupted values."""
    from vlframe.launch import prepare, run_training

    overrides = _tiny(synth_cache, 6, "train.ckpt_interval=3", "train.keep_ckpts=3")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_training(prepare(DEMO, overrides), str(ref))
    shutil.copytree(ref, cut)  # the same run, then as if it died after logging step 6, before saving it
    os.unlink(cut / "checkpoints" / "ckpt_0000006.pt")
    (cut / "done.json").unlink()
    run_training(prepare(DEMO, overrides), str(cut))

    def losses(d):
        with open(d / "metrics.jsonl") as fh:
            recs = [json.loads(line) for line in fh]
        return [(r["step"], k, v) for r in recs for k, v in r.items() if k.startswith("train/") and k.endswith("/loss")]

    got, want = losses(cut), losses(ref)
    assert [s for s, _, _ in got] == list(range(1, 7))
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want], rel=1e-6)


def test_shipped_sweep_expands_and_validates(capsys, tmp_path):
    sweep = os.path.join(ROOT, "configs", "sweeps", "masking_x_ot_x_mix.yaml")
    assert _tool("sweep")([DEMO, sweep, "--dry-run", "--sweep-dir", str(tmp_path / "sw")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("# 24 runs, 24 to run")
    assert lines[0].split()[:2] == ["mix-2211_masker-conditional_ot_solver-ipot_seed-0", "todo"]
    assert not (tmp_path / "sw").exists()


def test_no_slurm_on_this_host_is_one_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    assert _tool("train")([DEMO, "--work-dir", str(tmp_path / "run"), "launcher=slurm"]) == 2
    err = capsys.readouterr().err
    assert "launcher=slurm" in err and "srun" in err
    assert not (tmp_path / "run").exists()
