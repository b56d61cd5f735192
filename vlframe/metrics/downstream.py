"""Metrics of the downstream benchmarks: VQA soft score, NLVR2 consistency, VCR accuracies (with
the holistic Q->AR), referring-expression accuracy on ground-truth and on detected regions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlframe.metrics.base import Metric, require
from vlframe.registry import METRICS


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of boxes [N, 4] (x1, y1, x2, y2)."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


@METRICS.register_module(name="vqa_score")
class VQAScore(Metric):
    """Official VQA accuracy: the soft score (min(1, humans who gave it / 3), averaged over the
    leave-one-out subsets, as stored in the target) of the top-scoring answer, averaged over
    questions. Reads ``logits`` [B, A] and ``target`` [B, A] soft scores."""

    def __init__(self, *, name: str = "vqa_score", pred: str = "logits", target: str = "target"):
        self.pred, self.target = pred, target
        super().__init__(names=(name,))

    def update(self, outputs: Mapping[str, Any]) -> None:
        logits, target = require(outputs, self.pred, self), require(outputs, self.target, self)
        got = target.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
        self.add(self.names[0], got.double().sum(), got.numel())


def nlvr2_consistency_key(identifier: str) -> str:
    """NLVR2 groups the image pairs of one sentence: ``split-set-pair-sent`` -> ``split-set-sent``."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    return "-".join(parts[:-2] + parts[-1:])


@METRICS.register_module(name="nlvr2_consistency")
class NLVR2Consistency(Metric):
    """Share of sentences whose every image pair is predicted right (NLVR2's consistency). Reads
    ``correct`` [B] bool and ``identifier`` (list of str). Groups are complete only after the
    whole split: under DDP a sentence's pairs may sit on several ranks, so ``compute`` gathers
    every rank's per-sentence verdicts and merges them (a sentence is consistent only if it is
    on every rank that holds some of its pairs)."""

    def __init__(self, *, name: str = "consistency", correct: str = "correct", identifier: str = "identifier"):
        self.correct, self.identifier = correct, identifier
        super().__init__(names=(name,))

    def reset(self) -> None:
        super().reset()
        self.groups: dict[str, bool] = {}

    def update(self, outputs: Mapping[str, Any]) -> None:
        correct = require(outputs, self.correct, self)
        for ident, ok in zip(require(outputs, self.identifier, self), correct.tolist()):
            key = nlvr2_consistency_key(ident)
            self.groups[key] = self.groups.get(key, True) and bool(ok)

    def compute(self) -> dict[str, float]:
        from vlframe.engine import distributed as D

        merged: dict[str, bool] = {}
        for groups in D.all_gather(self.groups):
            for key, ok in groups.items():
                merged[key] = merged.get(key, True) and ok
        # every rank now holds the whole split's verdicts: no further all-reduce
        return {self.names[0]: sum(merged.values()) / len(merged) if merged else float("nan")}


@METRICS.register_module(name="vcr_accuracy")
class VCRAccuracy(Metric):
    """``q2a``, ``qa2r`` and the holistic ``q2ar`` (right answer and right rationale for the same
    question; the rationale is scored given the answer, which is the predicted one whenever the
    answer is right). Reads ``q2a_scores`` / ``qa2r_scores`` [B, 4] and ``answer_label`` /
    ``rationale_label`` [B]."""

    def __init__(self, *, prefix: str = ""):
        super().__init__(names=tuple(prefix + n for n in ("q2a", "qa2r", "q2ar")))

    def update(self, outputs: Mapping[str, Any]) -> None:
        a = require(outputs, "q2a_scores", self).argmax(-1) == require(outputs, "answer_label", self)
        r = require(outputs, "qa2r_scores", self).argmax(-1) == require(outputs, "rationale_label", self)
        n = a.numel()
        for name, hits in zip(self.names, (a, r, a & r)):
            self.add(name, hits.sum(), n)


@METRICS.register_module(name="refexp_accuracy")
class RefExpAccuracy(Metric):
    """``acc_gt``: the predicted region among the ground-truth candidates is the target (counted
    only where the data gives ground-truth candidates); ``acc_det``: the predicted detected
    region's box has IoU >= ``iou`` with the target box. Reads ``pred_gt``, ``pred_det`` [B],
    ``target_region`` [B], ``has_gt`` [B] bool, ``pred_box`` / ``target_box`` [B, 4]."""

    def __init__(self, *, iou: float = 0.5, gt: bool = True, prefix: str = ""):
        self.iou, self.gt = iou, gt
        super().__init__(names=((prefix + "acc_gt",) if gt else ()) + (prefix + "acc_det",))

    def update(self, outputs: Mapping[str, Any]) -> None:
        if self.gt:  # data without ground-truth candidates: gt=False
            has_gt = require(outputs, "has_gt", self)
            hit_gt = (require(outputs, "pred_gt", self) == require(outputs, "target_region", self)) & has_gt
            self.add(self.names[0], hit_gt.sum(), has_gt.sum())
        ious = box_iou(require(outputs, "pred_box", self), require(outputs, "target_box", self))
        self.add(self.names[-1], (ious >= self.iou).sum(), ious.numel())
