"""Where a run starts, decided before data and model are built: which checkpoint it resumes
from (and whether it may), which weight files it reads (checked now, so a bad path fails in a
second, not after the data has loaded), and what the run folder keeps of each start.

Refusals are one-line :class:`~vlframe.engine.checkpoint.CheckpointError` messages naming the
file or the differing config keys, with the ways out.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlframe.engine import checkpoint as ckpt
from vlframe.io import atomic_write

log = logging.getLogger("vlframe")

# Keys that may differ between the checkpoint's config and the resuming run's: they change how
# long the run goes, what it logs, validates, keeps and prints, or where it runs, not what it
# trains. Everything else (model, tasks, data, solver, schedule, seed, ...) must match.
SAFE_ON_RESUME: tuple[str, ...] = (
    "train.max_steps",
    "train.log_interval",
    "train.val_interval",
    "train.val_batches",
    "train.ckpt_interval",
    "train.keep_ckpts",
    "train.keep_best",
    "train.keep_best_mode",
    "train.progress",
    "train.resume",
    "train.resume_changed_config",
    "train.init_from",  # unused when resuming: the weights come from the checkpoint
    "train.device",
    "data.num_workers",
    "data.pin_memory",
    "data.val_batch_units",
    "data.*.cache_dir",  # where the synthetic world is cached, not what it holds
    "train.max_bad_steps",
    "work_dir",
    "launcher",  # where it runs: a run started here may continue as a SLURM job and back
    "slurm",
)


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") or fnmatchcase(key, s) for s in SAFE_ON_RESUME)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, minus :data:`SAFE_ON_RESUME`;
    a node present on one side only is named once (``tasks.itm``), not leaf by leaf."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}.{k}" if prefix else str(k)
        if _safe(key):
            continue
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, key))
        elif a != b:
            out.append(key)
    return out


_ABSENT = object()


def _node(cfg: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, Mapping) or part not in cfg:
            return _ABSENT
        cfg = cfg[part]
    return cfg


def _show(cfg: Mapping[str, Any], key: str) -> str:
    value = _node(cfg, key)
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StartPlan:
    """What :meth:`Trainer.train` does first: resume from ``path`` (its ``state`` already read), or
    start fresh (``path`` None), with ``init_from`` weights when set."""

    path: str | None = None
    state: dict | None = None


def check_weight_files(cfg: DictConfig, *, init_from: bool = True) -> None:
    """Every weights file the config names (``train.init_from`` unless ``init_from=False``,
    ``model.pretrained``) exists and reads as weights; raises CheckpointError naming the key and file."""
    path = cfg.train.get("init_from")
    if path and init_from:
        ckpt.check_file(str(path), what="train.init_from")
    model = cfg.get("model")
    pretrained = model.get("pretrained") if isinstance(model, (Mapping, DictConfig)) else None
    if pretrained:
        ckpt.check_file(str(pretrained), what="model.pretrained")


def plan_start(cfg: DictConfig, *, ckpt_dir: str, is_main: bool = True) -> StartPlan:
    """Decide the start of a run from ``train.resume``; refuse what must not be resumed."""
    tc = cfg.train
    resume = str(tc.resume)
    if is_main:
        ckpt.remove_orphans(ckpt_dir)
    check_weight_files(cfg, init_from=False)  # the model reads model.pretrained on every start
    if resume in ("never", "none", ""):
        check_weight_files(cfg)
        return StartPlan()
    if resume == "auto":
        found = ckpt.newest_good(ckpt_dir)
        if found is None:
            if ckpt.list_checkpoints(ckpt_dir):
                raise ckpt.CheckpointError(
                    f"train.resume=auto: {ckpt_dir} holds checkpoints but none is readable: "
                    f"{ckpt.unreadable_report(ckpt_dir)}; move them away, use a new --work-dir, or train.resume=never"
                )
            check_weight_files(cfg)
            return StartPlan()
        path, state = found
        _check_same_config(state, cfg, path)
    else:
        path = resume
        try:
            state = ckpt.load(path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"train.resume: {e}") from None
        if not ckpt.is_training_checkpoint(state):
            raise ckpt.CheckpointError(
                f"train.resume={path}: not a vlframe training checkpoint (no 'step'/'model'); to start from "
                f"its weights use train.init_from={path}"
            )
    if "optimizer" not in state:
        raise ckpt.CheckpointError(
            f"train.resume: {path} holds weights but no optimizer state (converted or exported weights?), so "
            f"training cannot continue from it; start from its weights with train.init_from={path} train.resume=never"
        )
    return StartPlan(path=path, state=state)


def _check_same_config(state: dict, cfg: DictConfig, path: str) -> None:
    saved = state.get("config")
    if not isinstance(saved, Mapping) or bool(cfg.train.get("resume_changed_config")):
        return
    now = OmegaConf.to_container(cfg, resolve=True)
    diff = config_differences(saved, now)
    if not diff:
        return
    shown = ", ".join(f"{k} (checkpoint {_show(saved, k)}, now {_show(now, k)})" for k in diff[:8])
    more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
    raise ckpt.CheckpointError(
        f"train.resume=auto: {path} was written by a different config: {shown}{more}; ways out: a new "
        f"--work-dir, train.resume=never (start over), or train.resume_changed_config=true (continue anyway)"
    )


def save_run_config(cfg: DictConfig, work_dir: str) -> str:
    """Write the config of this start as ``config.yaml``; the previous start's is kept as
    ``config.<n>.yaml`` (n = 1, 2, ... in order of starts)."""
    from vlframe.config import save_config

    path = os.path.join(work_dir, "config.yaml")
    if os.path.isfile(path):
        n = 1
        while os.path.exists(os.path.join(work_dir, f"config.{n}.yaml")):
            n += 1
        os.replace(path, os.path.join(work_dir, f"config.{n}.yaml"))
    save_config(cfg, path)
    return path


def truncate_metrics(path: str, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` logged after ``step`` (a resumed run logs them again);
    returns how many were dropped. A line that is not JSON (a kill mid-write) is dropped too."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                ok = int(rec["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok and line.endswith("\n"):
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        atomic_write(path, lambda f: f.write("".join(kept)), binary=False)
        log.info("metrics.jsonl: dropped %d line(s) logged after step %d", dropped, step)
    return dropped


def check_text_positions(model: Any, datasets: Mapping[str, Any]) -> None:
    """A dataset's ``max_text_len`` must fit the model's text positions (its spec's
    ``max_text_positions``, where the model has a limit); raises ConfigError naming the keys."""
    from vlframe.config import ConfigError

    positions = model.spec.max_text_positions
    if positions is None:
        return
    for where, ds in datasets.items():
        n = getattr(ds, "max_text_len", None)
        if n is not None and int(n) > int(positions):
            raise ConfigError(f"{where}.max_text_len={n} is above the model's {positions} text positions "
                              f"(positions beyond them have no embedding); lower {where}.max_text_len")
