"""Masking strategies for MLM / MRM, behind one interface.

A masker decides *which* words and regions are masked; the task decides what masking means
(BERT's 80/10/10 replacement for words via :func:`replace_masked_tokens`, feature zeroing plus
the mask embedding for regions, done by the model). Only real entries are ever drawn: padding,
[CLS] and [SEP] are not in the ``maskable`` masks the caller passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlframe.registry import MASKERS

IGNORE_INDEX = -100  # label value of positions that carry no MLM loss (torch's CE default)


@dataclass
class MaskDraw:
    text: torch.Tensor  # [B, T] bool, words to mask
    regions: torch.Tensor  # [B, K] bool, regions to mask


def draw_positions(maskable: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each maskable entry with probability ``prob``; at least one per row that has any."""
    scores = torch.rand(maskable.shape, generator=generator)
    chosen = (scores < prob) & maskable
    empty = ~chosen.any(1) & maskable.any(1)
    if empty.any():
        # The row's maskable entry with the smallest score: uniform among maskable entries.
        forced = scores.masked_fill(~maskable, 2.0).argmin(1)
        chosen[empty, forced[empty]] = True
    return chosen


class Masker:
    """Base: ``masker(target=..., text_maskable=..., region_maskable=..., generator=...)``."""

    def __init__(self, *, text_prob: float = 0.15, region_prob: float = 0.15):
        for name, p in (("text_prob", text_prob), ("region_prob", region_prob)):
            if not 0.0 < p <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {p}")
        self.text_prob = text_prob
        self.region_prob = region_prob

    def modalities(self, target: str) -> tuple[bool, bool]:
        raise NotImplementedError  # abstract: which modalities a batch for `target` masks

    def __call__(
        self,
        *,
        target: str,
        text_maskable: torch.Tensor,
        region_maskable: torch.Tensor,
        generator: torch.Generator,
    ) -> MaskDraw:
        if target not in ("text", "regions"):
            raise ValueError(f"masking target must be 'text' or 'regions', got {target!r}")
        do_text, do_regions = self.modalities(target)
        text = draw_positions(text_maskable, self.text_prob, generator) if do_text else torch.zeros_like(text_maskable)
        regions = (
            draw_positions(region_maskable, self.region_prob, generator)
            if do_regions
            else torch.zeros_like(region_maskable)
        )
        return MaskDraw(text=text, regions=regions)


@MASKERS.register_module(name="conditional")
class ConditionalMasker(Masker):
    """UNITER's conditional masking: only the task's own modality is masked; the other is seen whole."""

    def modalities(self, target: str) -> tuple[bool, bool]:
        return target == "text", target == "regions"


@MASKERS.register_module(name="joint")
class JointMasker(Masker):
    """Joint random masking (the paper's ablation L12): words and regions masked in the same batch."""

    def modalities(self, target: str) -> tuple[bool, bool]:
        return True, True


def replace_masked_tokens(
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    *,
    mask_id: int,
    random_range: tuple[int, int],
    generator: torch.Generator,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of the masked words: 80% [MASK], 10% a random word, 10% unchanged.

    Returns (corrupted ids, labels) with labels = original id at masked positions, IGNORE_INDEX
    elsewhere. ``random_range`` [low, high) excludes special and unused ids.
    """
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = masked & (u < mask_frac)
    to_random = masked & (u >= mask_frac) & (u < mask_frac + random_frac)
    rand_ids = torch.randint(random_range[0], random_range[1], input_ids.shape, generator=generator)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, rand_ids, out)
    return out, labels
