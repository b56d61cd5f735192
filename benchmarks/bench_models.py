"""CPU cost of one training step of each task, for two model configs on the same data.

Builds the trainer of each config (default: the UNITER and the two-stream tiny demos), then runs
``--steps`` optimizer steps of every task after ``--warmup`` and prints the median CPU time
(``time.process_time``, one thread) and wall time per step, and the steps/s per core of the
config's own task mix. CPU time is what other processes on a shared machine inflate least; wall
time is what a quiet machine would show.

    python benchmarks/bench_models.py [--configs A.yaml B.yaml] [--steps 20] [--warmup 3] [key=value ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from vlframe.config import load_and_validate  # noqa: E402
from vlframe.engine.trainer import Trainer  # noqa: E402

DEFAULT = ["configs/uniter/pretrain_tiny_synth.yaml", "configs/twostream/pretrain_tiny_synth.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.configs:
        cfg = load_and_validate(path, args.overrides)
        with tempfile.TemporaryDirectory() as work_dir:
            trainer = Trainer(cfg, work_dir=work_dir)
            params = sum(p.numel() for p in trainer.model.encoder.parameters())
            print(f"{path}: {type(trainer.model.encoder).__name__}, {params / 1e6:.2f}M parameters")
            cpu_ms, mix = {}, {name: float(node.get("mix", 1.0)) for name, node in cfg.tasks.items()}
            for task in cfg.tasks:
                cpu, wall = [], []
                for i in range(args.warmup + args.steps):
                    micro = [trainer.streams[task].next()]
                    c0, w0 = time.process_time(), time.perf_counter()
                    trainer.train_step(task, micro)
                    if i >= args.warmup:
                        cpu.append(time.process_time() - c0)
                        wall.append(time.perf_counter() - w0)
                cpu_ms[task] = 1e3 * statistics.median(cpu)
                print(f"  {task:8s} cpu {cpu_ms[task]:7.1f} ms/step   wall {1e3 * statistics.median(wall):7.1f} ms/step")
            mean_ms = sum(mix[t] * cpu_ms[t] for t in cpu_ms) / sum(mix.values())
            print(f"  task mix {mix}: {mean_ms:.1f} cpu ms/step = {1e3 / mean_ms:.2f} steps/s per core")


if __name__ == "__main__":
    main()
