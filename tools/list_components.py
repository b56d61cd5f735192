"""Print every registry and its registered names with the class each builds.

    python tools/list_components.py [--config CONFIG] [--registry NAME]

``--config`` first imports that config's ``custom_imports`` (user components show up too);
``--registry`` prints one registry only (e.g. ``ot_solver``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlframe.config import format_components


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file whose custom_imports are imported first")
    parser.add_argument("--registry", help="print only this registry (e.g. model, ot_solver)")
    args = parser.parse_args(argv)
    try:
        print(format_components(config=args.config, registry=args.registry))
    except (ValueError, FileNotFoundError, ImportError) as e:  # ConfigError is a ValueError
        parser.exit(2, f"list_components: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
