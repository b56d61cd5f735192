#!/usr/bin/env python
"""Sweeps over config keys as one SLURM job array, and their results table.

    tools/sweep.py [CONFIG] SWEEP.yaml [--sweep-dir DIR] [--local] [--dry-run] [--quick] [--wait] [key=value ...]
    tools/sweep.py collect SWEEP_DIR

The sweep file format is in vlframe/launch/sweep.py (CONFIG may be left out where the sweep file
names its configs). Every run is checked before anything is submitted; finished and queued runs
are skipped, failed or preempted ones resume. A sweep file with ``pipeline:`` runs each point as
pretraining then downstream finetunes (dependent SLURM jobs); ``collect`` then prints the paper's
Table 2 layout (and writes table2.md, table2.csv, table2.png).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.launch.slurm import LaunchError  # noqa: E402
from vlframe.launch.sweep import collect, launch_sweep  # noqa: E402

ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, LaunchError, TimeoutError)


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
        files = table.get("files") or [os.path.join(args.sweep_dir, n) for n in ("results.md", "results.csv")]
        print(f"# written: {', '.join(files)}")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="[CONFIG] SWEEP [key=value ...]",
                   help="the base config (optional where the sweep file names it), the sweep file, then "
                        "key=value overrides applied to every run (every stage of a pipeline)")
    p.add_argument("--sweep-dir", default=None, help="folder of the runs (default: work_dirs/sweeps/<sweep name>)")
    p.add_argument("--local", action="store_true", help="run here, one after another, instead of a job array")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their status; start nothing")
    p.add_argument("--quick", action="store_true",
                   help="the sweep file's quick: section (a few points, fewer seeds and steps; default sweep "
                        "dir <name>_quick)")
    p.add_argument("--wait", action="store_true",
                   help="SLURM: wait until the submitted jobs left the queue, then report failed stages")
    args = p.parse_intermixed_args(argv)
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(files) not in (1, 2):
        p.error("expected [CONFIG] SWEEP.yaml, then key=value overrides")
    if args.wait and args.local:
        p.error("--wait is for SLURM (--local runs the stages here and returns when they are done)")
    config, sweep = (None, files[0]) if len(files) == 1 else files
    try:
        out = launch_sweep(config, sweep, sweep_dir=args.sweep_dir, overrides=overrides, local=args.local,
                           dry_run=args.dry_run, quick=args.quick, wait=args.wait)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if out["failed"] or out.get("not_run") else 0


if __name__ == "__main__":
    sys.exit(main())
