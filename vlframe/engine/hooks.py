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
