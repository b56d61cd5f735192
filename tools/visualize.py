#!/usr/bin/env python
"""Pictures of a trained model (logic in vlframe/visualize.py).

  tools/visualize.py attention CONFIG CHECKPOINT --out DIR [--index I] [--word W] [--layer L] [--set K=V]
      attention_grid.png: every layer and head for example I of data.val (Fig. 2 patterns);
      word_regions.png: word W's attention to the regions, as boxes on the image (Fig. 3)
  tools/visualize.py curves RUN_DIR/metrics.jsonl --out curves.png [--smooth 0.9]
      training loss per task, smoothed, with the validation points
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attention", help="attention maps of one image-text pair")
    a.add_argument("config")
    a.add_argument("checkpoint", help="vlframe checkpoint or exported .safetensors ('' = the config's init)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--split", default="val", help="data split to take the example from (default: val)")
    a.add_argument("--index", type=int, default=0, help="example index in the split")
    a.add_argument("--word", default=None, help="word (or its index) whose region attention to draw; default: the last word of the caption")
    a.add_argument("--layer", type=int, default=-1, help="layer for the word-region picture (default: last)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), e.g. --set data.train.cache_dir=/data/cache")
    c = sub.add_parser("curves", help="training curves from metrics.jsonl")
    c.add_argument("metrics")
    c.add_argument("--out", required=True, help="output PNG")
    c.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the smoothed line, in [0, 1)")
    args = p.parse_args(argv)
    from vlframe import visualize as V

    try:
        if args.cmd == "curves":
            print(V.training_curves(args.metrics, args.out, smooth=args.smooth))
            return 0
        model, dataset = V.load_model_and_data(args.config, args.checkpoint or None, split=args.split,
                                               overrides=args.overrides)
        batch, tokens = V.example_batch(dataset, args.index)
        att = V.pair_attention(model, batch, tokens)
        word = V.pick_word(att.tokens, args.word)
        print(V.attention_grid(att, os.path.join(args.out, "attention_grid.png"), title=" ".join(att.tokens)))
        print(V.word_region_attention(att, word, os.path.join(args.out, "word_regions.png"), layer=args.layer))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
