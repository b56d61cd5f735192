"""The metric contract. A task's validation metrics are config nodes (``tasks.<name>.metrics``)
built from METRICS; the trainer resets them, feeds every validation batch's outputs and computes.

- :class:`Metric` accumulates over a pass: ``update(outputs)`` reads named fields of the dict
  the task's ``evaluate(model, batch)`` returns (e.g. ``logits``, ``target``, ``loss``,
  ``encoder``); ``compute()`` returns named floats, reduced across DDP ranks as sums and counts.
- :class:`DatasetMetric` needs the whole split at once (retrieval scores every text against
  every image): ``evaluate(task=, model=, dataset=, device=)`` returns named floats.

Reported names are ``val/<task>/<name>``; a metric's ``name`` argument sets its name (or prefix).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlframe.metrics.average import Average


class Metric:
    """Base of pass-accumulating metrics: subclasses list their reported ``names`` and call
    ``self.add(name, total, count)`` in ``update``."""

    def __init__(self, *, names: tuple[str, ...]):
        self.names = tuple(names)
        self.reset()

    def reset(self) -> None:
        self._acc = Average(self.names)

    def add(self, name: str, total: Any, count: Any) -> None:
        self._acc.update({name: (float(total), float(count))})

    def update(self, outputs: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define update()")

    def compute(self) -> dict[str, float]:
        return self._acc.compute()


class DatasetMetric:
    """Base of metrics computed over a whole split by scoring it with the task."""

    def evaluate(self, *, task: Any, model: Any, dataset: Any, device: Any) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define evaluate()")


def require(outputs: Mapping[str, Any], key: str, metric: Any) -> Any:
    """``outputs[key]`` or an error naming the metric and what the task does provide."""
    if key not in outputs:
        raise KeyError(
            f"metric {type(metric).__name__}: the task's evaluate() gives no {key!r} "
            f"(it gives: {', '.join(sorted(outputs))})"
        )
    return outputs[key]
