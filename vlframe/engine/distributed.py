"""Process-group helpers: one place that knows about ranks."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun / SLURM launchers describe in the environment (if any)."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s value on every rank (used so all ranks train the same task each step)."""
    if not is_dist():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def barrier() -> None:
    if is_dist():
        dist.barrier()
