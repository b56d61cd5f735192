"""Reusable nn building blocks: the transformer encoder, heads, packing of two modalities."""
from vlframe.modules import heads, losses, packing, transformer  # noqa: F401  (register into MODELS, LOSSES)
