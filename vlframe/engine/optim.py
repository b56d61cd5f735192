"""Optimiser and schedule: AdamW without decay on biases and LayerNorm, linear warmup then
linear decay to zero (the original UNITER's recipe)."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases + LayerNorm parameters (no decay).

    Tied weights appear once (module.named_parameters de-duplicates shared tensors).
    """
    no_decay: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
        for name, p in m.named_parameters(recurse=False):
            if name == "bias":
                no_decay.add(id(p))
    decay, plain = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(
    module: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop is several times
    # slower on the CPU, where the 30k-word embedding table dominates a tiny model.
    return torch.optim.AdamW(
        param_groups(module, weight_decay=weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=True
    )


def linear_warmup_decay(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """LR factor: step/warmup up to warmup, then linear to 0 at total_steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
