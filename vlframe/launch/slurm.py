"""SLURM through submitit: the ``slurm:`` section as sbatch parameters, submission, queue state.

The job runs :class:`vlframe.launch.job.TrainJob` under ``srun`` (``nodes x tasks_per_node``
processes); submitit writes its logs and pickles into ``<run folder>/slurm/`` and the run folder
records the job id in ``job.json``. A cluster is reached the way SLURM's own commands reach it
(``sbatch`` on PATH, ``SLURM_CONF`` if set).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlframe.config import ConfigError, config_to_dict
from vlframe.io import atomic_write
from vlframe.launch.job import TrainJob

JOB_FILE = "job.json"


class LaunchError(RuntimeError):
    """The cluster refused or cannot take a submission (no srun, sbatch's own error)."""

SLURM_SUBDIR = "slurm"


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"


def sbatch_parameters(slurm: Mapping[str, Any], *, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch's names) for a ``slurm:`` section.

    Nothing is requested that the section does not ask for: no GPU line when
    ``gpus_per_node`` is 0, no memory, partition, account, qos or constraint when they are null.
    """
    s = dict(slurm)
    params: dict[str, Any] = {
        "job_name": s["job_name"] or job_name,
        "nodes": int(s["nodes"]),
        "ntasks_per_node": int(s["tasks_per_node"]),
        "cpus_per_task": int(s["cpus_per_task"]),
        "time": int(s["time_min"]),
        "signal_delay_s": int(s["signal_delay_s"]),
        "array_parallelism": int(s["array_parallelism"]),
    }
    if int(s["gpus_per_node"]) > 0:
        params["gpus_per_node"] = int(s["gpus_per_node"])
    if s["mem_gb"] is not None:
        params["mem"] = _mem(float(s["mem_gb"]))
    for key in ("partition", "account", "qos", "constraint"):
        if s[key] is not None:
            params[key] = str(s[key])
    if s["setup"]:
        params["setup"] = [str(line) for line in s["setup"]]
    if s["additional"]:
        params["additional_parameters"] = {str(k): v for k, v in s["additional"].items()}
    return params


def sbatch_script(params: Mapping[str, Any], folder: str) -> str:
    """The batch script submitit writes for ``params`` (what ``--dry-run`` shows)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


def make_executor(folder: str, slurm: Mapping[str, Any], *, job_name: str):
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(slurm["max_num_timeout"]))
    except RuntimeError as e:  # no srun on this host
        raise LaunchError(f"launcher=slurm: {e} (sbatch/srun must be on PATH; SLURM_CONF names the cluster)") from e
    executor.update_parameters(**sbatch_parameters(slurm, job_name=job_name))
    return executor


def job_config(cfg: DictConfig) -> dict[str, Any]:
    """The plain, resolved config the job pickles (it says where it ran: ``launcher: slurm``)."""
    data = config_to_dict(cfg)
    data["launcher"] = "slurm"
    return data


def write_job_record(work_dir: str, job_id: str) -> None:
    os.makedirs(work_dir, exist_ok=True)
    atomic_write(os.path.join(work_dir, JOB_FILE), lambda f: json.dump({"job_id": job_id}, f), binary=False)


def read_job_record(work_dir: str) -> str | None:
    path = os.path.join(work_dir, JOB_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return str(json.load(f)["job_id"])


# Queue states of a job that will still run (or runs now).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED", "RESV_DEL_HOLD"}


def queue_state(job_id: str) -> str | None:
    """The job's state as ``squeue`` reports it, or None once it has left the queue."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def is_active(job_id: str | None) -> bool:
    return job_id is not None and queue_state(job_id) in ACTIVE_STATES


def describe_submission(cfg: DictConfig, work_dir: str, *, job_name: str) -> str:
    folder = os.path.abspath(os.path.join(work_dir, SLURM_SUBDIR, "%j"))
    params = sbatch_parameters(config_to_dict(cfg)["slurm"], job_name=job_name)
    return "\n".join([
        "# resolved config",
        OmegaConf.to_yaml(OmegaConf.create(job_config(cfg))).rstrip(),
        "# submitit SlurmExecutor parameters",
        json.dumps(params, indent=2, sort_keys=True),
        f"# max_num_timeout: {int(cfg.slurm.max_num_timeout)}",
        "# sbatch script",
        sbatch_script(params, folder).rstrip(),
    ])


def dependency_parameters(slurm: Mapping[str, Any], after: str) -> dict[str, Any]:
    """``additional_parameters`` that start a job only once job ``after`` COMPLETED (exit 0), and
    have SLURM cancel it when ``after`` failed (instead of pending forever as DependencyNeverSatisfied)."""
    extra = {str(k): v for k, v in (slurm.get("additional") or {}).items()}
    own = extra.pop("dependency", None)
    extra["dependency"] = f"afterok:{after}" + (f",{own}" if own else "")
    extra["kill_on_invalid_dep"] = "yes"
    return extra


def submit_train(cfg: DictConfig, work_dir: str, *, after: str | None = None, evaluate: bool = False,
                 job_name: str | None = None):
    """Submit one training run of ``cfg`` (already checked by ``preflight.prepare``); returns the job.
    ``after``: a job id this one waits on (``afterok``); ``evaluate``: see :class:`TrainJob`."""
    import submitit

    work_dir = os.path.abspath(work_dir)
    folder = os.path.join(work_dir, SLURM_SUBDIR, "%j")
    slurm = config_to_dict(cfg)["slurm"]
    executor = make_executor(folder, slurm, job_name=job_name or os.path.basename(work_dir))
    if after is not None:
        executor.update_parameters(additional_parameters=dependency_parameters(slurm, after))
    try:
        job = executor.submit(TrainJob(job_config(cfg), work_dir, evaluate=evaluate))
    except submitit.core.utils.FailedJobError as e:
        raise LaunchError(f"sbatch refused the job: {str(e).strip() or e!r}") from e
    write_job_record(work_dir, str(job.job_id))
    return job


def submit_array(runs: Sequence[tuple[DictConfig, str]], folder: str, *, job_name: str) -> list:
    """Submit ``(config, run folder)`` pairs as ONE job array; they must share their ``slurm:`` section."""
    import submitit

    if not runs:
        return []
    first = config_to_dict(runs[0][0])["slurm"]
    for cfg, work_dir in runs[1:]:
        if config_to_dict(cfg)["slurm"] != first:
            raise ConfigError(f"slurm: {work_dir} asks for other SLURM resources than {runs[0][1]}; "
                              "the points of one sweep form one job array and share their slurm section")
    executor = make_executor(os.path.abspath(folder), first, job_name=job_name)
    jobs = []
    try:
        with executor.batch():
            for cfg, work_dir in runs:
                jobs.append(executor.submit(TrainJob(job_config(cfg), os.path.abspath(work_dir))))
    except submitit.core.utils.FailedJobError as e:
        raise LaunchError(f"sbatch refused the job array: {str(e).strip() or e!r}") from e
    for job, (_, work_dir) in zip(jobs, runs, strict=True):
        write_job_record(os.path.abspath(work_dir), str(job.job_id))
    return jobs
