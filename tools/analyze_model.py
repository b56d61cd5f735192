#!/usr/bin/env python
"""Print the parameter table of a config's model: ``tools/analyze_model.py CONFIG [key=value ...]``."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.engine.analysis import parameter_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("--depth", type=int, default=2, help="module depth of the table")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    print(parameter_table(args.config, args.overrides, max_depth=args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
