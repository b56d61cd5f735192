#!/usr/bin/env python
"""Evaluate a finetuned or pretrained checkpoint on a config's tasks:
``tools/test.py CONFIG CHECKPOINT [--out DIR] [--split val] [key=value ...]``.

Writes DIR/metrics.json (metrics + the protocol: checkpoint, step, split, zero-shot heads) and
each task's predictions in its benchmark's official format (VQA: [{"question_id", "answer"}];
NLVR2: "identifier,prediction" CSV). Under torchrun, retrieval scoring is sharded over the ranks;
an interrupted run resumes from the score blocks kept in DIR (``--fresh`` starts over).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.config import load_and_validate  # noqa: E402
from vlframe.engine import distributed as D  # noqa: E402
from vlframe.engine.evaluate import evaluate_checkpoint  # noqa: E402
from vlframe.engine.trainer import resolve_device  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/../test_<split>)")
    p.add_argument("--split", default="val", help="data.<split> of the config to evaluate on")
    p.add_argument("--fresh", action="store_true", help="ignore score blocks of an earlier, interrupted run")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (omegaconf dotlist)")
    args = p.parse_intermixed_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), f"test_{args.split}")
    try:
        cfg = load_and_validate(args.config, args.overrides)
        D.init_from_env(resolve_device(cfg.train.device))
        result = evaluate_checkpoint(cfg, args.checkpoint, out_dir=out, split=args.split, device=cfg.train.device,
                                     resume_blocks=not args.fresh)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if D.is_main():
        for k, v in sorted(result["metrics"].items()):
            print(f"{k}: {v:.4f}")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
