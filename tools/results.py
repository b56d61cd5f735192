#!/usr/bin/env python
"""One table across tasks with the paper's Meta-Sum: ``tools/results.py RUN_DIRS... [--csv FILE]``.

A run folder holds tools/test.py's metrics.json, or is a training run (its last validation in
metrics.jsonl). Prints Markdown; ``--csv`` also writes CSV (``-`` = to stdout).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.engine.evaluate import format_csv, format_markdown, results_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    try:
        header, rows = results_table(args.runs)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_markdown(header, rows), end="")
    if args.csv == "-":
        print(format_csv(header, rows), end="")
    elif args.csv:
        with open(args.csv, "w", encoding="utf-8") as f:
            f.write(format_csv(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
