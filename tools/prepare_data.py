"""Prepare data stores: generate the synthetic world or import public formats.

    python tools/prepare_data.py synthetic --out DIR [--seed 0 --num-images 2000 --feat-dim 256 ...]
    python tools/prepare_data.py <importer> ...      (see --help for the list)

Each subcommand is defined by a module's ``register_cli(subparsers)``, which adds its parser and
sets ``func``; to add one, append its module to ``vlframe.data.importers.CLI_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    from vlframe.data.importers import CLI_MODULES  # the one list of subcommand modules

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in CLI_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        parser.exit(2, f"prepare_data {args.command}: {e}\n")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
