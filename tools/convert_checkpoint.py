#!/usr/bin/env python
"""Convert checkpoints between the original UNITER code, BERT and vlframe.

  tools/convert_checkpoint.py --from original --to vlframe model_step_200000.pt uniter_base.pt
  tools/convert_checkpoint.py --from vlframe --to original work_dirs/run/ckpt_1000.pt model_step_1000.pt
  tools/convert_checkpoint.py --from bert --to vlframe bert-base-cased/ init.pt

vlframe outputs are ``{"model": VLModule state dict}`` (what ``train.init_from`` reads), or a flat
``.safetensors`` file. Task names: ``--tasks mlm,itm`` picks the heads to produce (default: all
the original has), ``--name mrc_kl=mrckl`` renames a task to the name a config uses.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from projects.uniter.uniter.convert import DEFAULT_TASKS, convert_file  # noqa: E402
from vlframe.engine.checkpoint import check_file  # noqa: E402


def _names(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        kind, sep, name = p.partition("=")
        if not sep or not kind or not name:
            raise ValueError(f"--name expects KIND=NAME (e.g. mrc_kl=mrckl), got {p!r}")
        out[kind] = name
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["original", "vlframe", "bert"])
    p.add_argument("--to", dest="target", required=True, choices=["vlframe", "original"])
    p.add_argument("input", help="checkpoint file (.pt/.bin/.safetensors) or a transformers folder (bert)")
    p.add_argument("output", help="output file; .safetensors writes safetensors, anything else torch.save")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="task heads to produce (original -> vlframe)")
    p.add_argument("--name", action="append", default=[], metavar="KIND=NAME", help="task name in your config")
    p.add_argument("--non-strict", action="store_true", help="skip (and list) input keys with no counterpart")
    p.add_argument("--img-dim", type=int, default=2048, help="region feature size (bert -> vlframe)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (bert; default: config.json)")
    args = p.parse_args(argv)
    try:
        check_file(args.input, what="input")  # missing, truncated, not a checkpoint: one line, before any work
        skipped = convert_file(
            args.input,
            args.output,
            source=args.source,
            target=args.target,
            tasks=[t for t in args.tasks.split(",") if t],
            names=_names(args.name),
            strict=not args.non_strict,
            img_dim=args.img_dim,
            num_heads=args.num_heads,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in skipped:
        print(f"skipped: {k}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
