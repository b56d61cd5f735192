"""Masking strategies (registered in MASKERS)."""
from vlframe.masking.maskers import (  # noqa: F401
    IGNORE_INDEX,
    ConditionalMasker,
    JointMasker,
    MaskDraw,
    Masker,
    draw_positions,
    replace_masked_tokens,
)
