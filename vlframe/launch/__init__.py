"""Launching runs: here (``launcher: local``) or as SLURM jobs through submitit (``launcher:
slurm`` with the ``slurm:`` section), one run or a sweep of them (:mod:`vlframe.launch.sweep`).

Every path checks the whole config and the input paths on this host first
(:mod:`vlframe.launch.preflight`), so an error never waits in a queue.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from vlframe.launch.job import TrainJob, run_training
from vlframe.launch.preflight import check_data_paths, prepare

__all__ = ["TrainJob", "check_data_paths", "launch", "one_line_error", "prepare", "run_training"]


def one_line_error(e: BaseException) -> bool:
    """Whether ``e`` is reported as one line (config, data and checkpoint errors, raised to be
    read) rather than with its traceback (anything raised inside a user's component, see
    ``registry.build``, unless it is one of vlframe's own error types or a missing file)."""
    from vlframe.config import ConfigError
    from vlframe.data.importers.common import DataFormatError
    from vlframe.engine.checkpoint import CheckpointError

    if getattr(e, "vlframe_component", None):
        return isinstance(e, (ConfigError, DataFormatError, CheckpointError, FileNotFoundError))
    return True


def launch(config_path: str, overrides: Sequence[str] = (), *, work_dir: str | None = None,
           dry_run: bool = False, echo=print) -> dict[str, Any]:
    """``tools/train.py``: check, then train here or submit. Returns ``{"metrics": ...}`` after a
    local run, ``{"job_id": ...}`` after a submission, ``{}`` for a dry run (what would run is echoed)."""
    from omegaconf import OmegaConf

    cfg = prepare(config_path, overrides)
    work_dir = work_dir or str(cfg.work_dir)
    if cfg.launcher == "slurm":
        from vlframe.launch import slurm

        if dry_run:
            echo(slurm.describe_submission(cfg, work_dir, job_name=os.path.basename(os.path.abspath(work_dir))))
            return {}
        job = slurm.submit_train(cfg, work_dir)
        echo(f"submitted job {job.job_id}; run folder {os.path.abspath(work_dir)}, "
             f"logs {os.path.join(os.path.abspath(work_dir), slurm.SLURM_SUBDIR)}")
        return {"job_id": str(job.job_id)}
    if dry_run:
        echo("# resolved config\n" + OmegaConf.to_yaml(cfg).rstrip())
        echo(f"# launcher: local; would train here into {os.path.abspath(work_dir)}")
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return {"metrics": run_training(cfg, work_dir)}
