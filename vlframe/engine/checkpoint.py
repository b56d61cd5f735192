"""Checkpoints: written atomically, read without executing code.

A checkpoint is one ``torch.save`` file ``ckpt_<step>.pt`` holding plain containers of tensors,
numbers and strings, so ``torch.load(weights_only=True)`` reads it. It is first written to a
temporary file in the same folder, flushed to disk, then renamed: an interrupted save never
damages an earlier checkpoint, and a half-written file never carries a checkpoint's name.
"""
from __future__ import annotations

import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

from vlframe.io import atomic_write

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file must say which file it is
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := _NAME.match(n))]
    return sorted(found)


def newest_good(folder: str) -> tuple[str, dict] | None:
    """The newest checkpoint in ``folder`` that reads back whole; damaged ones are skipped (logged)."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            state = load(path)
        except RuntimeError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        if isinstance(state, dict) and "step" in state and "model" in state:
            return path, state
        log.warning("skipping %s: not a vlframe checkpoint", path)
    return None


def prune(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        os.unlink(path)


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain numbers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_all(seed: int) -> None:
    """Seed every RNG :func:`rng_state` records (python ``random``, NumPy, torch incl. CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_plain_to_py_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _plain_to_py_state(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])
