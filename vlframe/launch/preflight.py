"""Checks on the submitting host, before anything waits in a queue.

``prepare`` is what every launch path runs first: the whole config loaded, resolved and validated
(unknown keys, types, every component's arguments against its class), then the paths the run
will read checked on this host. A dataset class names its path arguments in ``path_kwargs`` (a
class attribute); a user dataset does the same to get its paths checked.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from vlframe import registry as R
from vlframe.config import ConfigError, config_to_dict, load_and_validate


def _paths_of(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Sequence):
        return [os.fspath(v) for v in value if isinstance(v, (str, os.PathLike))]
    return []


def check_data_paths(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the key and the path of the first input that is missing."""
    data = config_to_dict(cfg)
    for split, node in (data.get("data") or {}).items():
        if not (isinstance(node, Mapping) and "type" in node) or split == "sampler":
            continue
        cls = R.lookup(R.DATASETS, node["type"], where=f"data.{split}.type")
        for key in getattr(cls, "path_kwargs", ()):
            for path in _paths_of(node.get(key)):
                if not os.path.exists(path):
                    raise ConfigError(f"data.{split}.{key}: not found on this host: {os.path.abspath(path)}")


def check_weight_paths(cfg: DictConfig) -> None:
    """Every weights file the config names (``train.init_from``, ``model.pretrained``, an explicit
    ``train.resume``) exists and reads as weights; a CheckpointError names the key and the file."""
    from vlframe.engine import checkpoint as ckpt
    from vlframe.engine.resume import check_weight_files

    check_weight_files(cfg)
    resume = str(cfg.train.resume)
    if resume not in ("auto", "never", "none", ""):
        ckpt.check_file(resume, what="train.resume")


def prepare(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config (schema defaults filled in) with its weights files, then its data
    paths, checked (weights first: they are read before the data)."""
    cfg = load_and_validate(config_path, list(overrides))
    check_weight_paths(cfg)
    check_data_paths(cfg)
    return cfg
