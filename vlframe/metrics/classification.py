"""Metrics over per-item predictions: accuracy, loss average, mean of a value."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlframe.metrics.base import Metric, require
from vlframe.registry import METRICS


@METRICS.register_module(name="accuracy")
class Accuracy(Metric):
    """Fraction of items whose prediction equals the target. ``pred`` holds class indices, or
    scores over classes in its last dimension (then its argmax is the prediction)."""

    def __init__(self, *, name: str = "acc", pred: str = "logits", target: str = "target"):
        self.pred, self.target = pred, target
        super().__init__(names=(name,))

    def update(self, outputs: Mapping[str, Any]) -> None:
        pred, target = require(outputs, self.pred, self), require(outputs, self.target, self)
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            pred = pred.argmax(-1)
        self.add(self.names[0], (pred == target).sum(), target.numel())


@METRICS.register_module(name="loss_average")
class LossAverage(Metric):
    """The task's loss averaged over the pass, each batch weighted by the number of items its
    loss averages over (``loss_count``), so the result is the loss of the whole split."""

    def __init__(self, *, name: str = "loss", loss: str = "loss", count: str = "loss_count"):
        self.loss, self.count = loss, count
        super().__init__(names=(name,))

    def update(self, outputs: Mapping[str, Any]) -> None:
        n = float(require(outputs, self.count, self))
        self.add(self.names[0], float(require(outputs, self.loss, self)) * n, n)


@METRICS.register_module(name="mean")
class Mean(Metric):
    """Mean of every element of ``outputs[key]`` over the pass (e.g. per-row KL divergences)."""

    def __init__(self, *, name: str, key: str):
        self.key = key
        super().__init__(names=(name,))

    def update(self, outputs: Mapping[str, Any]) -> None:
        value = require(outputs, self.key, self)
        self.add(self.names[0], value.double().sum(), value.numel())
