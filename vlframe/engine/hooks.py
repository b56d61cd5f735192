"""Hooks see the trainer at fixed points and may keep state that goes into the checkpoint.

A user hook is one file with one ``@HOOKS.register_module()`` class and a config entry
``hooks: [{type: MyHook, ...}]``.
"""
from __future__ import annotations

from typing import Any

from vlframe.registry import HOOKS


class Hook:
    def before_train(self, trainer: Any) -> None: ...

    def after_step(self, trainer: Any, task: str, logs: dict[str, float]) -> None: ...

    def after_validation(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def after_checkpoint(self, trainer: Any, path: str) -> None: ...

    def after_train(self, trainer: Any) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@HOOKS.register_module(name="TaskCounter")
class TaskCounter(Hook):
    """Counts the steps each task trained (kept across resumes): a check on the mix ratios."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def after_step(self, trainer: Any, task: str, logs: dict[str, float]) -> None:
        self.counts[task] = self.counts.get(task, 0) + 1

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = dict(state.get("counts", {}))


class KeepBestCheckpoint(Hook):
    """``train.keep_best``: after each validation that improves ``metric`` (``mode`` max or min),
    the whole training state is written to ``checkpoints/best.pt``; pruning never touches it.
    Built by the trainer from its config keys, not a registered hook."""

    def __init__(self, *, metric: str, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"train.keep_best_mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_step: int | None = None

    def after_validation(self, trainer: Any, metrics: dict[str, float]) -> None:
        import math
        import os

        from vlframe.engine import checkpoint as ckpt
        from vlframe.engine import distributed as D

        if self.metric not in metrics:
            raise ValueError(f"train.keep_best: validation gave no {self.metric!r}; it gave: {', '.join(sorted(metrics))}")
        value = float(metrics[self.metric])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if math.isnan(value) or not better:
            return
        self.best, self.best_step = value, int(trainer.step)
        if D.is_main():
            ckpt.atomic_save(trainer.state_dict(), os.path.join(trainer.ckpt_dir, ckpt.BEST_NAME))

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
