"""Finetuning tasks of the paper's six benchmarks: VQA, classification (SNLI-VE), NLVR2 (triplet,
pair, pair-biattn), VCR (Q->A and QA->R together), referring expressions, image-text retrieval.

Each reads its fields from ``Example.extra`` (the task stores of :mod:`vlframe.data.downstream`),
builds its head from a config node (the generic heads of :mod:`vlframe.modules.heads`), its loss
from LOSSES and reports through its metrics. Extra input segments (NLVR2's second image, VCR's
answer and rationale) get their own token types through ``model.add_token_type`` (the contract).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlframe.data.batch import Example, VLBatch, collate, pad_stack
from vlframe.metrics.downstream import box_iou
from vlframe.models import VLEncoder
from vlframe.registry import TASKS
from vlframe.tasks.base import DataInfo, Task, TaskOutput, build_loss

__all__ = ["VQATask", "ClassificationTask", "NLVR2Task", "VCRTask", "RefExpTask", "RetrievalTask"]


def _typed(examples: list[Example], *, text_types: list[torch.Tensor] | None = None,
           region_types: list[torch.Tensor] | None = None) -> VLBatch:
    batch = collate(examples, soft_labels=False)
    if text_types is not None:
        batch.token_type_ids = pad_stack(text_types, 0)[0]
    if region_types is not None:
        batch.img_type_ids = pad_stack(region_types, 1)[0]
    return batch


class _HeadTask(Task):
    """A task with one head (``head`` node, ``default_head``) and one loss (``loss``, ``default_loss``)."""

    default_head: dict = {}
    default_loss: dict = {"type": "cross_entropy"}

    def __init__(self, *, head: dict | None = None, loss: dict | None = None, metrics: list[dict] | None = None):
        super().__init__(metrics=metrics)
        self.head_cfg = dict(head) if head is not None else dict(self.default_head)
        self.loss_fn = build_loss(loss, self.default_loss, where=f"{type(self).__name__}.loss")

    def _logs(self, loss: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss.detach(), **{k: v.detach() for k, v in extra.items()}}


# ------------------------------------------------------------------------------------------ VQA


@TASKS.register_module(name="vqa")
class VQATask(_HeadTask):
    """VQA as multi-label classification over the answer vocabulary: pooled -> MLP ->
    [B, answers], BCE on the soft scores scaled by the number of answers (the original)."""

    default_head = {"type": "PooledClassifierHead"}
    default_loss = {"type": "bce_soft"}
    default_metrics = ({"type": "vqa_score"}, {"type": "loss_average"})

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        if not info.answer_vocab:
            raise ValueError(f"{self.where}: the dataset has no answer vocabulary (use a 'task_text' dataset of task vqa)")
        self.answers = list(info.answer_vocab)
        self.head = self.make_head(self.head_cfg, model=model,
                                   sizes={"hidden_size": model.spec.pooled_dim, "num_classes": len(self.answers)})

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        batch = collate(examples, soft_labels=False)
        target = torch.zeros(len(examples), len(self.answers))
        for i, e in enumerate(examples):
            labels = list(e.extra.get("answers", []))
            if labels and max(labels) >= len(self.answers):
                raise ValueError(f"{self.where}: record {e.txt_id!r} has answer label {max(labels)}, but the answer "
                                 f"vocabulary has {len(self.answers)} answers (another vocabulary's labels?)")
            if labels:
                target[i, torch.tensor(labels)] = torch.tensor(e.extra["scores"], dtype=torch.float32)
        batch.targets["scores"] = target
        batch.targets["question_id"] = [e.extra.get("question_id", e.txt_id) for e in examples]
        return batch

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        logits = self.head(model(batch))
        target = batch.targets["scores"]
        loss = self.loss_fn(logits, target)
        score = target.gather(1, logits.detach().argmax(-1, keepdim=True)).mean()
        return TaskOutput(loss, self._logs(loss, score=score), {"logits": logits})

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        res = self.forward(model, batch)
        return {"logits": res.outputs["logits"], "target": batch.targets["scores"], "loss": res.loss,
                "loss_count": batch.size, "question_id": batch.targets["question_id"]}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        # The official VQA submission: [{"question_id": int, "answer": str}]
        best = outputs["logits"].argmax(-1).tolist()
        return [{"question_id": int(q), "answer": self.answers[a]} for q, a in zip(outputs["question_id"], best)]


# ------------------------------------------------------------------------------ classification


@TASKS.register_module(name="classification")
class ClassificationTask(_HeadTask):
    """Classification of the pair (SNLI-VE: 3 classes): pooled -> MLP -> [B, num_classes], CE.
    The label is ``extra[label_key]``; ``label_names`` and ``id_key`` shape the predictions."""

    default_head = {"type": "PooledClassifierHead"}
    default_metrics = ({"type": "accuracy"}, {"type": "loss_average"})

    def __init__(self, *, num_classes: int, label_key: str = "label", id_key: str | None = None,
                 label_names: list[str] | None = None, head: dict | None = None, loss: dict | None = None,
                 metrics: list[dict] | None = None):
        super().__init__(head=head, loss=loss, metrics=metrics)
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(f"classification: {len(label_names)} label_names for num_classes={num_classes}")
        self.num_classes, self.label_key, self.id_key = int(num_classes), label_key, id_key
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.head = self.make_head(self.head_cfg, model=model,
                                   sizes={"hidden_size": model.spec.pooled_dim, "num_classes": self.num_classes})

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        batch = collate(examples, soft_labels=False)
        labels = []
        for e in examples:
            y = e.extra.get(self.label_key)
            if not isinstance(y, int) or not 0 <= y < self.num_classes:
                raise ValueError(f"{self.where}: record {e.txt_id!r} has {self.label_key}={y!r}, expected a class in "
                                 f"[0, {self.num_classes})")
            labels.append(y)
        batch.targets["label"] = torch.tensor(labels)
        batch.targets["id"] = [e.extra.get(self.id_key, e.txt_id) if self.id_key else e.txt_id for e in examples]
        return batch

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        logits = self.head(model(batch))
        target = batch.targets["label"]
        loss = self.loss_fn(logits, target)
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return TaskOutput(loss, self._logs(loss, acc=acc), {"logits": logits})

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        res = self.forward(model, batch)
        return {"logits": res.outputs["logits"], "target": batch.targets["label"], "loss": res.loss,
                "loss_count": batch.size, "id": batch.targets["id"]}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        key = self.id_key or "id"
        return [{key: i, "label": self.label_names[p]} for i, p in zip(outputs["id"], outputs["logits"].argmax(-1).tolist())]


# ---------------------------------------------------------------------------------------- NLVR2

_NLVR2_HEADS = {
    "triplet": {"type": "PooledClassifierHead"},
    "pair": {"type": "PairScorerHead", "fusion": "pair"},
    "biattn": {"type": "PairScorerHead", "fusion": "biattn"},
}


@TASKS.register_module(name="nlvr2")
class NLVR2Task(_HeadTask):
    """NLVR2 in the paper's three settings. ``triplet``: one sequence [text; left regions; right
    regions] -> pooled classifier. ``pair`` / ``biattn``: two sequences (text, left) and (text,
    right) -> a pair head. The right image's regions get a new token type initialised from the
    image type (the original), in every setting. True/false: CE over 2 classes."""

    default_metrics = ({"type": "accuracy"}, {"type": "nlvr2_consistency"}, {"type": "loss_average"})

    def __init__(self, *, setting: str = "pair", head: dict | None = None, loss: dict | None = None,
                 metrics: list[dict] | None = None):
        if setting not in _NLVR2_HEADS:
            raise ValueError(f"nlvr2: setting must be one of {sorted(_NLVR2_HEADS)}, got {setting!r}")
        self.default_head = _NLVR2_HEADS[setting]
        super().__init__(head=head, loss=loss, metrics=metrics)
        self.setting = setting

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.right_type = model.add_token_type("second_image", like="image")
        self.head = self.make_head(self.head_cfg, model=model, sizes={"hidden_size": model.spec.pooled_dim, "num_classes": 2})

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        out, types, labels = [], [], []
        for e in examples:
            left, right = e.extra["img_ids"][:2]
            if e.img_id != left:
                raise ValueError(f"{self.where}: record {e.txt_id!r} has img_id {e.img_id!r} but img_ids[0] {left!r}")
            feat, pos, _ = dataset.image_example(right)
            k0, k1 = e.img_feat.shape[0], feat.shape[0]
            t0 = torch.ones(k0, dtype=torch.long)
            t1 = torch.full((k1,), self.right_type, dtype=torch.long)
            if self.setting == "triplet":
                out.append(Example(e.txt_id, e.img_id, e.input_ids, torch.cat([e.img_feat, feat]),
                                   torch.cat([e.img_pos, pos]), None, e.extra))
                types.append(torch.cat([t0, t1]))
            else:  # two sequences per example, consecutive (the pair heads read them so)
                out += [Example(e.txt_id, left, e.input_ids, e.img_feat, e.img_pos, None, e.extra),
                        Example(e.txt_id, right, e.input_ids, feat, pos, None, e.extra)]
                types += [t0, t1]
            labels.append(int(e.extra["label"]))
        batch = _typed(out, region_types=types)
        batch.targets["label"] = torch.tensor(labels)
        batch.targets["identifier"] = [str(e.extra["identifier"]) for e in examples]
        return batch

    def loss_count(self, batch: VLBatch) -> int:
        return int(batch.targets["label"].numel())

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        logits = self.head(model(batch))
        target = batch.targets["label"]
        loss = self.loss_fn(logits, target)
        return TaskOutput(loss, self._logs(loss, acc=(logits.detach().argmax(-1) == target).float().mean()),
                          {"logits": logits})

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        res = self.forward(model, batch)
        logits, target = res.outputs["logits"], batch.targets["label"]
        return {"logits": logits, "target": target, "correct": logits.argmax(-1) == target, "loss": res.loss,
                "loss_count": self.loss_count(batch), "identifier": batch.targets["identifier"]}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        # The official NLVR2 prediction file: one "identifier,prediction" line, True / False.
        return [{"identifier": i, "prediction": "True" if p == 1 else "False"}
                for i, p in zip(outputs["identifier"], outputs["logits"].argmax(-1).tolist())]


# ------------------------------------------------------------------------------------------ VCR


@TASKS.register_module(name="vcr")
class VCRTask(_HeadTask):
    """VCR's Q->A and QA->R trained together (the paper): per question, 4 sequences [question;
    answer_i] and 4 [question; right answer; rationale_j]; question tokens have type 0, answer
    and rationale new types initialised from the text type (the original), regions type 1. A
    per-candidate head gives 2 logits ("wrong", "right") per sequence, CE over them; candidates
    are ranked by the "right" logit. Metrics: q2a, qa2r and the holistic q2ar.

    ``rationales='each'`` also scores the rationales after each of the 4 answers (16 QA->R
    sequences per question instead of 4: the gold answer is unknown on the test split) and writes
    the leaderboard CSV (``annot_id, answer_0..3, rationale_conditioned_on_a{i}_{j}``); the loss,
    the metrics and so training are the same as with ``'gold'`` (they use the right answer's
    group only)."""

    default_head = {"type": "CandidateScorerHead"}
    default_metrics = ({"type": "vcr_accuracy"}, {"type": "loss_average"})
    num_candidates = 4

    def __init__(self, *, rationales: str = "gold", head: dict | None = None, loss: dict | None = None,
                 metrics: list[dict] | None = None):
        super().__init__(head=head, loss=loss, metrics=metrics)
        if rationales not in ("gold", "each"):
            raise ValueError(f"vcr: rationales must be 'gold' or 'each', got {rationales!r}")
        self.rationales = rationales

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.answer_type = model.add_token_type("vcr_answer", like="text")
        self.rationale_type = model.add_token_type("vcr_rationale", like="text")
        self.sep = int(info.special_ids["sep"])
        self.head = self.make_head(self.head_cfg, model=model,
                                   sizes={"hidden_size": model.spec.pooled_dim, "num_candidates": self.num_candidates})

    def _sequence(self, q: torch.Tensor, parts: list[tuple[list[int], int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, types = [q], [torch.zeros(len(q), dtype=torch.long)]
        for tokens, t in parts:
            seg = torch.tensor(list(tokens) + [self.sep], dtype=torch.long)
            ids.append(seg)
            types.append(torch.full((len(seg),), t, dtype=torch.long))
        ids, types = torch.cat(ids), torch.cat(types)
        if len(ids) > max_len:  # cut the end, keep the final [SEP]
            ids, types = torch.cat([ids[: max_len - 1], ids[-1:]]), torch.cat([types[: max_len - 1], types[-1:]])
        return ids, types

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        max_len = int(getattr(dataset, "max_text_len", 512))
        out, types, a_lab, r_lab = [], [], [], []
        for e in examples:
            x = e.extra
            answers, rationales = x["answer_choices"], x["rationale_choices"]
            if len(answers) != self.num_candidates or len(rationales) != self.num_candidates:
                raise ValueError(f"{self.where}: record {e.txt_id!r} has {len(answers)} answers and {len(rationales)} "
                                 f"rationales, expected {self.num_candidates} each")
            given = answers if self.rationales == "each" else [answers[int(x["answer_label"])]]
            seqs = [[(a, self.answer_type)] for a in answers] + [[(g, self.answer_type), (r, self.rationale_type)]
                                                                  for g in given for r in rationales]
            for parts in seqs:
                ids, t = self._sequence(e.input_ids, parts, max_len)
                out.append(Example(e.txt_id, e.img_id, ids, e.img_feat, e.img_pos, None, x))
                types.append(t)
            a_lab.append(int(x["answer_label"]))
            r_lab.append(int(x["rationale_label"]))
        batch = _typed(out, text_types=types)
        batch.targets["answer_label"], batch.targets["rationale_label"] = torch.tensor(a_lab), torch.tensor(r_lab)
        return batch

    def loss_count(self, batch: VLBatch) -> int:
        return int(batch.targets["answer_label"].numel()) * 2 * self.num_candidates

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        logits = self.head(model(batch))  # [2B, 4, 2]: per question its Q->A group, then its QA->R group
        every = None
        if self.rationales == "each":  # [5B, 4, 2]: Q->A, then QA->R after answer 0..3; keep the right one's
            grouped = logits.view(-1, 1 + self.num_candidates, self.num_candidates, logits.shape[-1])
            every = grouped[:, 1:, :, 1].detach()  # [B, 4 answers, 4 rationales] "right" logits
            gold = grouped[torch.arange(grouped.shape[0], device=logits.device), 1 + batch.targets["answer_label"]]
            logits = torch.stack([grouped[:, 0], gold], 1).reshape(-1, self.num_candidates, logits.shape[-1])
        labels = torch.stack([batch.targets["answer_label"], batch.targets["rationale_label"]], 1).reshape(-1)
        target = F.one_hot(labels, self.num_candidates)  # 1 = "right"
        loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        rank = logits.detach()[..., 1]
        acc = (rank.argmax(-1) == labels).float().mean()
        outputs = {"q2a_scores": rank[0::2], "qa2r_scores": rank[1::2]}
        if every is not None:
            outputs["qa2r_each_scores"] = every
        return TaskOutput(loss, self._logs(loss, acc=acc), outputs)

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        res = self.forward(model, batch)
        return res.outputs | {"answer_label": batch.targets["answer_label"], "rationale_label": batch.targets["rationale_label"],
                              "loss": res.loss, "loss_count": self.loss_count(batch),
                              "annot_id": batch.txt_ids[:: 2 * self.num_candidates]}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        # Per question the probabilities of its answers and of its rationales given the right answer.
        a, r = outputs["q2a_scores"].float().softmax(-1).tolist(), outputs["qa2r_scores"].float().softmax(-1).tolist()
        if "qa2r_each_scores" in outputs:  # the leaderboard's: rationales after each answer
            each = outputs["qa2r_each_scores"].float().softmax(-1).tolist()
            return [{"annot_id": i, "answer_probs": pa, "rationale_probs_given": pe}
                    for i, pa, pe in zip(outputs["annot_id"], a, each)]
        return [{"annot_id": i, "answer_probs": pa, "rationale_probs": pr} for i, pa, pr in zip(outputs["annot_id"], a, r)]


# -------------------------------------------------------------------------- referring expressions


@TASKS.register_module(name="refexp")
class RefExpTask(_HeadTask):
    """Referring expression comprehension: a score per region, CE over the regions (padding at
    -1e4). The target region is ``extra['target_region']`` or else the detected region with the
    highest IoU with ``extra['target_box']``. ``train_candidates='gt'`` trains over the
    ground-truth regions ``extra['gt_regions']`` only. Metrics: accuracy on the ground-truth
    candidates and on detected regions (IoU >= 0.5 with the target box)."""

    default_head = {"type": "RegionScorerHead"}
    default_metrics = ({"type": "refexp_accuracy"}, {"type": "loss_average"})

    def __init__(self, *, train_candidates: str = "detected", head: dict | None = None, loss: dict | None = None,
                 metrics: list[dict] | None = None):
        super().__init__(head=head, loss=loss, metrics=metrics)
        if train_candidates not in ("detected", "gt"):
            raise ValueError(f"refexp: train_candidates must be 'detected' or 'gt', got {train_candidates!r}")
        self.train_candidates = train_candidates

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.head = self.make_head(self.head_cfg, model=model, sizes={"hidden_size": model.spec.region_dim})

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        batch = collate(examples, soft_labels=False)
        k = batch.img_mask.shape[1]
        gt = torch.zeros(len(examples), k, dtype=torch.bool)
        target, boxes = [], []
        for i, e in enumerate(examples):
            box = torch.tensor(e.extra["target_box"], dtype=torch.float32)
            n = e.img_feat.shape[0]
            t = e.extra.get("target_region")
            if t is None:
                t = int(box_iou(e.img_pos[:, :4], box.expand(n, 4)).argmax())
            if not 0 <= int(t) < n:
                raise ValueError(f"{self.where}: record {e.txt_id!r}: target_region {t} but its image has {n} regions")
            for j in e.extra.get("gt_regions", []):
                if j < n:
                    gt[i, j] = True
            target.append(int(t))
            boxes.append(box)
        batch.targets.update(target_region=torch.tensor(target), target_box=torch.stack(boxes), gt_mask=gt,
                             has_gt=gt.any(1))
        return batch

    def _scores(self, model: VLEncoder, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.head(model(batch))
        train = scores
        if self.train_candidates == "gt":
            t = batch.targets
            train = torch.where(t["has_gt"][:, None] & ~t["gt_mask"], torch.full_like(scores, -1e4), scores)
        return scores, self.loss_fn(train, batch.targets["target_region"])

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        scores, loss = self._scores(model, batch)
        acc = (scores.detach().argmax(-1) == batch.targets["target_region"]).float().mean()
        return TaskOutput(loss, self._logs(loss, acc=acc), {"scores": scores})

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        scores, loss = self._scores(model, batch)
        t = batch.targets
        pred_det = scores.argmax(-1)
        pred_gt = scores.masked_fill(~t["gt_mask"], float("-inf")).argmax(-1)
        rows = torch.arange(batch.size, device=scores.device)
        return {"pred_det": pred_det, "pred_gt": pred_gt, "target_region": t["target_region"], "has_gt": t["has_gt"],
                "pred_box": batch.img_pos[rows, pred_det, :4], "target_box": t["target_box"], "loss": loss,
                "loss_count": batch.size, "txt_id": batch.txt_ids}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"sent_id": i, "box": [round(v, 4) for v in b]} for i, b in zip(outputs["txt_id"], outputs["pred_box"].tolist())]


# -------------------------------------------------------------------------------------- retrieval


def _rows(batch: VLBatch, idx: torch.Tensor) -> VLBatch:
    """The examples ``idx`` of ``batch`` (text and region fields; no targets)."""
    pick = lambda x: None if x is None else x[idx]  # noqa: E731
    return VLBatch(input_ids=batch.input_ids[idx], text_mask=batch.text_mask[idx], img_feat=batch.img_feat[idx],
                   img_pos=batch.img_pos[idx], img_mask=batch.img_mask[idx], token_type_ids=pick(batch.token_type_ids),
                   img_type_ids=pick(batch.img_type_ids))


def _concat(batches: list[VLBatch]) -> VLBatch:
    """One batch of several, each padded to the longest text and region count."""
    t = max(b.input_ids.shape[1] for b in batches)
    k = max(b.img_feat.shape[1] for b in batches)
    pad_t = lambda x: F.pad(x, (0, t - x.shape[1]))  # noqa: E731
    pad_k = lambda x: F.pad(x, (0, 0, 0, k - x.shape[1])) if x.dim() == 3 else F.pad(x, (0, k - x.shape[1]))  # noqa: E731
    return VLBatch(input_ids=torch.cat([pad_t(b.input_ids) for b in batches]),
                   text_mask=torch.cat([pad_t(b.text_mask) for b in batches]),
                   img_feat=torch.cat([pad_k(b.img_feat) for b in batches]),
                   img_pos=torch.cat([pad_k(b.img_pos) for b in batches]),
                   img_mask=torch.cat([pad_k(b.img_mask) for b in batches]))


@TASKS.register_module(name="itr")
class RetrievalTask(_HeadTask):
    """Image-text retrieval: a ranking head (Linear(H, 1) on the pooled output, initialised from
    the pretrained ITM head's positive row ``itm_head``/``itm_row`` when ``train.init_from`` has
    it), the triplet ranking loss, and hard negatives: per positive pair, ``num_sampled`` random
    negatives are scored without gradient once with the text fixed (other images) and once with
    the image fixed (other texts); the ``num_hard`` highest of each side are trained on."""

    default_head = {"type": "RankingHead"}
    default_loss = {"type": "ranking_hinge", "margin": 0.2}
    default_metrics = ({"type": "retrieval_full", "num_images": 100}, {"type": "loss_average"})

    def __init__(self, *, num_sampled: int = 399, num_hard: int = 31, itm_head: str = "tasks.itm.head",
                 itm_row: int = 1, head: dict | None = None, loss: dict | None = None, metrics: list[dict] | None = None):
        super().__init__(head=head, loss=loss, metrics=metrics)
        if not 1 <= num_hard <= num_sampled:
            raise ValueError(f"itr: need 1 <= num_hard <= num_sampled, got {num_hard} and {num_sampled}")
        self.num_sampled, self.num_hard = int(num_sampled), int(num_hard)
        self.itm_head, self.itm_row = itm_head, int(itm_row)

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.head = self.make_head(self.head_cfg, model=model, sizes={"hidden_size": model.spec.pooled_dim})

    def init_from_pretrained(self, weights: dict[str, torch.Tensor], *, prefix: str) -> dict[str, torch.Tensor]:
        w, b = weights.get(f"{self.itm_head}.weight"), weights.get(f"{self.itm_head}.bias")
        if w is None or b is None or f"{prefix}head.weight" in weights:
            return {}  # no ITM head in the checkpoint, or a finetuned ranking head already there
        return {f"{prefix}head.weight": w[self.itm_row : self.itm_row + 1].clone(),
                f"{prefix}head.bias": b[self.itm_row : self.itm_row + 1].clone()}

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        images, owners = dataset.image_ids(), dataset.img_ids
        if len(images) < 2:
            raise ValueError(f"{self.where}: retrieval negatives need at least two images")
        n = self.num_sampled
        img_negs, txt_negs = [], []
        for e in examples:
            for _ in range(n):  # text fixed, another image
                other = e.img_id
                while other == e.img_id:
                    other = images[int(torch.randint(len(images), (), generator=generator))]
                img_negs.append(Example(e.txt_id, other, e.input_ids, *dataset.image_example(other)[:2]))
            for _ in range(n):  # image fixed, a text of another image
                j = int(torch.randint(len(dataset), (), generator=generator))
                while owners[j] == e.img_id:
                    j = int(torch.randint(len(dataset), (), generator=generator))
                txt_negs.append(Example(f"#{j}", e.img_id, dataset.text_ids(j), e.img_feat, e.img_pos))
        batch = collate(examples, soft_labels=False)
        batch.targets["img_neg"] = collate(img_negs, soft_labels=False)
        batch.targets["txt_neg"] = collate(txt_negs, soft_labels=False)
        return batch

    def _hardest(self, model: VLEncoder, negs: VLBatch, b: int) -> VLBatch:
        with torch.no_grad():
            s = self.head(model(negs)).view(b, self.num_sampled)
        top = s.topk(self.num_hard, dim=1).indices + torch.arange(b, device=s.device)[:, None] * self.num_sampled
        return _rows(negs, top.reshape(-1))

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        b = batch.size
        hard = [self._hardest(model, batch.targets[k], b) for k in ("img_neg", "txt_neg")]
        scores = self.head(model(_concat([_rows(batch, torch.arange(b, device=batch.input_ids.device)), *hard])))
        pos = scores[:b]
        neg = torch.cat([scores[b : b + b * self.num_hard].view(b, -1), scores[b + b * self.num_hard :].view(b, -1)], 1)
        loss = self.loss_fn(pos, neg)
        acc = (pos[:, None] > neg).float().mean()  # share of negatives ranked below their positive
        return TaskOutput(loss, self._logs(loss, acc=acc), {"pos": pos, "neg": neg})

    def loss_count(self, batch: VLBatch) -> int:
        return batch.size * 2 * self.num_hard

    @torch.no_grad()
    def score_pairs(self, model: VLEncoder, batch: VLBatch) -> torch.Tensor:
        return torch.sigmoid(self.head(model(batch)).float())
