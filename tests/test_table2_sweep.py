"""Pipeline sweeps (pretrain, then finetune + evaluate each downstream task from its final
checkpoint) and the paper's Table 2 layout: the plan of the shipped table2_tiny sweep, collect's
formatting on hand-made metrics, a failed stage here (--local), and on the real local SLURM the
quick variant end to end and a sweep killed mid-way and run again (only the missing stages run)."""
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import time

import pytest
import yaml

from tests.conftest import ROOT, tiny_overrides
from tests.test_slurm import _logs, _wait, slurm, user_hooks  # noqa: F401 - fixtures
from vlframe.config import ConfigError
from vlframe.launch import sweep as S

SWEEP = os.path.join(ROOT, "configs", "uniter", "sweeps", "table2_tiny.yaml")
CONFIGS = os.path.join(ROOT, "configs", "uniter")
STAGES = ["vqa", "itr", "nlvr2", "refcoco"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


# ----------------------------------------------------------------------------- the plan


def test_shipped_table2_sweep_expands_to_every_line_and_seed():
    spec = S.read_sweep_file(SWEEP)
    runs = S.expand(spec)
    lines = sorted({r.group for r in runs})
    assert len(lines) == 16 and len(runs) == 48  # L1-L14 + Sinkhorn + exact OT for L11, 3 seeds
    assert {r.seed for r in runs} == {0, 1, 2}
    assert [st["name"] for st in spec["pipeline"]] == STAGES
    assert all(os.path.isfile(r.config) for r in runs)
    assert {r.meta["line"] for r in runs} >= {str(i) for i in range(1, 15)}
    paper = {r.meta["line"]: r.meta.get("paper") for r in runs}
    assert paper["11"] == {"Meta-Sum": 400.93, "VQA": 72.47, "IR": 83.72, "TR": 93.03, "NLVR2": 76.91, "RE": 74.80}
    for line, p in paper.items():  # the paper's Meta-Sum is the sum of its five columns ...
        if p:
            gap = sum(p[c] for c in S.TABLE2_ORDER[1:]) - p["Meta-Sum"]
            # ... except L1's, printed 314.34 for columns summing to 314.07 (kept as printed)
            assert abs(gap - (-0.27 if line == "1" else 0.0)) < 0.006, line


def test_plan_chains_each_stage_to_its_pretraining_final_checkpoint(tmp_path):
    sweep_dir, runs, stages = S.plan_pipeline(None, SWEEP, sweep_dir=str(tmp_path / "sw"), launcher="local",
                                              quick=True)
    assert [r.group for r in runs] == ["L01-none", "L02-mlm-text-only", "L05-mlm", "L06-mlm-itm",
                                       "L11-mlm-itm-mrckl-mrfr-wra"]
    assert len(stages) == 5 * 5 and all(s.status == "todo" for s in stages)
    by_key = {s.key: s for s in stages}
    l02 = by_key["L02-mlm-text-only_seed-0/pretrain"]
    for run in runs:
        pre = by_key[f"{run.name}/pretrain"]
        assert pre.work_dir == os.path.join(sweep_dir, run.name, "pretrain")
        steps = int(pre.cfg.train.max_steps)
        assert steps == (0 if run.group == "L01-none" else 6)  # L1: no pretraining, whatever the budget
        # the paper's protocol: from L3 on, pretraining starts from L2's final weights (same seed)
        if run.group in ("L01-none", "L02-mlm-text-only"):
            assert pre.after is None and not pre.cfg.train.get("init_from")
        else:
            assert pre.after == l02.work_dir
            assert pre.cfg.train.init_from == os.path.join(l02.work_dir, "checkpoints", "ckpt_0000006.pt")
        for name in STAGES:
            st = by_key[f"{run.name}/{name}"]
            assert st.after == pre.work_dir
            assert st.cfg.train.init_from == os.path.join(pre.work_dir, "checkpoints", f"ckpt_{steps:07d}.pt")
            assert int(st.cfg.train.max_steps) == 4 and int(st.cfg.seed) == run.seed == 0
            assert set(st.cfg.tasks) == {"refcoco" if name == "refcoco" else name}
    # the full grid's budgets are the sweep file's overrides (L1 keeps its 0 steps)
    from vlframe.config import load_and_validate

    spec = S.read_sweep_file(SWEEP)
    budget = yaml.safe_load(open(SWEEP))
    for run in S.expand(spec)[:4:3]:  # L1 and L2, seed 0
        cfg = load_and_validate(run.config, [*spec["overrides"], *run.overrides])
        assert int(cfg.train.max_steps) == (0 if run.group == "L01-none" else budget["overrides"]["train.max_steps"])
    assert {st["overrides"]["train.max_steps"] for st in budget["pipeline"]} == {
        int(v.split("=")[1]) for st in spec["pipeline"] for v in st["overrides"] if v.startswith("train.max_steps=")}


def test_pipeline_sweep_file_errors_name_the_key(tmp_path):
    def bad(text, match):
        f = tmp_path / "s.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            S.read_sweep_file(f, quick="quick" in text)

    ft = os.path.join(CONFIGS, "finetune_vqa_tiny_synth.yaml")
    bad(f"seeds: [0]\npipeline: [{{name: pretrain, config: {ft}}}]\n", r"pipeline\[0\].name")
    bad(f"seeds: [0]\npipeline: [{{name: a, config: {ft}}}, {{name: a, config: {ft}}}]\n", "appears twice")
    bad("seeds: [0]\npipeline: [{name: a, config: nowhere.yaml}]\n", r"pipeline\[0\].config: config file not found")
    bad(f"seeds: [0]\npipeline: [{{name: a, config: {ft}, steps: 3}}]\n", r"pipeline\[0\]: expected")
    bad(f"points: [{{_name: x, _config: {ft}}}]\nquick: {{points: [y]}}\n", r"quick.points: \['y'\]")


# ----------------------------------------------------------------------------- the table


def _fake_sweep(root, lines):
    """A pipeline sweep folder by hand: lines = [(name, meta, [per-seed {column: value in %}])]."""
    runs = []
    for name, meta, seeds in lines:
        for seed, cols in enumerate(seeds):
            run = f"{name}_seed-{seed}"
            runs.append({"name": run, "group": name, "values": {}, "seed": seed, "overrides": [], "meta": meta})
            per_stage = {
                "vqa": ("vqa", {"vqa/vqa_score": cols["VQA"] / 100}),
                "itr": ("itr", {f"itr/{k}_r{n}": (cols[k.upper()] + d) / 100
                                for k in ("ir", "tr") for n, d in ((1, -3.0), (5, 1.0), (10, 2.0))}),
                "nlvr2": ("nlvr2", {"nlvr2/acc": cols["NLVR2"] / 100}),
                "refcoco": ("refexp", {"refcoco/acc_det": cols["RE"] / 100, "refcoco/acc_gt": 0.99}),
            }
            for stage, (ttype, metrics) in per_stage.items():
                wd = os.path.join(root, run, stage)
                os.makedirs(wd)
                with open(os.path.join(wd, "done.json"), "w") as f:
                    json.dump({"max_steps": 4, "metrics": {}}, f)
                with open(os.path.join(wd, "metrics.json"), "w") as f:
                    json.dump({"protocol": {"tasks": {stage: ttype}}, "metrics": metrics}, f)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"config": None, "pipeline": STAGES, "keys": [], "seeds": [0, 1, 2], "runs": runs}, f)


def _cols(v, *, re_=50.0):
    return {"VQA": v, "IR": 40.0, "TR": 60.0, "NLVR2": 55.0, "RE": re_}


def test_collect_table2_mean_sd_noise_marks_paper_and_rank_correlation(tmp_path, capsys):
    from scipy.stats import spearmanr  # the reference (scipy comes with POT, a dev dependency)

    paper = lambda m: {"Meta-Sum": m, "VQA": 70.0}  # noqa: E731
    lines = [
        ("L01", {"line": "1", "data": "None", "tasks": "None", "paper": paper(314.34)},
         [_cols(10.0), _cols(11.0), _cols(12.0)]),  # VQA 11 ± 1
        ("L05", {"line": "5", "data": "In-domain", "tasks": "MLM", "paper": paper(386.10)},
         [_cols(30.0), _cols(31.0), _cols(32.0)]),  # +20, spread sqrt(2): beyond noise
        ("L06", {"line": "6", "data": "In-domain", "tasks": "MLM + ITM", "paper": paper(393.04)},
         [_cols(30.5), _cols(31.5), _cols(30.0)]),  # +0.33: inside the noise
        ("L06b", {"line": "6b", "vs": "L01", "paper": paper(300.0)},
         [_cols(11.0, re_=49.0), _cols(11.0, re_=51.0), _cols(11.0, re_=50.0)]),
    ]
    _fake_sweep(str(tmp_path), lines)
    assert _tool("sweep")(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| ") and not r.startswith("| line")}
    header = [c.strip() for c in out.splitlines()[0].split("|")[1:-1]]
    col = {c: header.index(c) for c in header}
    assert rows["1"][col["VQA"]] == "11.00 ± 1.00" and rows["1"][col["seeds"]] == "3/3"
    assert rows["1"][col["Meta-Sum"]] == f"{11 + 40 + 60 + 55 + 50:.2f} ± 1.00"
    assert rows["5"][col["VQA"]] == "31.00 ± 1.00 *" and rows["5"][col["Meta-Sum"]].endswith(" *")
    assert rows["5"][col["Δ Meta-Sum"]] == "+20.00" and rows["5"][col["vs"]] == "1"
    assert not rows["6"][col["VQA"]].endswith("*") and rows["6"][col["vs"]] == "5"
    assert rows["6"][col["IR"]] == "40.00 ± 0.00"  # the mean of R@1, R@5, R@10
    assert rows["6b"][col["vs"]] == "1" and rows["6b"][col["RE"]] == "50.00 ± 1.00"
    assert rows["6"][col["paper Meta-Sum"]] == "393.04" and rows["6"][col["paper IR"]] == ""
    toy = [sum(_cols(0)[c] for c in ("IR", "TR", "NLVR2", "RE")) + v for v in (11.0, 31.0, 30.5 + 1 / 6, 11.0)]
    rho = spearmanr(toy, [314.34, 386.10, 393.04, 300.0]).statistic
    assert f"with the paper's: {rho:.2f} over 4 lines" in out
    # line 1 against every line (not only its `vs` neighbour): 5 and 6 are above it beyond the noise, 6b is not
    assert "above it by more than twice the combined spread: 5, 6; not: 6b." in out
    table = S.collect(str(tmp_path))
    assert math.isclose(table["spearman"], rho, abs_tol=1e-12)
    assert table["baseline"]["above"] == ["5", "6"] and table["baseline"]["within"] == ["6b"]
    with open(tmp_path / "table2.csv") as f:
        head, *csv_rows = [line.rstrip("\n").split(",") for line in f]
    assert head[:7] == ["line", "pretraining data", "tasks", "seeds", "Meta-Sum mean", "Meta-Sum sd",
                        "Meta-Sum beyond noise"]
    assert csv_rows[1][head.index("VQA mean")] == "31.00" and csv_rows[1][head.index("VQA beyond noise")] == "true"
    assert csv_rows[0][head.index("VQA beyond noise")] == ""  # the first line has nothing to compare with
    with open(tmp_path / "table2.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_baseline_check_names_the_lowest_and_the_lines_inside_the_noise():
    row = lambda line, m, sd: {"line": line, S.META_SUM: (m, sd)}  # noqa: E731
    got = S.baseline_check([row("1", 200.0, 2.0), row("2", 199.0, 1.0), row("3", 220.0, 3.0), row("4", 230.0, math.nan)])
    assert got["lowest"] is False and got["above"] == ["3"] and got["within"] == ["2"] and got["unknown"] == ["4"]
    assert "not the lowest (line 2 is)" in got["text"]
    # 5 < 2 * sqrt(8) = 5.66: inside the noise; 6 > 5.66: beyond it; a line without results is left out
    got = S.baseline_check([row("1", 200.0, 2.0), row("2", 205.0, 2.0), row("3", 206.0, 2.0), row("4", math.nan, math.nan)])
    assert got["lowest"] is True and got["above"] == ["3"] and got["within"] == ["2"] and got["unknown"] == []
    assert got["text"].startswith("Line 1 against every other line (Meta-Sum): the lowest;")
    assert S.baseline_check([row("1", math.nan, math.nan), row("2", 205.0, 2.0)]) is None


def test_noise_rule_and_ranks_against_references():
    from scipy.stats import rankdata, spearmanr

    assert S.beyond_noise((10.0, 1.0), (12.9, 1.0)) is True  # 2.9 > 2 * sqrt(2) = 2.83
    assert S.beyond_noise((10.0, 1.0), (12.8, 1.0)) is False
    assert S.beyond_noise((10.0, math.nan), (20.0, 1.0)) is None  # one seed: the spread is unknown
    x = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0, 4.0]
    y = [1.0, 2.0, 2.0, 7.0, 3.0, 9.0, 0.5]
    assert S._ranks(x) == list(rankdata(x))
    assert math.isclose(S.spearman(x, y), spearmanr(x, y).statistic, abs_tol=1e-12)


# ----------------------------------------------------------------------------- running it


def _tiny(cache):
    return [*tiny_overrides(cache), "train.val_batches=1"]


def _sweep_file(path, points, *, pre_extra=None, stages=("vqa", "refcoco"), pre_steps=4, stage_steps=2):
    spec = {
        "overrides": {"train.max_steps": pre_steps, "train.val_interval": pre_steps, "train.ckpt_interval": 2,
                      "train.warmup_steps": 0, "train.phases": [], "slurm.cpus_per_task": 1, "slurm.time_min": 30,
                      **(pre_extra or {})},
        "points": points,
        "seeds": [0],
        "pipeline": [{"name": s, "config": os.path.join(CONFIGS, f"finetune_{s}_tiny_synth.yaml"),
                      "overrides": {"train.max_steps": stage_steps, "train.val_interval": stage_steps,
                                    "train.ckpt_interval": stage_steps, "train.warmup_steps": 0,
                                    "slurm.cpus_per_task": 1, "slurm.time_min": 30}} for s in stages],
    }
    path.write_text(yaml.safe_dump(spec))
    return str(path)


BOOM = '''
from vlframe.engine.hooks import Hook
from vlframe.registry import HOOKS


@HOOKS.register_module(name="BoomAtStart")
class BoomAtStart(Hook):
    def before_train(self, trainer):
        raise RuntimeError("boom: this pretraining fails on purpose")
'''


@pytest.mark.slow
def test_local_pipeline_failed_pretraining_reports_log_and_skips_its_stages(tmp_path, synth_cache, capsys,
                                                                           monkeypatch):
    (tmp_path / "boom_hooks.py").write_text(BOOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    l05 = os.path.join(CONFIGS, "ablations", "L05_mlm.yaml")
    f = _sweep_file(tmp_path / "s.yaml", [
        {"_name": "ok", "_config": l05},
        {"_name": "bad", "_config": l05, "custom_imports": ["projects.uniter", "boom_hooks"],
         "hooks": [{"type": "BoomAtStart"}]},
    ], stages=("vqa",))
    out_dir = tmp_path / "sw"
    main = _tool("sweep")
    assert main([f, "--local", "--sweep-dir", str(out_dir), *_tiny(synth_cache)]) == 1
    out = capsys.readouterr().out
    log = out_dir / "bad_seed-0" / "pretrain" / "stage.log"
    assert f"# bad_seed-0/pretrain: FAILED, log: {log}" in out
    assert "# bad_seed-0/vqa: not run (bad_seed-0/pretrain failed)" in out
    assert "boom: this pretraining fails on purpose" in log.read_text()
    assert "2/4 stages finished, 1 failed, 1 not run" in out
    ok_vqa = out_dir / "ok_seed-0" / "vqa"
    with open(ok_vqa / "metrics.json") as fh:
        protocol = json.load(fh)["protocol"]
    assert protocol["init_from"] == str(out_dir / "ok_seed-0" / "pretrain" / "checkpoints" / "ckpt_0000004.pt")
    assert protocol["checkpoint"] == str(ok_vqa / "checkpoints" / "ckpt_0000002.pt")
    assert protocol["split"] == "val" and protocol["checkpoint_step"] == 2
    assert not (out_dir / "bad_seed-0" / "vqa").exists()
    # Again: the finished stages are skipped, the failed one runs again (and fails again).
    mtime = os.path.getmtime(ok_vqa / "done.json")
    assert main([f, "--local", "--sweep-dir", str(out_dir), *_tiny(synth_cache)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^ok_seed-0/vqa\s+finished$", out, re.M) and "# running ok_seed-0" not in out
    assert "# running bad_seed-0/pretrain" in out
    assert os.path.getmtime(ok_vqa / "done.json") == mtime


def _starts(stage_dir) -> int:
    """How many times a SLURM stage started: one submitit log per job that ran."""
    folder = os.path.join(stage_dir, "slurm")
    if not os.path.isdir(folder):
        return 0
    return sum(1 for job in os.listdir(folder) if os.path.isfile(os.path.join(folder, job, f"{job}_0_log.out")))


def _numeric(cell: str) -> bool:
    try:
        float(cell.split(" ± ")[0])
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.slurm
def test_quick_table2_through_slurm_end_to_end(slurm, synth_cache, tmp_path, capsys):  # noqa: F811
    out_dir = tmp_path / "quick"
    t0 = time.time()
    assert _tool("sweep")([SWEEP, "--quick", "--wait", "--sweep-dir", str(out_dir), *_tiny(synth_cache)]) == 0, \
        _logs(str(out_dir))
    wall = time.time() - t0
    out = capsys.readouterr().out
    assert "# 25/25 stages finished, 0 failed, 0 not run, 0 queued" in out
    assert _tool("sweep")(["collect", str(out_dir)]) == 0
    md = capsys.readouterr().out
    header = [c.strip() for c in md.splitlines()[0].split("|")[1:-1]]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in md.splitlines()[2:] if r.startswith("| ")]
    assert [r[0] for r in rows] == ["1", "2", "5", "6", "11"]
    for r in rows:
        for c in S.TABLE2_ORDER:
            assert _numeric(r[header.index(c)]), (c, r)
        assert _numeric(r[header.index("paper Meta-Sum")]) and r[header.index("seeds")] == "1/1"
    for name in S.TABLE2_FILES:
        assert (out_dir / name).is_file()
    # L02's pretraining, which L05-L11 start from, was submitted before every other stage.
    jobs = {os.path.relpath(os.path.dirname(p), out_dir): int(_job(os.path.dirname(p)))
            for p in glob.glob(str(out_dir / "*" / "*" / "job.json"))}
    assert len(jobs) == 25
    first = min(jobs, key=jobs.get)
    assert first.startswith("L02") and first.endswith("pretrain"), sorted(jobs.items(), key=lambda kv: kv[1])
    print(f"quick Table 2 through SLURM: {wall:.0f} s")  # the figure for the README (run with -s)


def _job(stage_dir):
    with open(os.path.join(stage_dir, "job.json")) as f:
        return json.load(f)["job_id"]


@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_killed_mid_way_then_run_again_runs_only_the_missing_stages(slurm, user_hooks, synth_cache,  # noqa: F811
                                                                         tmp_path, capsys):
    l05 = os.path.join(CONFIGS, "ablations", "L05_mlm.yaml")
    slow = {"custom_imports": ["projects.uniter", user_hooks], "hooks": [{"type": "SlowSteps", "seconds": 0.5}]}
    f = _sweep_file(tmp_path / "s.yaml", [{"_name": "fast", "_config": l05}, {"_name": "slow", "_config": l05, **slow}],
                    pre_steps=12)
    out_dir = tmp_path / "sw"
    main = _tool("sweep")
    args = [f, "--sweep-dir", str(out_dir), *_tiny(synth_cache)]
    assert main(args) == 0
    fast, slow_pre = out_dir / "fast_seed-0", out_dir / "slow_seed-0" / "pretrain"
    jobs = [_job(out_dir / p / s) for p in ("fast_seed-0", "slow_seed-0") for s in ("pretrain", "vqa", "refcoco")]
    # Kill the slow pretraining mid-run (after its first checkpoint): SLURM cancels the stages
    # waiting on it (afterok + kill-on-invalid-dep) instead of leaving them pending.
    deadline = time.time() + 240
    while not (slow_pre / "checkpoints" / "ckpt_0000002.pt").is_file():
        assert time.time() < deadline, _logs(str(out_dir))
        time.sleep(0.5)
    subprocess.run(["scancel", _job(slow_pre)], check=True, timeout=30)
    _wait(jobs, 240, logs_in=[str(out_dir)])
    _, _, stages = S.plan_pipeline(None, f, sweep_dir=str(out_dir), overrides=_tiny(synth_cache))
    status = {s.key: s.status for s in stages}
    assert status["fast_seed-0/vqa"] == status["fast_seed-0/refcoco"] == "finished"
    assert status["slow_seed-0/pretrain"] == "failed"
    rep = S.report(stages, echo=print)
    assert rep["not_run"] == ["slow_seed-0/vqa", "slow_seed-0/refcoco"]
    assert f"# slow_seed-0/pretrain: FAILED, log: {slow_pre / 'slurm' / _job(slow_pre)}" in capsys.readouterr().out
    assert _starts(out_dir / "slow_seed-0" / "vqa") == 0  # cancelled before it ever started
    before = {p: os.path.getmtime(fast / p / "done.json") for p in ("pretrain", "vqa", "refcoco")}
    # Run again: only the three missing stages run; the killed pretraining resumes.
    assert main([*args, "--wait"]) == 0, _logs(str(out_dir))
    out = capsys.readouterr().out
    assert "# 6/6 stages finished" in out and "# submitted 3 stage jobs" in out
    assert {p: os.path.getmtime(fast / p / "done.json") for p in before} == before
    assert [_starts(fast / s) for s in ("pretrain", "vqa", "refcoco")] == [1, 1, 1]
    assert _starts(slow_pre) == 2
    assert [_starts(out_dir / "slow_seed-0" / s) for s in ("vqa", "refcoco")] == [1, 1]
    log = open(os.path.join(slow_pre, "slurm", _job(slow_pre), f"{_job(slow_pre)}_0_log.err")).read()
    assert "resumed from" in log
    # And again: nothing to run.
    assert main([*args, "--wait"]) == 0
    assert "# submitted 0 stage jobs" in capsys.readouterr().out


def test_readme_own_line_is_one_point_that_plans(tmp_path):
    """The README's "your own line" point, added to the shipped sweep, is checked like the others."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("then add one point to `configs/uniter/sweeps/table2_tiny.yaml`:", 1)[1]
    point = yaml.safe_load(block.split("```yaml", 1)[1].split("```", 1)[0])[0]
    spec = yaml.safe_load(open(SWEEP))
    here = os.path.dirname(SWEEP)
    for p in [*spec["points"], point]:
        p["_config"] = os.path.normpath(os.path.join(here, p["_config"]))
    for st in spec["pipeline"]:
        st["config"] = os.path.normpath(os.path.join(here, st["config"]))
    spec["points"].append(point)
    spec["quick"]["points"] = [point["_name"], point["_vs"], point["_init_from"]]
    f = tmp_path / "own.yaml"
    f.write_text(yaml.safe_dump(spec))
    _, runs, stages = S.plan_pipeline(None, str(f), sweep_dir=str(tmp_path / "sw"), launcher="local", quick=True)
    assert [r.group for r in runs] == ["L02-mlm-text-only", "L11-mlm-itm-mrckl-mrfr-wra", "L11-mlp-itm"]
    own = next(s for s in stages if s.key == "L11-mlp-itm_seed-0/pretrain")
    assert own.cfg.tasks.itm.head.type == "MLPITMHead" and "mrc_kl" in own.cfg.tasks


def test_the_subset_sweep_has_the_full_grids_points_and_stages():
    """table2_subset_tiny.yaml (the README's quicker subset) cannot drift from table2_tiny.yaml:
    the same points and downstream stages; only the pretraining budget differs."""
    import yaml

    sweeps = os.path.join(ROOT, "configs", "uniter", "sweeps")
    full = yaml.safe_load(open(os.path.join(sweeps, "table2_tiny.yaml")))
    sub = yaml.safe_load(open(os.path.join(sweeps, "table2_subset_tiny.yaml")))
    by_name = {p["_name"]: {k: v for k, v in p.items() if k != "_vs"} for p in full["points"]}
    assert [p["_name"] for p in sub["points"]] == ["L01_none", "L02_mlm_text_only", "L05_mlm", "L06_mlm_itm",
                                                   "L11_mlm_itm_mrckl_mrfr_wra"]
    assert all(p == by_name[p["_name"]] for p in sub["points"])
    assert sub["pipeline"] == full["pipeline"] and sub["seeds"] == full["seeds"]
    differ = {k for k in set(sub["overrides"]) | set(full["overrides"]) if sub["overrides"].get(k) != full["overrides"].get(k)}
    assert differ == {"train.max_steps", "train.val_interval", "train.ckpt_interval", "train.phases"}


def test_init_from_chains_a_pretraining_to_an_earlier_points_checkpoint(tmp_path):
    l02 = os.path.join(CONFIGS, "ablations", "L02_mlm_text_only.yaml")
    l05 = os.path.join(CONFIGS, "ablations", "L05_mlm.yaml")
    f = _sweep_file(tmp_path / "s.yaml", [{"_name": "text", "_config": l02},
                                          {"_name": "vl", "_config": l05, "_init_from": "text"}])
    spec = yaml.safe_load(open(f))
    spec["seeds"] = [0, 1]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    sweep_dir, runs, stages = S.plan_pipeline(None, f, sweep_dir=str(tmp_path / "sw"), launcher="local")
    by_key = {s.key: s for s in stages}
    for seed in (0, 1):
        src, pre = by_key[f"text_seed-{seed}/pretrain"], by_key[f"vl_seed-{seed}/pretrain"]
        assert src.after is None and not src.cfg.train.get("init_from")
        assert pre.after == src.work_dir and not pre.downstream  # same seed's source, and still a pretraining
        assert pre.cfg.train.init_from == os.path.join(src.work_dir, "checkpoints", "ckpt_0000004.pt")
        assert by_key[f"vl_seed-{seed}/vqa"].after == pre.work_dir
    # A source that is not listed before, or not at all, is refused naming the point.
    for points, match in (([{"_name": "vl", "_config": l05, "_init_from": "text"}, {"_name": "text", "_config": l02}],
                           "vl_seed-0: _init_from: 'text' names no point listed before it"),
                          ([{"_name": "vl", "_config": l05, "_init_from": "nope"}], "'nope' names no point")):
        g = _sweep_file(tmp_path / "bad.yaml", points)
        with pytest.raises(ConfigError, match=match):
            S.plan_pipeline(None, g, sweep_dir=str(tmp_path / "sw2"), launcher="local")
    # A plain (non-pipeline) sweep cannot honour it: refused, not ignored.
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"points": [{"_name": "a", "_config": l05},
                                                {"_name": "b", "_config": l05, "_init_from": "a"}], "seeds": [0]}))
    with pytest.raises(ConfigError, match="_init_from starts a pretraining from another point's"):
        S.plan(None, str(plain), sweep_dir=str(tmp_path / "sw3"), launcher="local")


@pytest.mark.slow
def test_local_pipeline_init_from_starts_from_the_sources_weights(tmp_path, synth_cache, capsys):
    import torch

    l02 = os.path.join(CONFIGS, "ablations", "L02_mlm_text_only.yaml")
    l05 = os.path.join(CONFIGS, "ablations", "L05_mlm.yaml")
    f = _sweep_file(tmp_path / "s.yaml", [{"_name": "text", "_config": l02},
                                          {"_name": "vl", "_config": l05, "_init_from": "text", "train.lr": 0.0}],
                    stages=("vqa",))
    out_dir = tmp_path / "sw"
    assert _tool("sweep")([f, "--local", "--sweep-dir", str(out_dir), *_tiny(synth_cache)]) == 0
    assert "4/4 stages finished" in capsys.readouterr().out
    src = torch.load(out_dir / "text_seed-0" / "pretrain" / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    dst = torch.load(out_dir / "vl_seed-0" / "pretrain" / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    # lr 0: the second pretraining leaves the weights it started from unchanged (the MLM head included)
    shared = [k for k in src["model"] if k in dst["model"]]
    assert len(shared) > 20 and any("text_embed" in k for k in shared)
    for k in shared:
        assert torch.equal(src["model"][k], dst["model"][k]), k
