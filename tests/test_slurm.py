"""The SLURM launcher on a real SLURM (scripts/slurm_up.sh starts one on this machine; .ci/run
does so for CI). Without a reachable SLURM these tests skip, and FAIL where env CI is set.

Every wait is bounded (``_wait``); jobs are tiny pretraining runs of a few steps. A user module
(written per test session, imported through ``custom_imports`` in the job) adds two hooks: one
that slows the steps down so a job can be interrupted mid-run, one that saves each rank's
parameters at the end of training.
"""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slurm

DEMO = os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml")
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD", "SUSPENDED", "PREEMPTED"}

HOOKS_MODULE = '''
import os
import time

import torch

from vlframe.engine.hooks import Hook
from vlframe.registry import HOOKS


@HOOKS.register_module(name="SlowSteps")
class SlowSteps(Hook):
    """Sleeps after each step: a job long enough to be interrupted mid-run."""

    def __init__(self, *, seconds: float):
        self.seconds = seconds

    def after_step(self, trainer, task, logs):
        time.sleep(self.seconds)


@HOOKS.register_module(name="SaveRankParams")
class SaveRankParams(Hook):
    """Every rank writes its parameters at the end (the checkpoint holds rank 0's only)."""

    def after_train(self, trainer):
        rank = int(os.environ.get("RANK", "0"))
        state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        torch.save(state, os.path.join(trainer.work_dir, f"params_rank{rank}.pt"))
'''


@functools.lru_cache(maxsize=None)
def _slurm_up() -> str | None:
    """None if a SLURM answers, else why not (asked once per session)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"sinfo: {(out.stderr or out.stdout).strip()[:200] or 'no usable node'}"
    return None


@pytest.fixture(scope="module")
def slurm():
    why = _slurm_up()
    if why is not None:
        msg = f"no running SLURM ({why}); start one: eval $(bash scripts/slurm_up.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def user_hooks(tmp_path_factory):
    """A user module with the two test hooks, importable in jobs through PYTHONPATH."""
    folder = tmp_path_factory.mktemp("user_hooks")
    (folder / "slurm_test_hooks.py").write_text(textwrap.dedent(HOOKS_MODULE))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), ROOT] + ([old] if old else []))
    sys.path.insert(0, str(folder))  # the submitting side validates (imports) it too
    yield "slurm_test_hooks"
    sys.path.remove(str(folder))
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _overrides(cache, *, steps, extra=()):
    return [*tiny_overrides(cache), f"train.max_steps={steps}", "train.phases=[]", "train.warmup_steps=0",
            f"train.val_interval={steps}", "slurm.cpus_per_task=1", "slurm.time_min=30", *extra]


def _job_id(work_dir) -> str:
    with open(os.path.join(work_dir, "job.json")) as f:
        return json.load(f)["job_id"]


def _states(job_ids) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                         timeout=30)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def _logs(folder) -> str:
    texts = []
    for root, _, files in os.walk(folder):
        for n in sorted(files):
            if n.endswith((".err", ".out")):
                with open(os.path.join(root, n), errors="replace") as f:
                    texts.append(f"--- {n}\n" + f.read()[-3000:])
    return "\n".join(texts)


def _wait(job_ids, timeout, *, logs_in=()):
    """Until none of ``job_ids`` (array ids expand) is pending or running; at most ``timeout`` s."""
    start = time.time()
    while time.time() - start < timeout:
        states = _states(job_ids)
        if not any(s in ACTIVE for s in states.values()):
            return time.time() - start
        time.sleep(1)
    subprocess.run(["scancel", *job_ids], timeout=30)
    raise AssertionError(f"jobs {job_ids} still {states} after {timeout} s\n" + "\n".join(_logs(f) for f in logs_in))


def _wait_for(predicate, timeout, what):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _records(work_dir):
    with open(os.path.join(work_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_losses(work_dir):
    """step -> (task, loss) of every logged training record, checking each step is logged once."""
    out = {}
    for rec in _records(work_dir):
        for k, v in rec.items():
            if k.startswith("train/") and k.endswith("/loss"):
                assert rec["step"] not in out, f"step {rec['step']} logged twice in {work_dir}"
                out[rec["step"]] = (k, v)
    return out


def _ckpts(work_dir):
    folder = os.path.join(work_dir, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def preempted_runs(slurm, user_hooks, synth_cache, tmp_path_factory):
    """Three identical slowed-down jobs: one left alone, one interrupted the way SLURM preempts
    (submitit's ``_interrupt``: SIGTERM then USR2, so ``checkpoint()`` requeues it), one restarted
    by ``scontrol requeue`` (no ``checkpoint()`` call). Each interruption comes after the first
    checkpoint and before the last step."""
    base = tmp_path_factory.mktemp("preempt")
    # scontrol requeue sends SIGTERM (submitit lets the job run on) and SIGKILL KillWait=5 s
    # later: 24 steps of >= 0.4 s leave it mid-run when it dies.
    steps = 24
    extra = [f"custom_imports=[projects.uniter,{user_hooks}]", "hooks=[{type: SlowSteps, seconds: 0.4}]",
             "train.ckpt_interval=4", "train.keep_ckpts=5", "launcher=slurm"]
    train = _tool("train")
    dirs = {k: str(base / k) for k in ("plain", "interrupt", "requeue")}
    t0 = time.time()
    for wd in dirs.values():
        assert train([DEMO, "--work-dir", wd, *_overrides(synth_cache, steps=steps, extra=extra)]) == 0
    ids = {k: _job_id(wd) for k, wd in dirs.items()}
    # Interrupt each of the two after its first checkpoint.
    for kind in ("interrupt", "requeue"):
        wd = dirs[kind]
        _wait_for(lambda wd=wd: "ckpt_0000004.pt" in _ckpts(wd), 180, f"the first checkpoint of {wd}")
        assert f"ckpt_{steps:07d}.pt" not in _ckpts(wd)
        if kind == "interrupt":
            import submitit

            submitit.SlurmJob(folder=os.path.join(wd, "slurm", "%j"), job_id=ids[kind])._interrupt(timeout=False)
        else:
            subprocess.run(["scontrol", "requeue", ids[kind]], check=True, timeout=30)
    took = _wait(list(ids.values()), 300, logs_in=[os.path.join(wd, "slurm") for wd in dirs.values()])
    print(f"3 jobs ({steps} slowed steps each), two of them requeued: {time.time() - t0:.1f} s (last wait {took:.1f} s)")
    return dirs, steps


def test_submitted_job_finishes_with_config_metrics_and_checkpoint(preempted_runs):
    dirs, steps = preempted_runs
    wd = dirs["plain"]
    for name in ("config.yaml", "metrics.jsonl", "done.json", "job.json"):
        assert os.path.isfile(os.path.join(wd, name)), name
    assert f"ckpt_{steps:07d}.pt" in _ckpts(wd)
    from vlframe.config import load_config

    cfg = load_config(os.path.join(wd, "config.yaml"))
    assert cfg.launcher == "slurm" and cfg.train.max_steps == steps and cfg.slurm.cpus_per_task == 1
    assert sorted(_train_losses(wd)) == list(range(1, steps + 1))
    assert any(k.startswith("val/") for k in _records(wd)[-1])
    log_dir = os.path.join(wd, "slurm", _job_id(wd))
    assert os.path.isfile(os.path.join(log_dir, f"{_job_id(wd)}_0_log.err")), "submitit's logs are in the run folder"
    state = torch.load(os.path.join(wd, "checkpoints", f"ckpt_{steps:07d}.pt"), weights_only=True)
    assert state["step"] == steps


@pytest.mark.parametrize("kind", ["interrupt", "requeue"])
def test_interrupted_job_requeues_and_resumes_without_losing_or_repeating_a_step(preempted_runs, kind):
    dirs, steps = preempted_runs
    wd = dirs[kind]
    log = _logs(os.path.join(wd, "slurm"))
    assert "restart 1" in log, f"the job did not restart:\n{log[-3000:]}"
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "resumed from" in line and " at step " in line]
    assert resumed and 4 <= resumed[0] < steps, f"did not resume from a mid-run checkpoint: {resumed}"
    print(f"{kind}: resumed at step {resumed[0]} of {steps}")
    if kind == "interrupt":
        assert "Calling checkpoint method" in log and "this job is preempted" in log
    plain, mine = _train_losses(dirs["plain"]), _train_losses(wd)
    assert sorted(mine) == list(range(1, steps + 1)), "every step logged exactly once"
    for step in plain:
        assert mine[step][0] == plain[step][0], f"step {step}: another task than the uninterrupted run"
        assert mine[step][1] == pytest.approx(plain[step][1], rel=1e-6, abs=1e-7), f"step {step}: loss differs"
    final = torch.load(os.path.join(wd, "checkpoints", f"ckpt_{steps:07d}.pt"), weights_only=True)
    ref = torch.load(os.path.join(dirs["plain"], "checkpoints", f"ckpt_{steps:07d}.pt"), weights_only=True)
    assert final["step"] == ref["step"] == steps
    for k, v in ref["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_sweep_is_one_job_array_table_has_four_rows_and_rerun_submits_nothing(slurm, synth_cache, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "grid:\n"
        "  tasks.mlm.masker: [{type: conditional}, {type: joint}]\n"
        "  tasks.itm.ot_solver: [{type: ipot}, {type: sinkhorn, epsilon: 0.05}]\n"
    )
    out_dir = str(tmp_path / "sweep")
    main = _tool("sweep")
    args = [DEMO, str(sweep), "--sweep-dir", out_dir, *_overrides(synth_cache, steps=3)]
    t0 = time.time()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "as job array" in printed
    names = sorted(d for d in os.listdir(out_dir) if d.startswith("masker-"))
    assert len(names) == 4
    ids = [_job_id(os.path.join(out_dir, n)) for n in names]
    assert len({i.split("_")[0] for i in ids}) == 1, f"not one array: {ids}"
    took = _wait(sorted({i.split("_")[0] for i in ids}), 300, logs_in=[os.path.join(out_dir, "slurm")])
    print(f"4-point sweep as a job array: {time.time() - t0:.1f} s (wait {took:.1f} s)")
    for n in names:
        assert os.path.isfile(os.path.join(out_dir, n, "done.json")), _logs(os.path.join(out_dir, "slurm"))

    assert main(["collect", out_dir]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| masker-")]
    assert len(lines) == 4 and all("1/1" in line for line in lines)
    header = next(line for line in table.splitlines() if line.startswith("| point"))
    assert "val/mlm/mlm_acc" in header and "| masker | ot_solver |" in header
    with open(os.path.join(out_dir, "results.csv")) as f:
        rows = f.read().splitlines()
    assert len(rows) == 5
    assert all(float(r.split(",")[4]) == float(r.split(",")[4]) for r in rows[1:])  # a number, not empty

    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "nothing to run" in again and again.count("finished") >= 4
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    assert after == before


def test_two_task_job_ends_with_identical_parameters_on_both_ranks(slurm, user_hooks, synth_cache, tmp_path):
    """srun starts 2 processes; submitit's job environment gives them the process group (gloo).
    Both end with the same parameters, equal (1e-5) to one process with grad_accum=2, which sees
    the same global batches (rank r's k-th batch is batch 2k+r of the shared plan)."""
    from vlframe.engine.trainer import Trainer
    from vlframe.launch import prepare

    wd = str(tmp_path / "ddp")
    extra = [f"custom_imports=[projects.uniter,{user_hooks}]", "hooks=[{type: SaveRankParams}]", "launcher=slurm",
             "slurm.tasks_per_node=2", "train.ckpt_interval=4"]
    t0 = time.time()
    assert _tool("train")([DEMO, "--work-dir", wd, *_overrides(synth_cache, steps=4, extra=extra)]) == 0
    one = Trainer(prepare(DEMO, _overrides(synth_cache, steps=4, extra=["train.grad_accum=2"])),
                  work_dir=str(tmp_path / "one"))
    one.train()  # the reference trains here while the job runs
    took = _wait([_job_id(wd)], 240, logs_in=[os.path.join(wd, "slurm")])
    print(f"2-task gloo job: {time.time() - t0:.1f} s (wait {took:.1f} s)")
    log = _logs(os.path.join(wd, "slurm"))
    for r in (0, 1):
        assert os.path.isfile(os.path.join(wd, f"params_rank{r}.pt")), log[-4000:]
    assert "'WORLD_SIZE': '2'" in log and "'MASTER_ADDR': 'localhost'" in log
    p0 = torch.load(os.path.join(wd, "params_rank0.pt"), weights_only=True)
    p1 = torch.load(os.path.join(wd, "params_rank1.pt"), weights_only=True)
    saved = torch.load(os.path.join(wd, "checkpoints", "ckpt_0000004.pt"), weights_only=True)["model"]
    assert p0.keys() == p1.keys() == saved.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between the ranks"
        torch.testing.assert_close(saved[k], p0[k])  # what rank 0 checkpointed
    ref = one.model.state_dict()
    worst = max(float((p0[k].float() - ref[k].float()).abs().max()) for k in p0)
    assert worst <= 1e-5, f"2 ranks vs 1 process with grad_accum=2: max difference {worst:.3g}"


@pytest.mark.parametrize("bad", ["typo", "missing_data"])
def test_bad_config_is_refused_before_submission(slurm, synth_cache, tmp_path, capsys, bad):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    wd = tmp_path / "run"
    args = [DEMO, "--work-dir", str(wd), *_overrides(synth_cache, steps=2), "launcher=slurm"]
    missing = tmp_path / "nowhere" / "regions"
    if bad == "typo":
        args.append("slurm.gpus_per_nod=2")
    else:
        args += [f"data.train={{type: image_text, region_store: {missing}, text_store: {tmp_path}, feat_dim: 32}}",
                 "data.val=null"]
    assert _tool("train")(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if bad == "typo":
        assert "slurm.gpus_per_nod" in err and "slurm.gpus_per_node" in err
    else:
        assert "data.train.region_store" in err and str(missing) in err
    assert not (wd / "job.json").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    assert after == before
