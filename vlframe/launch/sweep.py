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
from vlframe.io import atomic_write
from vlframe.launch.job import METRICS_FILE, read_done
from vlframe.launch.preflight import prepare

SWEEP_KEYS = ("grid", "points", "seeds")
SWEEP_FILE = "sweep.json"
NAME_KEY = "_name"


@dataclass
class Run:
    name: str  # run folder name (includes the seed)
    group: str  # the point without its seed: the row of the results table
    values: dict[str, Any]  # swept key -> value (seed excluded)
    seed: int | None
    overrides: list[str] = field(default_factory=list)  # key=value, as on a command line


def read_sweep_file(path: str | os.PathLike) -> dict[str, Any]:
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
    return {"grid": grid, "points": points, "seeds": seeds}


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
    keys = list(dict.fromkeys([k for p in explicit for k in p if k != NAME_KEY] + list(grid)))
    short = _short_keys(keys)
    seen_values: dict[str, list[Any]] = {k: [] for k in keys}
    for k, v in [*((k, v) for p in explicit for k, v in p.items() if k != NAME_KEY),
                 *((k, v) for k, vs in grid.items() for v in vs)]:
        seen_values[k].append(v)
    vnames = {k: _value_names(vs) for k, vs in seen_values.items()}

    def part(k: str, v: Any) -> str:
        return f"{short[k]}-{vnames[k][json.dumps(v, sort_keys=True)]}"

    runs: list[Run] = []
    for point in explicit:
        own = {k: v for k, v in point.items() if k != NAME_KEY}
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
                runs.append(Run(name=name, group=group, values=values, seed=seed, overrides=overrides + extra))
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


def plan(config_path: str, sweep_path: str, *, sweep_dir: str | None = None, overrides: Sequence[str] = (),
         launcher: str = "slurm") -> tuple[str, list[tuple[Run, Any, str, str]]]:
    """Expand and CHECK every run (config, components, data paths) before anything starts.

    Returns the sweep dir and ``(run, config, run folder, status)`` per run."""
    runs = expand(read_sweep_file(sweep_path))
    sweep_dir = os.path.abspath(sweep_dir or default_sweep_dir(sweep_path))
    planned = []
    for run in runs:
        try:
            cfg = prepare(config_path, [*overrides, *run.overrides, f"launcher={launcher}"])
        except (ConfigError, FileNotFoundError, KeyError, TypeError, ImportError) as e:
            raise ConfigError(f"sweep point {run.name}: {e}") from e
        work_dir = os.path.join(sweep_dir, run.name)
        cfg.work_dir = work_dir
        planned.append((run, cfg, work_dir, run_status(cfg, work_dir)))
    return sweep_dir, planned


def _write_manifest(sweep_dir: str, config_path: str, sweep_path: str, planned) -> None:
    spec = read_sweep_file(sweep_path)
    manifest = {
        "config": os.path.abspath(config_path),
        "sweep_file": os.path.abspath(sweep_path),
        "keys": list(dict.fromkeys(k for run, *_ in planned for k in run.values)),
        "seeds": spec["seeds"],
        "runs": [{"name": r.name, "group": r.group, "values": r.values, "seed": r.seed, "overrides": r.overrides}
                 for r, *_ in planned],
    }
    os.makedirs(sweep_dir, exist_ok=True)
    atomic_write(os.path.join(sweep_dir, SWEEP_FILE), lambda f: json.dump(manifest, f, indent=1), binary=False)


def launch_sweep(config_path: str, sweep_path: str, *, sweep_dir: str | None = None, overrides: Sequence[str] = (),
                 local: bool = False, dry_run: bool = False, echo=print) -> dict[str, Any]:
    """Check every run, then submit the ones to do as one job array (or run them here in turn).

    Returns ``{"sweep_dir", "status": {name: status}, "submitted": [job ids], "failed": [names]}``."""
    sweep_dir, planned = plan(config_path, sweep_path, sweep_dir=sweep_dir, overrides=overrides,
                              launcher="local" if local else "slurm")
    todo = [(run, cfg, wd) for run, cfg, wd, status in planned if status == "todo"]
    width = max(len(r.name) for r, *_ in planned)
    for run, _, _, status in planned:
        echo(f"{run.name:<{width}}  {status:<8}  {' '.join(run.overrides)}")
    out: dict[str, Any] = {"sweep_dir": sweep_dir, "status": {r.name: s for r, _, _, s in planned},
                           "submitted": [], "failed": []}
    if dry_run:
        echo(f"# {len(planned)} runs, {len(todo)} to run; sweep dir {sweep_dir} (dry run: nothing started)")
        return out
    _write_manifest(sweep_dir, config_path, sweep_path, planned)
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
    sweep has a seeds axis). Returns ``{"columns", "rows", "markdown", "csv"}`` and writes
    ``results.md`` and ``results.csv`` into ``sweep_dir``."""
    manifest_path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{manifest_path}: not a sweep folder (tools/sweep.py writes {SWEEP_FILE})")
    with open(manifest_path) as f:
        manifest = json.load(f)
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
