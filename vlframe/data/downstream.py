"""One dataset layer for the downstream tasks: a region store plus a task text store whose
records carry the task's fields in ``extra``, as the importers (:mod:`vlframe.data.importers.tasks`)
and the synthetic task sets (:mod:`vlframe.data.synthetic_tasks`) both write them.

``TaskDataset`` ("task_text") checks every record before training starts:

* the task's fields (:data:`TASK_FIELDS`) are present: a record without them fails naming the
  store and the txt_id;
* every image a record needs (its own; NLVR2's second one) has features: otherwise
  :class:`~vlframe.data.stores.DataQualityError` naming the store, the record and the image, or,
  with ``skip_bad=True``, the record is dropped and counted (``skipped['missing_image']``, logged);
* VQA: a question with no answer in the vocabulary (the importer leaves such answers out) is kept
  - it still costs the model its score - and counted in ``noted['no_answer_in_vocab']`` (logged).

Examples carry the fields in ``Example.extra``; tasks read them in their ``collate``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlframe.data.dataset import ImageTextDataset
from vlframe.data.stores import DataQualityError, RegionStore, TextStore
from vlframe.data.vqa_vocab import load_answer_vocab
from vlframe.registry import DATASETS

__all__ = ["TASK_FIELDS", "TaskDataset", "SyntheticTaskDataset"]

logger = logging.getLogger(__name__)

#: extra fields every record of a labelled store of each kind must have.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "vqa": ("question_id", "answers", "scores"),
    "nlvr2": ("img_ids", "label", "identifier"),
    "snli_ve": ("label",),
    "refcoco": ("target_box",),
    "vcr": ("answer_choices", "rationale_choices", "answer_label", "rationale_label"),
}
VQA_VOCAB_FILE = "answer_vocab.json"


def _images_of(kind: str, img_id: str, extra: dict[str, Any]) -> list[str]:
    return list(extra["img_ids"]) if kind == "nlvr2" else [img_id]


@DATASETS.register_module(name="task_text")
class TaskDataset(ImageTextDataset):
    """Examples of a downstream task (``task``: one of :data:`TASK_FIELDS`) over ``region_store``
    and ``text_store``. VQA reads its answer vocabulary from ``answer_vocab`` (default: the
    ``answer_vocab.json`` the importer saved beside the store). Region selection and text
    truncation are :class:`~vlframe.data.dataset.ImageTextDataset`'s."""

    def __init__(self, *, task: str, region_store: str, text_store: str, answer_vocab: str | None = None,
                 max_text_len: int = 60, conf_threshold: float | None = 0.2, min_regions: int = 10,
                 max_regions: int = 100, fixed_regions: int | None = None, feat_dim: int | None = None,
                 skip_bad: bool = False, text: str = "record", soft_labels: bool = False):
        if task not in TASK_FIELDS:
            raise ValueError(f"task_text dataset: task must be one of {sorted(TASK_FIELDS)}, got {task!r}")
        if text not in ("record", "vcr_qar") or (text == "vcr_qar" and task != "vcr"):
            raise ValueError(f"task_text dataset: text must be 'record' or (task vcr) 'vcr_qar', got {text!r}")
        self.task = task
        # vcr_qar: the text is question [SEP] right answer [SEP] right rationale (VCR's second-stage
        # pretraining with MLM / MRFR / MRC-kl reads these, as the original)
        self.text_mode = text
        text_store = os.fspath(text_store)
        texts = TextStore(text_store)
        regions = RegionStore(region_store, conf_threshold=conf_threshold, min_regions=min_regions,
                              max_regions=max_regions, fixed_regions=fixed_regions)
        keep, missing, self.noted = [], [], {}
        for tid in texts.ids():
            rec = texts.get(tid)
            absent = [k for k in TASK_FIELDS[task] if k not in rec.extra]
            if absent:
                raise ValueError(f"task_text dataset ({task}): text store {text_store}: record {tid!r} has no "
                                 f"field(s) {absent} in extra (is it a {task} store?)")
            lost = [img for img in _images_of(task, rec.img_id, rec.extra) if img not in regions]
            if lost:
                missing.append((tid, lost[0]))
                continue
            if task == "vqa" and not rec.extra["answers"]:
                self.noted["no_answer_in_vocab"] = self.noted.get("no_answer_in_vocab", 0) + 1
            keep.append(tid)
        self.skipped_records = {}
        if missing:
            tid, img = missing[0]
            if not skip_bad:
                raise DataQualityError(
                    f"task_text dataset ({task}): text store {text_store}: record {tid!r} needs image {img!r}, which "
                    f"has no features in region store {regions.path}; {len(missing)} such record(s) in all "
                    f"(skip_bad=True drops them with a count)", path=text_store, key=tid, reason="missing_image")
            self.skipped_records["missing_image"] = len(missing)
            logger.warning("task_text dataset (%s): skip_bad: dropped %d of %d records whose image has no features "
                           "in %s (first: %s needs %s)", text_store, len(missing), len(texts), regions.path, tid, img)
        for reason, n in self.noted.items():
            logger.warning("task_text dataset (%s): %d of %d questions have no answer in the answer vocabulary (%s): "
                           "kept, they score 0", text_store, n, len(keep), reason)
        if not keep:
            raise ValueError(f"task_text dataset ({task}): no record left in {text_store}")
        super().__init__(region_store=region_store, text_store=text_store, max_text_len=max_text_len,
                         conf_threshold=conf_threshold, min_regions=min_regions, max_regions=max_regions,
                         fixed_regions=fixed_regions, feat_dim=feat_dim, txt_ids=keep, soft_labels=soft_labels,
                         skip_bad=skip_bad)
        if self.text_mode == "vcr_qar":
            raw = [len(self._text(i)[1]) for i in range(len(self))]
            self._text_len = np.minimum(np.array(raw, dtype=np.int64), self.max_text_len)
        if self.skipped_records:
            self.skipped = {**getattr(self, "skipped", {}), **self.skipped_records}
        self.answer_vocab: list[str] | None = None
        if task == "vqa":
            path = answer_vocab or os.path.join(text_store, VQA_VOCAB_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"task_text dataset (vqa): no answer vocabulary at {path} (set answer_vocab)")
            self.answer_vocab = load_answer_vocab(path)

    def _text(self, i: int):
        rec, ids = super()._text(i)
        if self.text_mode != "vcr_qar":
            return rec, ids
        x = rec.extra
        parts = [ids] + [torch.tensor(list(x[k][int(x[lab])]) + [self._sep], dtype=torch.long)
                         for k, lab in (("answer_choices", "answer_label"), ("rationale_choices", "rationale_label"))]
        joined = torch.cat(parts)
        if len(joined) > self.max_text_len:  # cut the end, keep the final [SEP]
            joined = torch.cat([joined[: self.max_text_len - 1], joined[-1:]])
        return rec, joined

    @property
    def num_answers(self) -> int | None:
        return None if self.answer_vocab is None else len(self.answer_vocab)


@DATASETS.register_module(name="synthetic_task")
class SyntheticTaskDataset(TaskDataset):
    """A downstream task set of the synthetic world (generated under ``cache_dir`` on first use,
    then the task sets of its in-domain scenes, see :mod:`vlframe.data.synthetic_tasks`).
    ``oracle()`` gives the task's oracle and chance scores on the val split."""

    def __init__(self, *, task: str, cache_dir: str = ".cache/vlframe", split: str = "train", seed: int = 0,
                 num_images: int = 2000, val_fraction: float = 0.1, feat_dim: int = 256,
                 captions_per_image: int = 5, domains: Sequence[str] = ("in", "out"), out_fraction: float = 0.3,
                 regions_range: Sequence[int] = (10, 40), dup_prob: float = 0.5, max_text_len: int = 60,
                 conf_threshold: float | None = 0.2, min_regions: int = 10, max_regions: int = 100,
                 text: str = "record", soft_labels: bool = False):
        from vlframe.data.synthetic import ensure_world
        from vlframe.data.synthetic_tasks import ensure_task_sets, task_store

        if split not in ("train", "val"):
            raise ValueError(f"synthetic_task dataset: split must be 'train' or 'val', got {split!r}")
        self.world_dir = ensure_world(cache_dir, seed=seed, num_images=num_images, val_fraction=val_fraction,
                                      feat_dim=feat_dim, captions_per_image=captions_per_image,
                                      domains=tuple(domains), out_fraction=out_fraction,
                                      regions_range=tuple(regions_range), dup_prob=dup_prob)
        ensure_task_sets(self.world_dir)
        self.split = split
        super().__init__(task=task, region_store=os.path.join(self.world_dir, "regions"),
                         text_store=task_store(self.world_dir, task, split), max_text_len=max_text_len,
                         conf_threshold=conf_threshold, min_regions=min_regions, max_regions=max_regions,
                         feat_dim=feat_dim, text=text, soft_labels=soft_labels)

    def oracle(self) -> dict[str, Any]:
        from vlframe.data.synthetic_tasks import load_oracle

        return load_oracle(self.world_dir)[self.task]

