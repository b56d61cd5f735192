#!/usr/bin/env python
"""Wall time per stage type of a pipeline sweep that ran on SLURM (or --local):
``benchmarks/bench_sweep_stages.py SWEEP_DIR``.

A SLURM stage's time is from submitit's "Starting" line to its "Job completed" line in the job's
log (the job's own Python start and the torch import before unpickling are not in it: ~1 s);
a --local stage's from the first to the last line of its stage.log. Prints per stage type
(pretrain per line, each downstream stage) mean, min, max and count, the sum over all stages, and
the span from the first start to the last end (the sweep's wall time, queue waits included).
"""
import argparse
import os
import re
import statistics
import sys
from datetime import datetime

STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _times(path: str, first: str, last: str) -> tuple[datetime, datetime] | None:
    start = end = None
    with open(path, errors="replace") as f:
        for line in f:
            m = STAMP.search(line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if start is None and first in line:
                start = t
            if last in line:
                end = t
    return (start, end) if start and end else None


def stage_times(sweep_dir: str) -> list[tuple[str, str, float, datetime, datetime]]:
    """(run, stage, seconds, start, end) of every stage that ran to its end (each job counted)."""
    out = []
    for run in sorted(os.listdir(sweep_dir)):
        rdir = os.path.join(sweep_dir, run)
        if not os.path.isdir(rdir):
            continue
        for stage in sorted(os.listdir(rdir)):
            sdir = os.path.join(rdir, stage)
            slurm_dir = os.path.join(sdir, "slurm")
            spans = []
            if os.path.isdir(slurm_dir):
                for job in os.listdir(slurm_dir):
                    log = os.path.join(slurm_dir, job, f"{job}_0_log.out")
                    if os.path.isfile(log):
                        spans.append(_times(log, "Starting with JobEnvironment", "Job completed"))
            elif os.path.isfile(os.path.join(sdir, "stage.log")):
                spans.append(_times(os.path.join(sdir, "stage.log"), "starts", ""))
            for span in filter(None, spans):
                out.append((run, stage, (span[1] - span[0]).total_seconds(), span[0], span[1]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    rows = stage_times(args.sweep_dir)
    if not rows:
        print(f"no finished stage logs under {args.sweep_dir}", file=sys.stderr)
        return 2
    kinds: dict[str, list[float]] = {}
    for run, stage, secs, _, _ in rows:
        line = run.rsplit("_seed-", 1)[0]
        kinds.setdefault(f"pretrain {line}" if stage == "pretrain" else stage, []).append(secs)
    print(f"{'stage':<40} {'mean s':>7} {'min s':>7} {'max s':>7} {'n':>3}")
    for kind in sorted(kinds, key=lambda k: (not k.startswith("pretrain"), k)):
        v = kinds[kind]
        print(f"{kind:<40} {statistics.fmean(v):7.1f} {min(v):7.1f} {max(v):7.1f} {len(v):3d}")
    total = sum(r[2] for r in rows)
    span = (max(r[4] for r in rows) - min(r[3] for r in rows)).total_seconds()
    print(f"# {len(rows)} stage runs: {total:.0f} s of stage time in all; first start to last end {span:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
