"""One training run, as a local call or as the callable a SLURM job runs.

``run_training`` is the one path every launcher ends in. A resumed trainer drops the records of
``metrics.jsonl`` logged after the checkpoint it resumes from (``vlframe.engine.resume``): those
steps are trained again, so each step appears once in the log whatever was interrupted. After the last step rank 0 writes ``done.json`` (final metrics, ``max_steps``): a sweep treats a
folder holding it, for the same ``max_steps``, as finished.

``TrainJob`` follows submitit's checkpointing protocol: on preemption or time-out submitit calls
its ``checkpoint()`` (on global rank 0), which resubmits the same job with ``resume: auto``; the
job requeues and continues from the newest checkpoint the trainer saved. A job restarted by
``scontrol requeue`` (no ``checkpoint()`` call) sees ``SLURM_RESTART_COUNT`` and resumes the same way.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlframe.engine import checkpoint as ckpt
from vlframe.io import atomic_write

log = logging.getLogger("vlframe")

DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"  # what the trainer logs into the run folder
STAGE_METRICS = "metrics.json"  # a sweep's downstream stage: its evaluation (tools/test.py's format)


def read_done(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, DONE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_training(cfg: DictConfig, work_dir: str) -> dict[str, float]:
    """Train ``cfg`` into ``work_dir``; returns the last validation metrics."""
    from vlframe.data.loader import keep_freed_memory
    from vlframe.engine import distributed as D
    from vlframe.engine.trainer import Trainer

    # The training process churns buffers of 0.1-10 MB per step (activations, gradients, batches);
    # with glibc's trimming each regrowth faults its pages in again (measured on a tiny pretraining,
    # one thread: system time 8.4 s -> 1.3 s, user 57.4 s -> 53.5 s, losses identical).
    keep_freed_memory()
    metrics = Trainer(cfg, work_dir=work_dir).train()
    if D.is_main():
        record = {"max_steps": int(cfg.train.max_steps), "metrics": metrics}
        atomic_write(os.path.join(work_dir, DONE_FILE), lambda f: json.dump(record, f), binary=False)
    return metrics


def final_checkpoint(work_dir: str, max_steps: int) -> str:
    """The checkpoint a finished run leaves at its last step (the trainer's naming)."""
    return os.path.join(work_dir, "checkpoints", f"ckpt_{int(max_steps):07d}.pt")


def write_stage_metrics(cfg: Any, work_dir: str, metrics: Mapping[str, float]) -> str:
    """A downstream stage's evaluation = its final validation, as tools/test.py's metrics.json."""
    step = int(cfg.train.max_steps)
    result = {
        "protocol": {"source": "final validation of the finetune run (vlframe.launch.sweep)",
                     "checkpoint": final_checkpoint(work_dir, step), "checkpoint_step": step, "split": "val",
                     "val_batches": int(cfg.train.get("val_batches", 0) or 0),  # 0: the whole split
                     "dataset": OmegaConf.to_container(cfg.data.val, resolve=True),
                     "init_from": str(cfg.train.init_from),
                     "tasks": {n: str(t.type) for n, t in cfg.tasks.items()},
                     "zero_shot_heads": {}, "zero_shot": False},
        "metrics": {k[len("val/"):]: float(v) for k, v in metrics.items() if k.startswith("val/")},
        "predictions": {},
    }
    path = os.path.join(work_dir, STAGE_METRICS)
    atomic_write(path, lambda f: json.dump(result, f, indent=1), binary=False)
    return path


def export_torch_env(*, single_node: bool) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the job's first host) and MASTER_PORT (derived
    from the job id) from submitit's job environment, for the trainer's env:// process group."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment()
    # The trainer picks cuda:LOCAL_RANK among the node's GPUs itself.
    env.export(set_cuda_visible_devices=False, overwrite=True)
    if single_node and env.world_size > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo between processes of one node
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


class TrainJob:
    """The callable a SLURM job runs: a plain config (no tensors, no modules) and the run folder.
    ``evaluate``: a sweep's downstream stage, which also writes its evaluation (``write_stage_metrics``)."""

    def __init__(self, config: dict[str, Any], work_dir: str, *, evaluate: bool = False):
        self.config = config
        self.work_dir = work_dir
        self.evaluate = evaluate

    def __call__(self) -> dict[str, float]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        cfg = OmegaConf.create(self.config)
        if "OMP_NUM_THREADS" not in os.environ:  # torch would run as many threads as the node has cores, per rank
            import torch

            torch.set_num_threads(int(cfg.slurm.cpus_per_task))
        env = export_torch_env(single_node=int(cfg.slurm.nodes) == 1)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts and str(cfg.train.resume) != "auto" and ckpt.list_checkpoints(os.path.join(self.work_dir, "checkpoints")):
            cfg.train.resume = "auto"  # requeued: continue this run, not the one it started from
        log.info("job %s restart %d: %s", os.environ.get("SLURM_JOB_ID"), restarts, env)
        metrics = run_training(cfg, self.work_dir)
        if self.evaluate and int(env["RANK"]) == 0:
            write_stage_metrics(cfg, self.work_dir, metrics)
        return metrics

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit: preempted or timed out; requeue this job, to resume from its newest checkpoint."""
        import submitit

        config = OmegaConf.to_container(OmegaConf.create(self.config), resolve=True)
        config["train"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(TrainJob(config, self.work_dir, evaluate=self.evaluate))
