"""A user component in one file: a masking strategy that masks whole spans of words.

Nothing in vlframe is edited: the decorator registers the class, and a config brings this module
in with ``custom_imports: [examples.my_project.span_masker]`` and names it
``masker: {type: span, ...}``.
"""
import torch

from vlframe.masking import Masker
from vlframe.registry import MASKERS


@MASKERS.register_module(name="span")
class SpanMasker(Masker):
    """Masks one contiguous span of ``span`` words per example (text); regions as conditional."""

    def __init__(self, *, span: int = 3, text_prob: float = 0.15, region_prob: float = 0.15):
        super().__init__(text_prob=text_prob, region_prob=region_prob)
        self.span = span

    def modalities(self, target: str) -> tuple[bool, bool]:
        return target == "text", target == "regions"

    def __call__(self, *, target, text_maskable, region_maskable, generator):
        draw = super().__call__(
            target=target, text_maskable=text_maskable, region_maskable=region_maskable, generator=generator
        )
        if target != "text":
            return draw
        n = text_maskable.sum(1)  # maskable words are contiguous: [CLS] w1 .. wn [SEP]
        span = torch.clamp(n, max=self.span)
        start = 1 + (torch.rand(n.shape, generator=generator) * (n - span + 1)).long()
        pos = torch.arange(text_maskable.shape[1])[None, :]
        draw.text = (pos >= start[:, None]) & (pos < (start + span)[:, None]) & text_maskable
        return draw
