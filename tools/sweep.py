#!/usr/bin/env python
"""Sweeps over config keys as one SLURM job array, and their results table.

    tools/sweep.py CONFIG SWEEP.yaml [--sweep-dir DIR] [--local] [--dry-run] [key=value ...]
    tools/sweep.py collect SWEEP_DIR

The sweep file format is in vlframe/launch/sweep.py. Every run is checked before anything is
submitted; finished and queued runs are skipped, failed or preempted ones resume.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.launch.slurm import LaunchError  # noqa: E402
from vlframe.launch.sweep import collect, launch_sweep  # noqa: E402

ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, LaunchError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["collect"]:
        p = argparse.ArgumentParser(prog="sweep.py collect", description="gather final validation metrics")
        p.add_argument("sweep_dir")
        args = p.parse_args(argv[1:])
        try:
            table = collect(args.sweep_dir)
        except ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(table["markdown"], end="")
        print(f"# written: {os.path.join(args.sweep_dir, 'results.md')}, {os.path.join(args.sweep_dir, 'results.csv')}")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("sweep")
    p.add_argument("--sweep-dir", default=None, help="folder of the runs (default: work_dirs/sweeps/<sweep name>)")
    p.add_argument("--local", action="store_true", help="run here, one after another, instead of a job array")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their status; start nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_intermixed_args(argv)
    try:
        out = launch_sweep(args.config, args.sweep, sweep_dir=args.sweep_dir, overrides=args.overrides,
                           local=args.local, dry_run=args.dry_run)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
