"""Sweeps: a grid and explicit points over any config keys, times seeds, as ONE SLURM job array
(or one run after another here), one run folder per point, and a results table with spread.

A sweep file::

    grid:                                  # every combination of these values
      tasks.mlm.masker: [{type: conditional}, {type: joint}]
      tasks.itm.ot_solver: [{type: ipot}, {type: sinkhorn, epsilon: 0.05}]
    points:                                # explicit points, each crossed with the grid
      - {train.lr: 1.0e-4}
      - {_name: fast, train.lr: 1.0e-3}    # _name: the folder name of this point's part
    seeds: [0, 1, 2]                       # each point once per seed (the key `seed`)

Run folders are ``<sweep dir>/<name>`` with the name built from the swept values
(``masker-joint_ot_solver-sinkhorn_seed-1``); ``sweep.json`` in the sweep dir lists the runs.
Launching again skips runs that finished (``done.json`` for the same ``max_steps``) and runs
still in the queue; failed or preempted ones run again and resume from their last checkpoint.

Pipeline sweeps (the paper's Table 2: pretrain, then finetune and evaluate downstream)::

    config: ../pretrain_tiny_synth.yaml    # base config of every point (paths: from this file's folder);
                                           # CONFIG on the command line replaces it
    overrides: {train.max_steps: 300}      # every point's PRETRAINING stage (not in folder names)
    points:
      - {_name: L01, _config: ../ablations/L01_none.yaml, train.max_steps: 0,   # _config: this point's base
         _line: 1, _data: None, _tasks: None,                                   # labels of the table
         _paper: {Meta-Sum: 314.34, VQA: 67.03, IR: 61.74, TR: 65.55, NLVR2: 51.02, RE: 68.73}}
      - {_name: L03, _config: ../ablations/L03_mrfr.yaml, _init_from: L02}      # pretraining starts from
                                           # L02's final pretraining checkpoint, same seed (listed before)
    seeds: [0, 1, 2]
    pipeline:                              # downstream stages of every point, from its final checkpoint
      - {name: vqa, config: ../finetune_vqa_tiny_synth.yaml, overrides: {train.max_steps: 150}}
    quick:                                 # --quick: a few points, fewer seeds and steps (CI)
      points: [L01]
      seeds: [0]
      overrides: {train.max_steps: 20}     # after `overrides`, before the point's own values
      stage_overrides: {train.max_steps: 10}  # every downstream stage, after its own overrides

Each point (x seed) runs ``pretrain`` into ``<sweep dir>/<name>/pretrain`` and then every pipeline
stage into ``<sweep dir>/<name>/<stage>`` with ``train.init_from`` = the pretraining's final
checkpoint (``checkpoints/ckpt_<max_steps>.pt``; with ``train.max_steps: 0`` the trainer saves the
seed's initialisation as step 0, so a "no pretraining" line finetunes from that) and the point's
seed. A point with ``_init_from: NAME`` pretrains from point NAME's final pretraining
checkpoint of the same seed (the paper initialises L3-L14 with L2's weights), after it: on SLURM
its pretraining job depends on NAME's. Key=value on the command line apply to every stage. On SLURM every stage is its own job; a
downstream stage waits on its pretraining job (``--dependency=afterok:<id>``) and is cancelled by
SLURM when that job fails (``--kill-on-invalid-dep=yes``), so nothing waits forever. ``--local``
runs the stages here in order; a failed pretraining marks its stages "not run" and the next point
goes on. Each stage is skipped when done (``done.json`` for the same ``max_steps``, and for a
downstream stage its ``metrics.json``), resumes from its last checkpoint otherwise.

The evaluation of a downstream stage is its finetune run's final validation (at ``max_steps``, on
``data.val``; the final checkpoint holds exactly those weights): the stage writes it as
``metrics.json`` in the format of tools/test.py, with the protocol (checkpoint, step, split, the
pretraining checkpoint it started from). ``collect`` makes the Table 2 layout from these.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlframe.config import ConfigError
from vlframe.engine.evaluate import META_SUM
from vlframe.io import atomic_write
from vlframe.launch.job import METRICS_FILE, STAGE_METRICS, final_checkpoint, read_done, write_stage_metrics
from vlframe.launch.preflight import prepare

SWEEP_KEYS = ("config", "overrides", "grid", "points", "seeds", "pipeline", "quick")
SWEEP_FILE = "sweep.json"
NAME_KEY = "_name"
CONFIG_KEY = "_config"
#: Keys of a point that are not config overrides: its folder name, base config, table labels.
INIT_KEY = "_init_from"
META_KEYS = (NAME_KEY, CONFIG_KEY, INIT_KEY, "_line", "_data", "_tasks", "_paper", "_vs")
PRETRAIN = "pretrain"  # the stage folder of a pipeline point's pretraining


@dataclass
class Run:
    name: str  # run folder name (includes the seed)
    group: str  # the point without its seed: the row of the results table
    values: dict[str, Any]  # swept key -> value (seed excluded)
    seed: int | None
    overrides: list[str] = field(default_factory=list)  # key=value, as on a command line
    config: str | None = None  # the point's own base config (``_config``), else the sweep's
    meta: dict[str, Any] = field(default_factory=dict)  # line, data, tasks, paper (from _line, ...)


def _overrides_map(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict) or any(str(k).startswith("_") for k in value):
        raise ConfigError(f"{where}: expected a mapping of config key -> value")
    return [f"{k}={json.dumps(v)}" for k, v in value.items()]


def read_sweep_file(path: str | os.PathLike, *, quick: bool = False) -> dict[str, Any]:
    """The checked sweep file; config paths in it resolved from its folder. ``quick``: its
    ``quick:`` section applied (those points, those seeds, its overrides after the others)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid: expected a mapping of config key -> non-empty list of values")
    points = spec.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{path}: points: expected a list of mappings (config key -> value)")
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers")
    if "seed" in grid or any("seed" in p for p in points):
        raise ConfigError(f"{path}: sweep the key 'seed' with seeds: [...] (the table averages over it)")
    if not grid and not points and seeds is None:
        raise ConfigError(f"{path}: nothing to sweep (give grid, points or seeds)")
    here = path.resolve().parent

    def resolve(where: str, p: Any) -> str:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{path}: {where}: expected a config file path")
        full = p if os.path.isabs(p) else str(here / p)
        if not os.path.isfile(full):
            raise ConfigError(f"{path}: {where}: config file not found: {full}")
        return os.path.normpath(full)

    config = resolve("config", spec["config"]) if spec.get("config") is not None else None
    points = [dict(p, **({CONFIG_KEY: resolve(f"points[{i}].{CONFIG_KEY}", p[CONFIG_KEY])} if CONFIG_KEY in p else {}))
              for i, p in enumerate(points)]
    pipeline: list[dict[str, Any]] = []
    for i, st in enumerate(spec.get("pipeline") or []):
        where = f"pipeline[{i}]"
        if not isinstance(st, dict) or set(st) - {"name", "config", "overrides"} or "name" not in st or "config" not in st:
            raise ConfigError(f"{path}: {where}: expected {{name, config, overrides}}")
        name = str(st["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == PRETRAIN:
            raise ConfigError(f"{path}: {where}.name: {name!r} is not a folder-safe stage name (nor '{PRETRAIN}')")
        if name in {s["name"] for s in pipeline}:
            raise ConfigError(f"{path}: {where}.name: stage {name!r} appears twice")
        pipeline.append({"name": name, "config": resolve(f"{where}.config", st["config"]),
                         "overrides": _overrides_map(f"{path}: {where}.overrides", st.get("overrides"))})
    out = {"grid": grid, "points": points, "seeds": seeds, "config": config, "pipeline": pipeline,
           "overrides": _overrides_map(f"{path}: overrides", spec.get("overrides")), "stage_overrides": []}
    q = spec.get("quick")
    if q is not None and (not isinstance(q, dict) or set(q) - {"points", "seeds", "overrides", "stage_overrides"}):
        raise ConfigError(f"{path}: quick: expected a mapping with points, seeds, overrides, stage_overrides")
    if quick:
        if q is None:
            raise ConfigError(f"{path}: --quick: the sweep file has no quick: section")
        if q.get("points") is not None:
            names = [p.get(NAME_KEY) for p in points]
            unknown = [n for n in q["points"] if n not in names]
            if unknown:
                raise ConfigError(f"{path}: quick.points: {unknown} name no point's {NAME_KEY}")
            out["points"] = [p for p in points if p.get(NAME_KEY) in q["points"]]
        if q.get("seeds") is not None:
            if not (isinstance(q["seeds"], list) and q["seeds"] and all(type(s) is int for s in q["seeds"])):
                raise ConfigError(f"{path}: quick.seeds: expected a non-empty list of integers")
            out["seeds"] = q["seeds"]
        out["overrides"] += _overrides_map(f"{path}: quick.overrides", q.get("overrides"))
        out["stage_overrides"] = _overrides_map(f"{path}: quick.stage_overrides", q.get("stage_overrides"))
    return out


def _text(value: Any) -> str:
    """A short, folder-safe rendering of a swept value."""
    if isinstance(value, Mapping):
        rest = [f"{k}{_text(v)}" for k, v in value.items() if k != "type"]
        parts = ([str(value["type"])] if "type" in value else []) + rest
        text = "-".join(parts)
    elif isinstance(value, (list, tuple)):
        text = "+".join(_text(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _value_names(values: Sequence[Any]) -> dict[str, str]:
    """Name of each value of one swept key: a component node by its ``type`` alone where that
    tells the values apart, else in full."""
    brief = [_text(v["type"]) if isinstance(v, Mapping) and "type" in v else _text(v) for v in values]
    full = [_text(v) for v in values]
    distinct = {json.dumps(v, sort_keys=True) for v in values}
    names = brief if len(set(brief)) == len(distinct) else full
    return {json.dumps(v, sort_keys=True): n for v, n in zip(values, names, strict=True)}


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest suffix that no other swept key shares."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != key and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[key] = short
    return out


def expand(spec: Mapping[str, Any]) -> list[Run]:
    """Every run of a sweep: explicit points x grid combinations x seeds."""
    grid = spec["grid"]
    combos = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())] if grid else [{}]
    explicit = spec["points"] or [{}]
    keys = list(dict.fromkeys([k for p in explicit for k in p if k not in META_KEYS] + list(grid)))
    short = _short_keys(keys)
    seen_values: dict[str, list[Any]] = {k: [] for k in keys}
    for k, v in [*((k, v) for p in explicit for k, v in p.items() if k not in META_KEYS),
                 *((k, v) for k, vs in grid.items() for v in vs)]:
        seen_values[k].append(v)
    vnames = {k: _value_names(vs) for k, vs in seen_values.items()}

    def part(k: str, v: Any) -> str:
        return f"{short[k]}-{vnames[k][json.dumps(v, sort_keys=True)]}"

    runs: list[Run] = []
    for point in explicit:
        own = {k: v for k, v in point.items() if k not in META_KEYS}
        meta = {k[1:]: v for k, v in point.items() if k in META_KEYS and k not in (NAME_KEY, CONFIG_KEY)}
        for combo in combos:
            clash = sorted(set(own) & set(combo))
            if clash:
                raise ConfigError(f"sweep: key(s) {clash} are both in grid and in a point; give each key one place")
            values = own | combo
            parts = [_text(point[NAME_KEY])] if NAME_KEY in point else [part(k, v) for k, v in own.items()]
            parts += [part(k, v) for k, v in combo.items()]
            group = "_".join(parts) or "base"
            overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]
            for seed in spec["seeds"] or [None]:
                name = group if seed is None else f"{group}_seed-{seed}"
                extra = [] if seed is None else [f"seed={seed}"]
                runs.append(Run(name=name, group=group, values=values, seed=seed, overrides=overrides + extra,
                                config=point.get(CONFIG_KEY), meta=meta))
    seen: dict[str, Run] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f"sweep: two points get the folder name {r.name!r} ({seen[r.name].values} and "
                              f"{r.values}); give explicit points a {NAME_KEY}")
        seen[r.name] = r
    return runs


def default_sweep_dir(sweep_path: str | os.PathLike) -> str:
    return os.path.join("work_dirs", "sweeps", Path(sweep_path).stem)


def run_status(cfg: Any, work_dir: str) -> str:
    """finished | queued | todo (new, failed or preempted: it runs and resumes)."""
    from vlframe.launch import slurm

    done = read_done(work_dir)
    if done is not None and int(done.get("max_steps", -1)) == int(cfg.train.max_steps):
        return "finished"
    if slurm.is_active(slurm.read_job_record(work_dir)):
        return "queued"
    return "todo"


def _base_config(run: Run, config_path: str | None, spec: Mapping[str, Any]) -> str:
    path = run.config or config_path or spec["config"]
    if path is None:
        raise ConfigError(f"sweep point {run.name}: no config (CONFIG on the command line, config: in the sweep "
                          f"file or {CONFIG_KEY} in the point)")
    return path


def default_dir(sweep_path: str | os.PathLike, sweep_dir: str | None, *, quick: bool) -> str:
    return os.path.abspath(sweep_dir or (default_sweep_dir(sweep_path) + ("_quick" if quick else "")))


def plan(config_path: str | None, sweep_path: str, *, sweep_dir: str | None = None, overrides: Sequence[str] = (),
         launcher: str = "slurm", quick: bool = False) -> tuple[str, list[tuple[Run, Any, str, str]]]:
    """Expand and CHECK every run (config, components, data paths) before anything starts.

    Returns the sweep dir and ``(run, config, run folder, status)`` per run."""
    spec = read_sweep_file(sweep_path, quick=quick)
    runs = expand(spec)
    starts = sorted({r.group for r in runs if "init_from" in r.meta})
    if starts:
        raise ConfigError(f"{sweep_path}: point(s) {starts}: {INIT_KEY} starts a pretraining from another point's, "
                          "which only a pipeline sweep (pipeline:) runs")
    sweep_dir = default_dir(sweep_path, sweep_dir, quick=quick)
    planned = []
    for run in runs:
        try:
            cfg = prepare(_base_config(run, config_path, spec),
                          [*overrides, *spec["overrides"], *run.overrides, f"launcher={launcher}"])
        except (ConfigError, FileNotFoundError, KeyError, TypeError, ImportError) as e:
            raise ConfigError(f"sweep point {run.name}: {e}") from e
        work_dir = os.path.join(sweep_dir, run.name)
        cfg.work_dir = work_dir
        planned.append((run, cfg, work_dir, run_status(cfg, work_dir)))
    return sweep_dir, planned


def _write_manifest(sweep_dir: str, config_path: str | None, sweep_path: str, planned, *, quick: bool = False,
                    stages: Sequence[str] = ()) -> None:
    spec = read_sweep_file(sweep_path, quick=quick)
    manifest = {
        "config": os.path.abspath(config_path) if config_path else spec["config"],
        "pipeline": list(stages),  # downstream stage names (empty: one run per point)
        "sweep_file": os.path.abspath(sweep_path),
        "keys": list(dict.fromkeys(k for run, *_ in planned for k in run.values)),
        "seeds": spec["seeds"],
        "runs": [{"name": r.name, "group": r.group, "values": r.values, "seed": r.seed, "overrides": r.overrides,
                  "meta": r.meta} for r, *_ in planned],
    }
    os.makedirs(sweep_dir, exist_ok=True)
    atomic_write(os.path.join(sweep_dir, SWEEP_FILE), lambda f: json.dump(manifest, f, indent=1), binary=False)


def launch_sweep(config_path: str | None, sweep_path: str, *, sweep_dir: str | None = None,
                 overrides: Sequence[str] = (), local: bool = False, dry_run: bool = False, quick: bool = False,
                 wait: bool = False, echo=print) -> dict[str, Any]:
    """Check every run, then submit the ones to do as one job array (or run them here in turn).
    A sweep file with ``pipeline:`` goes to :func:`launch_pipeline`.

    Returns ``{"sweep_dir", "status": {name: status}, "submitted": [job ids], "failed": [names]}``."""
    if read_sweep_file(sweep_path, quick=quick)["pipeline"]:
        return launch_pipeline(config_path, sweep_path, sweep_dir=sweep_dir, overrides=overrides, local=local,
                               dry_run=dry_run, quick=quick, wait=wait, echo=echo)
    sweep_dir, planned = plan(config_path, sweep_path, sweep_dir=sweep_dir, overrides=overrides,
                              launcher="local" if local else "slurm", quick=quick)
    todo = [(run, cfg, wd) for run, cfg, wd, status in planned if status == "todo"]
    width = max(len(r.name) for r, *_ in planned)
    for run, _, _, status in planned:
        echo(f"{run.name:<{width}}  {status:<8}  {' '.join(run.overrides)}")
    out: dict[str, Any] = {"sweep_dir": sweep_dir, "status": {r.name: s for r, _, _, s in planned},
                           "submitted": [], "failed": []}
    if dry_run:
        echo(f"# {len(planned)} runs, {len(todo)} to run; sweep dir {sweep_dir} (dry run: nothing started)")
        return out
    _write_manifest(sweep_dir, config_path, sweep_path, planned, quick=quick)
    if not todo:
        echo(f"# nothing to run: every run is finished or queued ({sweep_dir})")
        return out
    if local:
        import logging

        from vlframe.launch.job import run_training

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        for run, cfg, wd in todo:
            echo(f"# running {run.name}")
            try:
                run_training(cfg, wd)
            except Exception as e:  # noqa: BLE001 - one failed point must not stop the others; reported
                echo(f"# {run.name} FAILED: {type(e).__name__}: {e}")
                out["failed"].append(run.name)
        return out
    from vlframe.launch import slurm

    jobs = slurm.submit_array([(cfg, wd) for _, cfg, wd in todo], os.path.join(sweep_dir, slurm.SLURM_SUBDIR, "%j"),
                              job_name=os.path.basename(sweep_dir))
    out["submitted"] = [str(j.job_id) for j in jobs]
    echo(f"# submitted {len(jobs)} runs as job array {str(jobs[0].job_id).split('_')[0]}; logs in "
         f"{os.path.join(sweep_dir, slurm.SLURM_SUBDIR)}")
    if wait:
        wait_for_jobs(out["submitted"])
        for run, cfg, wd in todo:
            out["status"][run.name] = run_status(cfg, wd)
            if out["status"][run.name] != "finished":
                out["failed"].append(run.name)
                echo(f"# {run.name} FAILED (logs in {os.path.join(sweep_dir, slurm.SLURM_SUBDIR)})")
    return out


# ----------------------------------------------------------------------------- pipelines


@dataclass
class Stage:
    run: Run
    name: str  # PRETRAIN or a pipeline stage's name
    cfg: Any
    work_dir: str
    after: str | None  # the run folder of the stage it starts from (a pretraining: None, or the
    # pretraining of the point named by its _init_from)
    status: str = "todo"

    @property
    def downstream(self) -> bool:
        return self.name != PRETRAIN

    @property
    def key(self) -> str:
        return f"{self.run.name}/{self.name}"


def stage_status(stage: Stage) -> str:
    """finished | queued | failed (ran, left no result) | todo (never started here)."""
    from vlframe.launch import slurm

    done = read_done(stage.work_dir)
    if (done is not None and int(done.get("max_steps", -1)) == int(stage.cfg.train.max_steps)
            and (not stage.downstream or os.path.isfile(os.path.join(stage.work_dir, STAGE_METRICS)))):
        return "finished"
    job = slurm.read_job_record(stage.work_dir)
    if slurm.is_active(job):
        return "queued"
    return "failed" if job is not None or os.path.isfile(os.path.join(stage.work_dir, LOCAL_LOG)) else "todo"


LOCAL_LOG = "stage.log"  # what a --local stage logs (a SLURM stage logs into slurm/<job id>/)


def stage_log(stage: Stage) -> str:
    """Where the stage's log is: its submitit ``.err`` file on SLURM, ``stage.log`` with --local."""
    from vlframe.launch import slurm

    job = slurm.read_job_record(stage.work_dir)
    if job is not None:
        return os.path.join(stage.work_dir, slurm.SLURM_SUBDIR, job, f"{job}_0_log.err")
    return os.path.join(stage.work_dir, LOCAL_LOG)


def plan_pipeline(config_path: str | None, sweep_path: str, *, sweep_dir: str | None = None,
                  overrides: Sequence[str] = (), launcher: str = "slurm", quick: bool = False,
                  ) -> tuple[str, list[Run], list[Stage]]:
    """Every stage of a pipeline sweep, CHECKED (configs, components, data paths) before anything
    starts: per run its pretraining, then each pipeline stage from that pretraining's final
    checkpoint (the checkpoint need not exist yet: it is checked when the stage starts)."""
    spec = read_sweep_file(sweep_path, quick=quick)
    runs = expand(spec)
    sweep_dir = default_dir(sweep_path, sweep_dir, quick=quick)
    stages: list[Stage] = []
    pretrain_of: dict[tuple[str, int | None], Stage] = {}  # (point, seed) -> its pretraining stage
    for run in runs:
        pre_dir = os.path.join(sweep_dir, run.name, PRETRAIN)
        source = run.meta.get("init_from")
        after = None
        extra = []
        if source is not None:
            # The paper's protocol (Table 2: L3-L14 start from L2's weights): this point's
            # pretraining starts from another point's final pretraining checkpoint, same seed.
            src = pretrain_of.get((_text(source), run.seed))
            if src is None:
                names = sorted({g for g, _ in pretrain_of})
                raise ConfigError(f"sweep point {run.name}: {INIT_KEY}: {source!r} names no point listed before it "
                                  f"(a point starts from one that comes earlier in points:; earlier: {names})")
            after = src.work_dir
            extra = ["train.init_from=null"]  # set below: the checkpoint need not exist yet
        try:
            cfg = prepare(_base_config(run, config_path, spec),
                          [*overrides, *spec["overrides"], *run.overrides, f"launcher={launcher}", *extra])
        except (ConfigError, FileNotFoundError, KeyError, TypeError, ImportError) as e:
            raise ConfigError(f"sweep point {run.name} ({PRETRAIN}): {e}") from e
        if source is not None:
            cfg.train.init_from = final_checkpoint(src.work_dir, int(src.cfg.train.max_steps))
        cfg.work_dir = pre_dir
        pre = Stage(run=run, name=PRETRAIN, cfg=cfg, work_dir=pre_dir, after=after)
        stages.append(pre)
        pretrain_of[(run.group, run.seed)] = pre
        init = final_checkpoint(pre_dir, int(cfg.train.max_steps))
        seed = [] if run.seed is None else [f"seed={run.seed}"]
        for st in spec["pipeline"]:
            wd = os.path.join(sweep_dir, run.name, st["name"])
            try:
                scfg = prepare(st["config"], [*overrides, *st["overrides"], *spec["stage_overrides"], *seed,
                                              f"launcher={launcher}", "train.init_from=null"])
            except (ConfigError, FileNotFoundError, KeyError, TypeError, ImportError) as e:
                raise ConfigError(f"sweep point {run.name}, stage {st['name']}: {e}") from e
            scfg.train.init_from = init
            scfg.work_dir = wd
            stages.append(Stage(run=run, name=st["name"], cfg=scfg, work_dir=wd, after=pre_dir))
    for stage in stages:
        stage.status = stage_status(stage)
    return sweep_dir, runs, stages


def _run_stage_here(stage: Stage) -> None:
    """One stage in this process, its log also in ``stage.log`` (the report points at it)."""
    import logging
    import traceback

    from vlframe.launch.job import run_training

    os.makedirs(stage.work_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(stage.work_dir, LOCAL_LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("vlframe")
    logger.addHandler(handler)
    try:
        logger.info("stage %s starts", stage.key)
        metrics = run_training(stage.cfg, stage.work_dir)
        if stage.downstream:
            write_stage_metrics(stage.cfg, stage.work_dir, metrics)
        logger.info("stage %s finished", stage.key)  # the stage's end (benchmarks/bench_sweep_stages.py)
    except Exception:
        logger.error("stage %s failed:\n%s", stage.key, traceback.format_exc())
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def report(stages: Sequence[Stage], echo=print) -> dict[str, list[str]]:
    """Print each stage that did not finish (failed: its log; not run: the stage it waited on);
    returns ``{"finished", "failed", "not_run", "queued"}`` lists of stage keys."""
    by_dir = {s.work_dir: s for s in stages}
    out: dict[str, list[str]] = {"finished": [], "failed": [], "not_run": [], "queued": []}
    for s in stages:
        dep = by_dir.get(s.after) if s.after else None
        if s.status == "finished":
            out["finished"].append(s.key)
        elif s.status == "queued":
            out["queued"].append(s.key)
        elif dep is not None and dep.status != "finished":
            out["not_run"].append(s.key)
            echo(f"# {s.key}: not run ({dep.key} {dep.status})")
        else:
            out["failed"].append(s.key)
            echo(f"# {s.key}: FAILED, log: {stage_log(s)}")
    echo(f"# {len(out['finished'])}/{len(stages)} stages finished, {len(out['failed'])} failed, "
         f"{len(out['not_run'])} not run, {len(out['queued'])} queued")
    return out


def wait_for_jobs(job_ids: Sequence[str], *, poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    """Until none of ``job_ids`` is in the queue any more (bounded by ``timeout_s``)."""
    import time

    from vlframe.launch import slurm

    start = time.time()
    pending = list(job_ids)
    while pending:
        pending = [j for j in pending if slurm.is_active(j)]
        if not pending:
            return
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"jobs {pending} still queued after {timeout_s:.0f} s")
        time.sleep(poll_s)


def launch_pipeline(config_path: str | None, sweep_path: str, *, sweep_dir: str | None = None,
                    overrides: Sequence[str] = (), local: bool = False, dry_run: bool = False,
                    quick: bool = False, wait: bool = False, echo=print) -> dict[str, Any]:
    """Check every stage, then submit those to do (downstream ones depending on their pretraining's
    job), or run them here in order. ``wait``: on SLURM, wait until the submitted jobs left the
    queue, then report. Returns ``{"sweep_dir", "status": {stage key: status}, "submitted": {stage
    key: job id}, "failed": [stage keys], "not_run": [stage keys]}``."""
    sweep_dir, runs, stages = plan_pipeline(config_path, sweep_path, sweep_dir=sweep_dir, overrides=overrides,
                                            launcher="local" if local else "slurm", quick=quick)
    width = max(len(s.key) for s in stages)
    for s in stages:
        echo(f"{s.key:<{width}}  {s.status:<8}  {' '.join(s.run.overrides) if not s.downstream else ''}".rstrip())
    out: dict[str, Any] = {"sweep_dir": sweep_dir, "status": {s.key: s.status for s in stages},
                           "submitted": {}, "failed": [], "not_run": []}
    todo = [s for s in stages if s.status in ("todo", "failed")]
    if dry_run:
        echo(f"# {len(runs)} points, {len(stages)} stages, {len(todo)} to run; sweep dir {sweep_dir} "
             "(dry run: nothing started)")
        return out
    _write_manifest(sweep_dir, config_path, sweep_path, [(r,) for r in runs], quick=quick,
                    stages=[s.name for s in stages if s.downstream and s.run is runs[0]])
    by_dir = {s.work_dir: s for s in stages}
    if local:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        for s in stages:
            dep = by_dir.get(s.after) if s.after else None
            if s.status == "finished" or (dep is not None and dep.status != "finished"):
                continue
            echo(f"# running {s.key}")
            try:
                _run_stage_here(s)
            except Exception as e:  # noqa: BLE001 - one failed stage must not stop the others; reported
                echo(f"# {s.key} FAILED: {type(e).__name__}: {e}")
            s.status = stage_status(s)
    else:
        from vlframe.launch import slurm

        # The pretrainings other points start from (_init_from) go first: a scheduler that starts
        # jobs in submission order (SLURM's default) then runs them before anything else instead
        # of leaving their dependants waiting at the end of the queue.
        sources = {s.after for s in stages if not s.downstream and s.after}
        todo = [s for s in todo if s.work_dir in sources] + [s for s in todo if s.work_dir not in sources]
        for s in todo:
            dep = by_dir.get(s.after) if s.after else None
            after = None
            if dep is not None and dep.status != "finished":
                after = slurm.read_job_record(dep.work_dir)  # queued now (or just submitted)
            job = slurm.submit_train(s.cfg, s.work_dir, after=after, evaluate=s.downstream,
                                     job_name=f"{os.path.basename(sweep_dir)}.{s.run.name}.{s.name}")
            out["submitted"][s.key] = str(job.job_id)
            s.status = "queued"
        echo(f"# submitted {len(out['submitted'])} stage jobs; logs in <stage folder>/{slurm.SLURM_SUBDIR}/<job id>/")
        if not wait:
            out["status"] = {s.key: s.status for s in stages}
            return out
        wait_for_jobs(list(out["submitted"].values()))
        for s in stages:
            s.status = stage_status(s)
    rep = report(stages, echo=echo)
    out["status"] = {s.key: s.status for s in stages}
    out["failed"], out["not_run"] = rep["failed"], rep["not_run"]
    return out


# ----------------------------------------------------------------------------- results


def final_metrics(work_dir: str) -> dict[str, float] | None:
    """The last validation record of a run's ``metrics.jsonl`` (``val/...`` keys), or None."""
    path = os.path.join(work_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                vals = {k: float(v) for k, v in rec.items() if k.startswith("val/")}
                if vals:
                    last = vals
    return last


def collect(sweep_dir: str) -> dict[str, Any]:
    """One row per point (seeds averaged: ``<metric> mean`` and ``<metric> std`` columns when the
    sweep has a seeds axis); a pipeline sweep gets the Table 2 layout (:func:`collect_pipeline`). Returns ``{"columns", "rows", "markdown", "csv"}`` and writes
    ``results.md`` and ``results.csv`` into ``sweep_dir``."""
    manifest_path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{manifest_path}: not a sweep folder (tools/sweep.py writes {SWEEP_FILE})")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("pipeline"):
        return collect_pipeline(sweep_dir, manifest)
    keys, with_seeds = manifest["keys"], manifest["seeds"] is not None
    groups: dict[str, dict[str, Any]] = {}
    for r in manifest["runs"]:
        g = groups.setdefault(r["group"], {"values": r["values"], "runs": 0, "finished": []})
        g["runs"] += 1
        done = read_done(os.path.join(sweep_dir, r["name"]))
        metrics = final_metrics(os.path.join(sweep_dir, r["name"])) if done is not None else None
        if metrics:
            g["finished"].append(metrics)
    names = sorted({m for g in groups.values() for run in g["finished"] for m in run})
    short = _short_keys(keys)
    columns = ["point", *(short[k] for k in keys), "runs"]
    for m in names:
        columns += [f"{m} mean", f"{m} std"] if with_seeds else [m]
    rows = []
    for group, g in groups.items():
        row: dict[str, Any] = {"point": group, **{short[k]: _text(g["values"].get(k, "")) for k in keys},
                               "runs": f"{len(g['finished'])}/{g['runs']}"}
        for m in names:
            vals = [run[m] for run in g["finished"] if m in run]
            mean = statistics.fmean(vals) if vals else math.nan
            if with_seeds:
                row[f"{m} mean"] = mean
                row[f"{m} std"] = statistics.stdev(vals) if len(vals) > 1 else math.nan  # sample std over seeds
            else:
                row[m] = mean
        rows.append(row)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    markdown = "\n".join(md) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if isinstance(v, float) and math.isnan(v) else v) for c, v in row.items()})
    atomic_write(os.path.join(sweep_dir, "results.md"), lambda f: f.write(markdown), binary=False)
    atomic_write(os.path.join(sweep_dir, "results.csv"), lambda f: f.write(buf.getvalue()), binary=False)
    return {"columns": columns, "rows": rows, "markdown": markdown, "csv": buf.getvalue()}


# ----------------------------------------------------------------------------- the Table 2 layout

TABLE2_ORDER = ("Meta-Sum", "VQA", "IR", "TR", "NLVR2", "RE")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) over seeds; NaN where undefined."""
    vals = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(vals) if vals else math.nan
    return mean, (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def combined_spread(sd_a: float, sd_b: float) -> float:
    """The spread of the difference of two lines' means: sqrt(sd_a^2 + sd_b^2) (seed sds)."""
    return math.sqrt(sd_a ** 2 + sd_b ** 2)


def beyond_noise(a: tuple[float, float], b: tuple[float, float]) -> bool | None:
    """Whether means a and b ((mean, sd) each) differ by more than twice their combined spread;
    None when a spread is unknown (one seed) or a mean is missing."""
    (ma, sa), (mb, sb) = a, b
    if any(math.isnan(x) for x in (ma, sa, mb, sb)):
        return None
    return abs(ma - mb) > 2.0 * combined_spread(sa, sb)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def table2_rows(groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The Table 2 layout from per-line seed scores. Each group: ``{"name", "meta": {line, data,
    tasks, paper, vs}, "seeds": [{column: value in %}], "runs": n}``. Returns ``{"rows", "columns",
    "markdown", "csv", "spearman", "n_spearman"}``; a cell is ``mean ± sd`` with ``*`` where it
    differs from the line it is compared with (``vs``, else the line above) by more than twice the
    combined spread sqrt(sd_a^2 + sd_b^2)."""
    stats: list[dict[str, tuple[float, float]]] = []
    for g in groups:
        stats.append({c: mean_sd([s[c] for s in g["seeds"] if c in s]) for c in TABLE2_ORDER})
    names = [g["name"] for g in groups]
    has_paper = any(g["meta"].get("paper") for g in groups)
    columns = ["line", "pretraining data", "tasks", "seeds", *TABLE2_ORDER, "Δ Meta-Sum", "vs"]
    if has_paper:
        columns += [f"paper {c}" for c in TABLE2_ORDER]
    rows: list[dict[str, Any]] = []
    for i, g in enumerate(groups):
        meta = g["meta"]
        vs = _text(meta["vs"]) if meta.get("vs") is not None else None  # a _name, folder-safe as the rows'
        if vs is not None and vs not in names:
            raise ConfigError(f"sweep point {g['name']}: _vs: {meta['vs']!r} names no point ({names})")
        j = names.index(vs) if vs is not None else i - 1
        row: dict[str, Any] = {"name": g["name"], "line": str(meta.get("line", g["name"])),
                               "pretraining data": str(meta.get("data", "")), "tasks": str(meta.get("tasks", "")),
                               "seeds": f"{sum(TABLE2_ORDER[0] in s for s in g['seeds'])}/{g['runs']}",
                               "vs": str(groups[j]["meta"].get("line", groups[j]["name"])) if j >= 0 else ""}
        for c in TABLE2_ORDER:
            row[c] = stats[i][c]
            row[f"{c} beyond noise"] = beyond_noise(stats[i][c], stats[j][c]) if j >= 0 else None
        row["Δ Meta-Sum"] = stats[i][META_SUM][0] - stats[j][META_SUM][0] if j >= 0 else math.nan
        paper = meta.get("paper") or {}
        for c in TABLE2_ORDER:
            row[f"paper {c}"] = float(paper[c]) if c in paper else math.nan
        rows.append(row)
    pairs = [(r[META_SUM][0], r[f"paper {META_SUM}"]) for r in rows
             if not math.isnan(r[META_SUM][0]) and not math.isnan(r[f"paper {META_SUM}"])]
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs])

    def num(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.2f}"

    def cell(r: Mapping[str, Any], c: str) -> str:
        if c in TABLE2_ORDER:
            m, s = r[c]
            if math.isnan(m):
                return ""
            return f"{m:.2f} ± {num(s) or '?'}" + (" *" if r[f"{c} beyond noise"] else "")
        if c == "Δ Meta-Sum":
            return "" if math.isnan(r[c]) else f"{r[c]:+.2f}"
        if c.startswith("paper "):
            return num(r[c])
        return str(r[c])

    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    md += ["", "mean ± sample sd over seeds (%); `*`: differs from the line in `vs` by more than twice the "
               "combined spread sqrt(sd_a² + sd_b²); IR/TR: mean of R@1, R@5, R@10; RE: detected regions."]
    baseline = baseline_check(rows)
    if baseline is not None:
        md.append(baseline["text"])
    if pairs:
        md.append(f"Spearman rank correlation of the Meta-Sum ordering with the paper's: {num(rho) or 'n/a'} "
                  f"over {len(pairs)} lines.")
    markdown = "\n".join(md) + "\n"
    buf = io.StringIO()
    csv_cols = ["line", "pretraining data", "tasks", "seeds"]
    for c in TABLE2_ORDER:
        csv_cols += [f"{c} mean", f"{c} sd", f"{c} beyond noise"]
    csv_cols += ["Δ Meta-Sum", "vs"] + ([f"paper {c}" for c in TABLE2_ORDER] if has_paper else [])
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_cols)
    for r in rows:
        out = [r["line"], r["pretraining data"], r["tasks"], r["seeds"]]
        for c in TABLE2_ORDER:
            bn = r[f"{c} beyond noise"]
            out += [num(r[c][0]), num(r[c][1]), "" if bn is None else str(bn).lower()]
        out += [num(r["Δ Meta-Sum"]), r["vs"]] + ([num(r[f"paper {c}"]) for c in TABLE2_ORDER] if has_paper else [])
        w.writerow(out)
    return {"rows": rows, "columns": columns, "markdown": markdown, "csv": buf.getvalue(),
            "spearman": rho, "n_spearman": len(pairs), "baseline": baseline}


def baseline_check(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The first row (Table 2's "no pretraining") against every other row on Meta-Sum: whether it
    is the lowest, and which rows lie above it by more than twice the combined spread (the
    comparative-baselines criterion; the `*` marks compare each row with its `vs` row only)."""
    done = [r for r in rows if not math.isnan(r[META_SUM][0])]
    if len(done) < 2 or done[0] is not rows[0]:
        return None
    base = rows[0]
    above, within, unknown = [], [], []
    for r in done[1:]:
        verdict = beyond_noise(r[META_SUM], base[META_SUM])
        if verdict is None:
            unknown.append(r["line"])
        elif verdict and r[META_SUM][0] > base[META_SUM][0]:
            above.append(r["line"])
        else:
            within.append(r["line"])
    lowest_row = min(done, key=lambda r: r[META_SUM][0])  # ties: the first row, the baseline
    lowest = lowest_row["line"]
    text = (f"Line {base['line']} against every other line (Meta-Sum): "
            f"{'the lowest' if lowest_row is base else f'not the lowest (line {lowest} is)'}; above it by more "
            f"than twice the combined spread: {', '.join(above) or 'none'}; not: {', '.join(within) or 'none'}"
            + (f"; spread unknown (one seed): {', '.join(unknown)}" if unknown else "") + ".")
    return {"line": base["line"], "lowest": lowest_row is base, "above": above, "within": within,
            "unknown": unknown, "text": text}


def plot_meta_sum(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Meta-Sum per line, mean with sd error bars (the paper's values on the right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["line"] for r in rows]
    means = [r[META_SUM][0] for r in rows]
    sds = [0.0 if math.isnan(r[META_SUM][1]) else r[META_SUM][1] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.0))
    xs = list(range(len(rows)))
    ax.errorbar(xs, means, yerr=sds, fmt="o", capsize=4, color="tab:blue", label="toy (mean ± sd over seeds)")
    ax.set_xticks(xs, labels, rotation=45, ha="right")
    ax.set_ylabel("Meta-Sum, toy (%)")
    ax.grid(axis="y", alpha=0.3)
    paper = [r.get(f"paper {META_SUM}", math.nan) for r in rows]
    if any(not math.isnan(p) for p in paper):
        ax2 = ax.twinx()
        ax2.plot(xs, paper, "x", color="tab:gray", label="paper (UNITER-base)")
        ax2.set_ylabel("Meta-Sum, paper (%)", color="tab:gray")
        fig.legend(loc="lower right", fontsize=8)
    ax.set_title("Table 2 at toy scale: Meta-Sum per line")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


TABLE2_FILES = ("table2.md", "table2.csv", "table2.png")


def collect_pipeline(sweep_dir: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The Table 2 layout of a pipeline sweep: per point (seeds averaged) the Table 2 columns of its
    downstream stages' metrics.json; writes table2.md, table2.csv and table2.png into ``sweep_dir``."""
    from vlframe.engine.evaluate import read_run, table2_scores

    groups: dict[str, dict[str, Any]] = {}
    for r in manifest["runs"]:
        g = groups.setdefault(r["group"], {"name": r["group"], "meta": r.get("meta") or {}, "seeds": [], "runs": 0})
        g["runs"] += 1
        scores: dict[str, float] = {}
        for stage in manifest["pipeline"]:
            wd = os.path.join(sweep_dir, r["name"], stage)
            if read_done(wd) is not None and os.path.isfile(os.path.join(wd, STAGE_METRICS)):
                scores.update(table2_scores(*read_run(wd)))
        scores.pop(META_SUM, None)
        if len(scores) == len(TABLE2_ORDER) - 1:
            scores[META_SUM] = sum(scores.values())
        g["seeds"].append(scores)
    table = table2_rows(list(groups.values()))
    md, cs, png = (os.path.join(sweep_dir, n) for n in TABLE2_FILES)
    atomic_write(md, lambda f: f.write(table["markdown"]), binary=False)
    atomic_write(cs, lambda f: f.write(table["csv"]), binary=False)
    table["png"] = plot_meta_sum(table["rows"], png)
    table["files"] = [md, cs, png]
    return table
