"""Packing two right-padded modalities into one dense sequence per example, and back.

Example ``b`` reads ``[its n_t text tokens, its n_r regions, padding]``: no padding sits between
the text and the regions, so the joint sequence is as short as the longest *sum* (the original
UNITER gathers the same layout). Everything is index arithmetic on the batch: no Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    index: torch.Tensor  # [B, L] position in cat(text, regions) that joint slot l reads
    mask: torch.Tensor  # [B, L] bool, True on real slots
    text_len: torch.Tensor  # [B] real text tokens per example
    num_text: int  # T, padded text length of the inputs
    num_regions: int  # K, padded region count of the inputs


def make_packing(text_mask: torch.Tensor, img_mask: torch.Tensor) -> Packing:
    """Where each joint slot comes from, given [B, T] and [B, K] validity masks (right-padded)."""
    valid = torch.cat([text_mask, img_mask], dim=1)
    counts = valid.sum(1)
    length = int(counts.max()) if valid.numel() else 0
    # A stable sort on "is padding" keeps real entries first, text before regions, in order.
    index = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :length]
    mask = torch.arange(length, device=valid.device)[None, :] < counts[:, None]
    return Packing(index, mask, text_mask.sum(1), text_mask.shape[1], img_mask.shape[1])


def pack(text: torch.Tensor, regions: torch.Tensor, p: Packing) -> torch.Tensor:
    """[B, T, H] and [B, K, H] -> [B, L, H]; padding slots hold arbitrary (masked) values."""
    both = torch.cat([text, regions], dim=1)
    return torch.gather(both, 1, p.index[..., None].expand(-1, -1, both.shape[-1]))


def unpack(seq: torch.Tensor, p: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H] -> text [B, T, H], regions [B, K, H] at their input positions (padding: copies)."""
    b, length, h = seq.shape
    if length == 0:
        z = seq.new_zeros(b, p.num_text, h), seq.new_zeros(b, p.num_regions, h)
        return z
    t_idx = torch.arange(p.num_text, device=seq.device).clamp(max=length - 1)
    text = seq[:, t_idx]
    r_idx = (p.text_len[:, None] + torch.arange(p.num_regions, device=seq.device)[None, :]).clamp(max=length - 1)
    regions = torch.gather(seq, 1, r_idx[..., None].expand(-1, -1, h))
    return text, regions
