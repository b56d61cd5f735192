"""Checkpoints: written atomically, read without executing code.

A checkpoint is one ``torch.save`` file ``ckpt_<step>.pt`` holding plain containers of tensors,
numbers and strings, so ``torch.load(weights_only=True)`` reads it. It is first written to a
temporary file in the same folder, flushed to disk, then renamed: an interrupted save never
damages an earlier checkpoint, and a half-written file never carries a checkpoint's name; the
temp files a kill leaves behind are removed at the next start (:func:`remove_orphans`).

Pruning keeps the newest *readable* checkpoints: a damaged or foreign file never counts as one
of them, so it can never cause a good checkpoint to be deleted (nor is it deleted itself).
Every problem with a checkpoint file is a one-line :class:`CheckpointError` naming the file and
what is wrong with it (missing, empty, truncated, not a checkpoint, a safetensors header error,
refused by ``weights_only``).
"""
from __future__ import annotations

import logging
import os
import random
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlframe.io import TMP_SUFFIX, atomic_write, local_path

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
# atomic_write's temp files for a checkpoint: ".ckpt_0000100.pt.<random>.tmp"
_ORPHAN = re.compile(r"^\.(ckpt_\d+|best)\.pt\..+" + re.escape(TMP_SUFFIX) + "$")
BEST_NAME = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message (one line) names the file and the problem."""


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _problem(path: str, e: BaseException) -> str:
    """What is wrong with the torch file ``path``, in a few words (torch's messages span a page)."""
    text = str(e)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        detail = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        return ("refused: it holds objects other than tensors and plain containers, and loading them could run "
                "code (torch.load weights_only=True)" + (f": {detail[0]}" if detail else ""))
    if "central directory" in text or isinstance(e, (EOFError, zipfile.BadZipFile)) or "unexpected EOF" in text:
        return "truncated (an interrupted save or copy?)"
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"not a readable checkpoint ({type(e).__name__}: {line[:200]})"


def _sniff(path: str) -> None:
    """Raise CheckpointError for what can be told without unpickling: missing, empty, truncated zip,
    neither a torch file nor safetensors."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":  # torch's zip format (the default since torch 1.6)
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise CheckpointError(f"{path}: truncated (zip archive without its directory: an interrupted save "
                                  "or copy?)") from None
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise CheckpointError(f"{path}: not a checkpoint (a zip file without torch's data.pkl)")
        return
    if head[:1] == b"\x80":  # a pickle: torch's legacy format
        return
    raise CheckpointError(f"{path}: not a checkpoint (neither a torch file nor safetensors)")


def load(path: str) -> dict:
    """A checkpoint: a torch file read with ``weights_only=True``, or a ``.safetensors`` file as
    ``{"model": tensors}``; local or any path the path manager serves (``vlframe.io``). Any problem
    is a CheckpointError naming the file."""
    path = os.fspath(path)
    try:
        local = local_path(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if path.endswith(".safetensors"):
        _check_safetensors(local)
        from safetensors.torch import load_file

        return {"model": load_file(local)}
    _sniff(local)
    try:
        return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; name the file
        raise CheckpointError(f"{path}: {_problem(local, e)}") from None


def check_file(path: str, *, what: str) -> None:
    """Check a weights file before data and model are built (``what``: the config key naming it).

    A folder is a transformers checkpoint folder (``model.safetensors`` or ``pytorch_model.bin``
    inside). ``.safetensors`` files have their header parsed; torch files are opened memory-mapped
    with ``weights_only=True`` (nothing is copied, nothing can run). A remote path is fetched
    through the path manager first (``vlframe.io``)."""
    path = os.fspath(path)
    try:
        try:
            path = local_path(path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if os.path.isdir(path):
            inner = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
            found = next((p for p in inner if os.path.isfile(p)), None)
            if found is None:
                raise CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
            path = found
        if path.endswith(".safetensors"):
            _check_safetensors(path)
            return
        _sniff(path)
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: {_problem(path, e)}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_safetensors(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: safetensors header error: {line}") from None


def is_training_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "step" in state and "model" in state


def remove_orphans(folder: str) -> list[str]:
    """Delete the temp files that killed saves left in ``folder``; returns their paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if _ORPHAN.match(name):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        log.warning("removed %d temp file(s) of interrupted saves: %s", len(removed), ", ".join(removed))
    return removed


def readable(path: str) -> bool:
    """True if ``path`` is a vlframe training checkpoint that reads back (memory-mapped: only the
    small pickle is read, so pruning stays cheap)."""
    try:
        _sniff(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception:  # noqa: BLE001 - any failure means "not a good checkpoint"
        return False
    return is_training_checkpoint(state)


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
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        if is_training_checkpoint(state):
            return path, state
        log.warning("skipping %s: not a vlframe checkpoint", path)
    return None


def unreadable_report(folder: str) -> str:
    """One line listing every checkpoint of ``folder`` with why it cannot be used."""
    parts = []
    for _, path in list_checkpoints(folder):
        try:
            state = load(path)
            why = "no 'step'/'model': not a vlframe training checkpoint" if not is_training_checkpoint(state) else "ok"
        except CheckpointError as e:
            why = str(e)[len(path) + 2:]
        parts.append(f"{os.path.basename(path)} ({why})")
    return "; ".join(parts)


def prune(folder: str, keep: int, *, current: str | None = None) -> list[str]:
    """Keep the ``keep`` newest readable checkpoints (always ``current``, the one just written);
    delete the other readable ones. Unreadable files are never counted and never deleted."""
    if keep <= 0:
        return []
    kept = [current] if current else []
    removed = []
    for _, path in reversed(list_checkpoints(folder)):
        if path == current:
            continue
        if not readable(path):
            log.warning("not pruning %s: not a readable checkpoint (left for you to inspect)", path)
            continue
        if len(kept) < keep:
            kept.append(path)
        else:
            os.unlink(path)
            removed.append(path)
    return removed


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


_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def load_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], *, source: str) -> WeightsReport:
    """Copy ``weights`` into ``module`` by name (the rest stay as initialised). A shape
    mismatch is an error naming the key and both shapes."""
    own = module.state_dict()
    sub = {k: v for k, v in weights.items() if k in own}
    try:
        # The module's load hooks run first (e.g. a token-type table grown after pretraining
        # makes its new rows from the checkpoint's); what still differs is a size mismatch.
        module.load_state_dict(dict(sub), strict=False)
    except RuntimeError as e:
        m = _SIZE_MISMATCH.search(str(e))
        if m is None:
            raise
        shape = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
        raise ValueError(f"{source}: {m.group(1)}: checkpoint shape {shape(m.group(2))} != "
                         f"model shape {shape(m.group(3))}") from None
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
