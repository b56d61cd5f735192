"""Model analysis through fvcore: parameter counts per module of a config's model."""
from __future__ import annotations

from typing import Sequence

import torch


def parameter_table(config_path: str, overrides: Sequence[str] = (), *, max_depth: int = 2) -> str:
    """fvcore's parameter table of the model a config builds (built on the meta device: shapes
    only, so UNITER-large costs no memory)."""
    from fvcore.nn import parameter_count_table

    from vlframe.config import load_and_validate
    from vlframe.registry import MODELS, build, import_custom

    cfg = load_and_validate(config_path, list(overrides))
    import_custom(list(cfg.get("custom_imports") or []))
    with torch.device("meta"):
        model = build(cfg.model, MODELS, where="model")
    return parameter_count_table(model, max_depth=max_depth)
