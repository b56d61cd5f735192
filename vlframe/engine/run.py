"""Entry point behind ``tools/train.py``: load + validate the config, then train."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from vlframe.config import load_and_validate


def default_work_dir(config_path: str) -> str:
    return os.path.join("work_dirs", os.path.splitext(os.path.basename(config_path))[0])


def train(config_path: str, overrides: Sequence[str] = (), *, work_dir: str | None = None) -> dict[str, float]:
    """Train as ``config_path`` (+ ``key=value`` overrides) says; returns the last validation metrics."""
    from vlframe.engine.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_and_validate(config_path, list(overrides))
    work_dir = work_dir or cfg.get("work_dir") or default_work_dir(config_path)
    return Trainer(cfg, work_dir=work_dir).train()
