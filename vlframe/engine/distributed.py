"""Process-group helpers: one place that knows about ranks.

A launcher (torchrun, SLURM's srun through a wrapper, submitit) describes the job in the standard
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` joins that process group (NCCL on CUDA, gloo on the CPU).
Without ``WORLD_SIZE`` (or with 1) the run is a single process and every helper here is a no-op.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's index on its node (its GPU), from ``LOCAL_RANK``; 0 when not set."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device, *, timeout_minutes: float = 30.0) -> bool:
    """Join the process group the environment describes (see the module docstring); returns
    whether the run is distributed. Call it once per process, after choosing ``device``
    (``cuda:LOCAL_RANK`` on GPUs). A missing or malformed variable is named in the error."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    missing = [k for k in ENV_KEYS if k != "LOCAL_RANK" and not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                           "launch with torchrun, or set all of " + ", ".join(ENV_KEYS))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(minutes=timeout_minutes),
        # NCCL: bind the communicator to this rank's GPU up front (no guessing by the first op).
        device_id=device if device.type == "cuda" else None,
    )
    return True


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s value on every rank (used so all ranks train the same task each step)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device; ``t`` itself if single)."""
    if not is_dist():
        return t
    out = t.to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks take the same branch).
    A device tensor goes into the all-reduce as it is: one host sync, for the answer."""
    if not is_dist():
        return bool(flag)
    t = torch.as_tensor(flag).to(device=_comm_device(), dtype=torch.long).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list indexed by rank), ``None`` elsewhere. Objects travel
    pickled between the job's own processes only (never read from disk)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list indexed by rank); pickled between the job's own
    processes only, never read from disk."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()
