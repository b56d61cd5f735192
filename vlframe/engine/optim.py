"""Optimiser and schedule: AdamW without decay on biases and LayerNorm, linear warmup then
linear decay to zero (the original UNITER's recipe)."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module, *, weight_decay: float, lr: float | None = None,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Decayed weights and biases + LayerNorm parameters (no decay), each split by learning-rate
    multiplier: ``lr_mult`` maps a parameter-name prefix (``tasks.vqa.head``) to a factor on
    ``lr`` (the original finetunes its heads at 10x); the longest matching prefix wins. A prefix
    that matches no parameter is an error (a typo would otherwise silently do nothing).

    Tied weights appear once (module.named_parameters de-duplicates shared tensors).
    """
    lr_mult = dict(lr_mult or {})
    no_decay: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
        for name, p in m.named_parameters(recurse=False):
            if name == "bias":
                no_decay.add(id(p))
    groups: dict[tuple[bool, float], list] = {}
    used: set[str] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        hits = [k for k in lr_mult if name == k or name.startswith(k + ".")]
        key = max(hits, key=len) if hits else None
        if key is not None:
            used.add(key)
        groups.setdefault((id(p) in no_decay, float(lr_mult[key]) if key else 1.0), []).append(p)
    unused = sorted(set(lr_mult) - used)
    if unused:
        raise ValueError(f"train.lr_mult: {unused} match no parameter (names look like 'model.encoder...', "
                         f"'tasks.<task>.head...')")
    out = []
    for plain in (False, True):
        for (is_plain, mult), params in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if is_plain != plain:
                continue
            g = {"params": params, "weight_decay": 0.0 if plain else weight_decay}
            if lr is not None:
                g["lr"] = lr * mult
            out.append(g)
    return out


def build_optimizer(
    module: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
    lr_mult: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop is several times
    # slower on the CPU, where the 30k-word embedding table dominates a tiny model.
    return torch.optim.AdamW(
        param_groups(module, weight_decay=weight_decay, lr=lr, lr_mult=lr_mult), lr=lr, betas=tuple(betas), eps=eps,
        fused=True,
    )


def linear_warmup_decay(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """LR factor: step/warmup up to warmup, then linear to 0 at total_steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
