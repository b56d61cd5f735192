"""Word-region alignment quality: mean OT distance of matched vs mismatched pairs."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlframe.metrics.base import Metric, require
from vlframe.ot.cost import wra_distance
from vlframe.registry import METRICS, OT_SOLVERS, build


@METRICS.register_module(name="ot_distance")
class OTDistance(Metric):
    """``<name>_pos`` / ``<name>_neg``: mean WRA distance (words incl. [CLS]/[SEP] x regions, as
    the original) of matched / mismatched pairs, solved by ``ot_solver`` (IPOT by default,
    whatever the task trains with). Reads the task's ``encoder`` output and ``target`` (1 = matched)."""

    def __init__(self, *, name: str = "ot", ot_solver: dict | None = None, encoder: str = "encoder", target: str = "target"):
        self.solver = build(dict(ot_solver or {"type": "ipot"}), OT_SOLVERS, where="metrics.ot_distance.ot_solver")
        self.encoder, self.target = encoder, target
        super().__init__(names=(f"{name}_pos", f"{name}_neg"))

    def update(self, outputs: Mapping[str, Any]) -> None:
        out, target = require(outputs, self.encoder, self), require(outputs, self.target, self)
        d = wra_distance(self.solver, out.text, out.regions, out.text_mask, out.region_mask).double()
        pos = target == 1
        self.add(self.names[0], d[pos].sum(), pos.sum())
        self.add(self.names[1], d[~pos].sum(), (~pos).sum())
