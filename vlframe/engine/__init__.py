"""Trainer loop, hooks, checkpointing, AMP, distributed, logging."""
from vlframe.engine import hooks  # noqa: F401  (registers into HOOKS)
