#!/usr/bin/env python
"""Train from a config: ``tools/train.py CONFIG [--work-dir DIR] [--dry-run] [key=value ...]``.

``launcher=slurm`` (with ``slurm.*`` keys) submits the run as a SLURM job instead; ``--dry-run``
prints the resolved config (and the exact submission) without training or submitting.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.launch import launch, one_line_error  # noqa: E402
from vlframe.launch.slurm import LaunchError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("--work-dir", default=None, help="run folder (default: work_dirs/<config name>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and submission; run nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (omegaconf dotlist)")
    args = p.parse_intermixed_args(argv)
    try:
        out = launch(args.config, args.overrides, work_dir=args.work_dir, dry_run=args.dry_run)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, LaunchError) as e:
        if not one_line_error(e):
            raise  # a bug in user code (a registered component): its traceback, with the component named
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    for k, v in sorted(out.get("metrics", {}).items()):
        print(f"{k}: {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
