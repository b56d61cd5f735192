"""Entry point behind ``tools/train.py``: load + validate the config, then train."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from vlframe.config import load_and_validate


def one_line_error(e: BaseException) -> bool:
    """Whether ``e`` is reported as one line (config, data and checkpoint errors, raised to be
    read) rather than with its traceback (anything raised inside a user's component, see
    ``registry.build``, unless it is one of vlframe's own error types or a missing file)."""
    from vlframe.config import ConfigError
    from vlframe.data.importers.common import DataFormatError
    from vlframe.engine.checkpoint import CheckpointError

    if getattr(e, "vlframe_component", None):
        return isinstance(e, (ConfigError, DataFormatError, CheckpointError, FileNotFoundError))
    return True


def default_work_dir(config_path: str) -> str:
    return os.path.join("work_dirs", os.path.splitext(os.path.basename(config_path))[0])


def train(config_path: str, overrides: Sequence[str] = (), *, work_dir: str | None = None) -> dict[str, float]:
    """Train as ``config_path`` (+ ``key=value`` overrides) says; returns the last validation metrics."""
    from vlframe.engine.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_and_validate(config_path, list(overrides))
    work_dir = work_dir or cfg.get("work_dir") or default_work_dir(config_path)
    return Trainer(cfg, work_dir=work_dir).train()
