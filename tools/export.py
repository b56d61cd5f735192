#!/usr/bin/env python
"""Export the model weights of a vlframe checkpoint to safetensors:

  tools/export.py work_dirs/run/checkpoints/ckpt_0005000.pt uniter_tiny.safetensors

The file holds the whole model (``model.*`` backbone and ``tasks.<name>.*`` heads), no optimizer
state and nothing executable; ``train.init_from``, ``model.pretrained`` and
``tools/visualize.py`` read it. Inputs may be any path vlframe.io serves (e.g. http(s)://).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from vlframe.engine.checkpoint import export_weights  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a vlframe checkpoint (ckpt_<step>.pt)")
    p.add_argument("output", help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        n = export_weights(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
