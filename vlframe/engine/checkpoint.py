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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlframe.io import atomic_write, local_path

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str) -> dict:
    """A checkpoint (a torch file, or a ``.safetensors`` file as ``{"model": tensors}``); local
    or any path the path manager serves (``vlframe.io``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return {"model": load_file(local_path(path))}
        return torch.load(local_path(path), map_location="cpu", weights_only=True)
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


def save_safetensors(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a flat state dict to ``path`` as safetensors, atomically. safetensors stores no
    aliasing, so a tensor sharing storage with one already written gets its own copy."""
    from safetensors.torch import save

    seen: set[int] = set()
    flat = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    data = save(flat)
    atomic_write(path, lambda f: f.write(data))


def export_weights(src: str, dst: str) -> int:
    """The model weights (``model``: the whole ``VLModule``, heads included) of checkpoint ``src``
    -> the safetensors file ``dst``, which ``train.init_from`` reads back; returns the key count."""
    if not dst.endswith(".safetensors"):
        raise ValueError(f"{dst}: the export target must end with .safetensors")
    if os.path.abspath(local_path(src)) == os.path.abspath(dst):
        raise ValueError(f"{dst}: refusing to write over the input")
    state = load(src)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{src}: not a vlframe checkpoint (no 'model' state dict of tensors)")
    save_safetensors(weights, dst)
    return len(weights)


@dataclass
class WeightsReport:
    """What an initialisation did: keys copied from the file, keys left at their fresh
    initialisation, and file keys nothing used (names as the file spells them)."""

    source: str
    copied: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"initialised from {self.source}: {len(self.copied)} keys copied, "
            f"{len(self.initialised)} newly initialised, {len(self.unused)} unused"
        ]
        for what, keys in (("newly initialised", self.initialised), ("unused", self.unused)):
            lines += [f"  {what}: {k}" for k in keys]
        return "\n".join(lines)


def load_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], *, source: str) -> WeightsReport:
    """Copy ``weights`` into ``module`` by name (the rest stay as initialised). A shape
    mismatch is an error naming the key and both shapes."""
    own = module.state_dict()
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{source}: {k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    module.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return WeightsReport(
        source=source,
        copied=sorted(k for k in weights if k in own),
        initialised=sorted(k for k in own if k not in weights),
        unused=sorted(k for k in weights if k not in own),
    )


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
