"""Reusable nn building blocks: the transformer encoder, heads, packing of two modalities."""
from vlframe.modules import heads, packing, transformer  # noqa: F401  (registers into MODELS)
