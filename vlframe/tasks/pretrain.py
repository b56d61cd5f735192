"""UNITER's pretraining tasks: MLM, MRFR, MRC, MRC-kl, ITM (with optional WRA inside) and WRA.

Masked-modelling tasks (MLM, MRFR, MRC, MRC-kl) only ever see matched pairs: negatives are made
by ITM/WRA alone, so a mismatched pair never feeds an MLM/MRM loss. Masked-region heads run on
the masked positions only. Losses follow the original code (means over masked elements).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.data.batch import Example, VLBatch, collate, gather_masked_soft_labels
from vlframe.masking import IGNORE_INDEX, Masker, replace_masked_tokens
from vlframe.modules.heads import ClassifierHead, TiedFeatureHead, TiedTokenHead
from vlframe.ot.cost import wra_distance
from vlframe.registry import MASKERS, OT_SOLVERS, TASKS, build
from vlframe.tasks.base import DataInfo, Task, TaskOutput, text_maskable

_DEFAULT_MASKER = {"type": "conditional"}


def _build_masker(masker: dict | Masker | None, where: str) -> Masker:
    if isinstance(masker, Masker):
        return masker
    return build(dict(masker or _DEFAULT_MASKER), MASKERS, where=where)


class MaskedTask(Task):
    """Draws masks for ``target`` ('text' or 'regions') through a masker; the masker decides
    whether the other modality is masked too (conditional: never; joint: always)."""

    target = "text"

    def __init__(self, *, masker: dict | Masker | None = None):
        super().__init__()
        self.masker = _build_masker(masker, where=f"{type(self).__name__}.masker")

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        # soft labels: only the masked regions', gathered below (vlframe.data.batch)
        batch = collate(examples, soft_labels=False)
        draw = self.masker(
            target=self.target,
            text_maskable=text_maskable(batch, self.info.special_ids),
            region_maskable=batch.img_mask,
            generator=generator,
        )
        if draw.text.any():
            batch.input_ids, batch.targets["txt_labels"] = replace_masked_tokens(
                batch.input_ids,
                draw.text,
                mask_id=self.info.special_ids["mask"],
                random_range=self.info.random_range,
                generator=generator,
            )
        if draw.regions.any():
            batch.img_masked = draw.regions  # the model zeroes these features and adds the mask vector
            if self.needs_soft_labels:
                batch.masked_soft_labels = gather_masked_soft_labels(examples, draw.regions)
        return batch


@TASKS.register_module(name="mlm")
class MLMTask(MaskedTask):
    """Masked language modelling conditioned on the image: CE at masked words."""

    target = "text"
    metric_names = ("mlm_acc", "mlm_loss")

    def setup(self, *, model: nn.Module, info: DataInfo) -> None:
        super().setup(model=model, info=info)
        self.head = TiedTokenHead(hidden_size=model.hidden_size, vocab_size=model.vocab_size)

    def _logits(self, model: nn.Module, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.targets["txt_labels"]
        out = model(batch)
        sel = labels != IGNORE_INDEX
        return self.head(out.text[sel], model.word_embeddings.weight), labels[sel]

    def forward(self, model: nn.Module, batch: VLBatch) -> TaskOutput:
        logits, labels = self._logits(model, batch)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return TaskOutput(loss, {"loss": loss.item(), "acc": acc.item()}, {"logits": logits})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: VLBatch) -> dict[str, tuple[float, float]]:
        logits, labels = self._logits(model, batch)
        n = float(labels.numel())
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        return {"mlm_acc": (float((logits.argmax(-1) == labels).sum()), n), "mlm_loss": (float(loss), n)}


class RegionTask(MaskedTask):
    """Base of the masked-region tasks: head outputs at masked regions only."""

    target = "regions"

    def _masked_states(self, model: nn.Module, batch: VLBatch) -> torch.Tensor:
        return model(batch).regions[batch.img_masked]


@TASKS.register_module(name="mrfr")
class MRFRTask(RegionTask):
    """Masked region feature regression: L2 to the raw (pre-zeroing) features, tied output."""

    metric_names = ("mrfr_loss",)

    def setup(self, *, model: nn.Module, info: DataInfo) -> None:
        super().setup(model=model, info=info)
        self.head = TiedFeatureHead(hidden_size=model.hidden_size, feat_dim=model.img_dim)

    def _pred(self, model, batch):
        pred = self.head(self._masked_states(model, batch), model.feature_projection.weight)
        return pred, batch.img_feat[batch.img_masked]

    def forward(self, model: nn.Module, batch: VLBatch) -> TaskOutput:
        pred, target = self._pred(model, batch)
        loss = F.mse_loss(pred.float(), target.float())
        return TaskOutput(loss, {"loss": loss.item()}, {"pred": pred})

    @torch.no_grad()
    def evaluate(self, model, batch):
        pred, target = self._pred(model, batch)
        return {"mrfr_loss": (float(F.mse_loss(pred.float(), target.float(), reduction="sum")), float(target.numel()))}


class _RegionClassTask(RegionTask):
    needs_soft_labels = True
    def setup(self, *, model: nn.Module, info: DataInfo) -> None:
        super().setup(model=model, info=info)
        if not info.num_labels:
            raise ValueError(f"{type(self).__name__} needs detector soft labels, but the region store has none")
        self.head = ClassifierHead(hidden_size=model.hidden_size, num_classes=info.num_labels)

    def _pred(self, model, batch):
        soft = batch.masked_soft_labels
        if soft is None and batch.soft_labels is not None:
            soft = batch.soft_labels[batch.img_masked]
        if soft is None:
            raise ValueError(f"{type(self).__name__}: batch has no soft labels (region store without them)")
        return self.head(self._masked_states(model, batch)), soft

    @staticmethod
    def top_class(soft: torch.Tensor) -> torch.Tensor:
        # The detector's top class, background (index 0) excluded as in the original.
        return soft[:, 1:].argmax(-1) + 1

    @torch.no_grad()
    def evaluate(self, model, batch):
        logits, soft = self._pred(model, batch)
        n = float(soft.shape[0])
        # Both sides without background: "which object class is this region", as the paper's
        # MRC accuracy; the soft label's background mass is the detector's (1 - confidence).
        hits = float((self.top_class(logits) == self.top_class(soft)).sum())
        kl = F.kl_div(F.log_softmax(logits.float(), -1), soft.float(), reduction="sum")
        return {"mrc_acc": (hits, n), "mrc_kl": (float(kl), n)}


@TASKS.register_module(name="mrc")
class MRCTask(_RegionClassTask):
    """Masked region classification: CE to the detector's top class."""

    metric_names = ("mrc_acc", "mrc_kl")

    def forward(self, model, batch):
        logits, soft = self._pred(model, batch)
        target = self.top_class(soft)
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return TaskOutput(loss, {"loss": loss.item(), "acc": acc.item()}, {"logits": logits})


@TASKS.register_module(name="mrc_kl")
class MRCKLTask(_RegionClassTask):
    """Masked region classification with KL(detector soft label || prediction), element mean."""

    metric_names = ("mrc_acc", "mrc_kl")

    def forward(self, model, batch):
        logits, soft = self._pred(model, batch)
        loss = F.kl_div(F.log_softmax(logits.float(), -1), soft.float(), reduction="none").mean()
        return TaskOutput(loss, {"loss": loss.item()}, {"logits": logits})


def _build_solver(solver: dict | None, where: str):
    if solver is None or callable(solver):
        return solver
    return build(dict(solver), OT_SOLVERS, where=where)


def wra_distances(out, solver) -> torch.Tensor:
    """OT distance per pair between the contextualised words (with [CLS]/[SEP], as the original)
    and regions of an EncoderOutput; cost and solver run in fp32 (vlframe.ot)."""
    return wra_distance(solver, out.text, out.regions, out.text_mask, out.region_mask)


class PairTask(Task):
    """Makes mismatched pairs: with probability ``neg_prob`` an example's image (``side='image'``),
    its text (``'text'``) or either (``'both'``) is replaced by one from another image."""

    def __init__(self, *, neg_prob: float = 0.5, side: str = "image"):
        super().__init__()
        if side not in ("image", "text", "both"):
            raise ValueError(f"side must be 'image', 'text' or 'both', got {side!r}")
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"neg_prob must be in [0, 1], got {neg_prob}")
        self.neg_prob = neg_prob
        self.side = side

    def collate(self, examples: list[Example], *, generator: torch.Generator, dataset: Any) -> VLBatch:
        image_ids = dataset.image_ids()
        example_images = None  # looked up once per batch, only for text-side negatives
        if len(image_ids) < 2:
            raise ValueError("ITM negatives need at least two images in the dataset")
        out, matched = [], []
        for e in examples:
            if float(torch.rand((), generator=generator)) >= self.neg_prob:
                out.append(e)
                matched.append(1)
                continue
            side = self.side
            if side == "both":
                side = "image" if float(torch.rand((), generator=generator)) < 0.5 else "text"
            if side == "image":
                other = e.img_id
                while other == e.img_id:
                    other = image_ids[int(torch.randint(len(image_ids), (), generator=generator))]
                feat, pos, soft = dataset.image_example(other)
                out.append(Example(e.txt_id, other, e.input_ids, feat, pos, soft, e.extra))
            else:
                example_images = example_images or dataset.img_ids
                j = int(torch.randint(len(dataset), (), generator=generator))
                while example_images[j] == e.img_id:
                    j = int(torch.randint(len(dataset), (), generator=generator))
                out.append(Example(f"#{j}", e.img_id, dataset.text_ids(j), e.img_feat, e.img_pos, e.soft_labels, e.extra))
            matched.append(0)
        batch = collate(out, soft_labels=self.needs_soft_labels)
        batch.targets["itm"] = torch.tensor(matched, dtype=torch.long)
        return batch


@TASKS.register_module(name="itm")
class ITMTask(PairTask):
    """Image-text matching: Linear(H, 2) on the pooled output, CE. With ``wra_weight > 0`` the
    word-region alignment rides inside, as in the original: loss = CE + w * (sum of OT distances
    of matched pairs - sum over mismatched) / batch size."""

    metric_names = ("itm_acc", "ot_pos", "ot_neg", "tr_r1", "ir_r1")

    def __init__(
        self,
        *,
        neg_prob: float = 0.5,
        side: str = "image",
        wra_weight: float = 0.0,
        ot_solver: dict | None = None,
        retrieval_images: int = 50,
    ):
        super().__init__(neg_prob=neg_prob, side=side)
        self.wra_weight = wra_weight
        self.solver = _build_solver(ot_solver, where="itm.ot_solver")
        if wra_weight and self.solver is None:
            raise ValueError("itm: wra_weight > 0 needs an ot_solver")
        self.retrieval_images = retrieval_images

    def setup(self, *, model: nn.Module, info: DataInfo) -> None:
        super().setup(model=model, info=info)
        self.head = nn.Linear(model.hidden_size, 2)

    def forward(self, model, batch):
        out = model(batch)
        target = batch.targets["itm"]
        logits = self.head(out.pooled)
        ce = F.cross_entropy(logits.float(), target)
        logs = {"ce": ce.item(), "acc": (logits.argmax(-1) == target).float().mean().item()}
        loss = ce
        outputs = {"logits": logits}
        if self.wra_weight:
            d = wra_distances(out, self.solver)
            pos, neg = d[target == 1], d[target == 0]
            ot_loss = (pos.sum() - neg.sum()) / target.numel()
            loss = ce + self.wra_weight * ot_loss
            logs["ot_loss"] = ot_loss.item()
            outputs.update(ot_pos=pos, ot_neg=neg)
        logs["loss"] = loss.item()
        return TaskOutput(loss, logs, outputs)

    @torch.no_grad()
    def evaluate(self, model, batch):
        out = model(batch)
        target = batch.targets["itm"]
        res = {"itm_acc": (float((self.head(out.pooled).argmax(-1) == target).sum()), float(target.numel()))}
        solver = self.solver or build({"type": "ipot"}, OT_SOLVERS)
        d = wra_distances(out, solver)
        res["ot_pos"] = (float(d[target == 1].sum()), float((target == 1).sum()))
        res["ot_neg"] = (float(d[target == 0].sum()), float((target == 0).sum()))
        return res

    @torch.no_grad()
    def score_pairs(self, model, batch) -> torch.Tensor:
        """Matching probability of each pair in the batch."""
        return self.head(model(batch).pooled).float().softmax(-1)[:, 1]

    @torch.no_grad()
    def evaluate_dataset(self, model, dataset, *, device) -> dict[str, float]:
        from vlframe.metrics.retrieval import retrieval_recall, score_all_pairs

        if not self.retrieval_images:
            return {}
        scores, txt2img = score_all_pairs(
            self.score_pairs, model, dataset, num_images=self.retrieval_images, device=device
        )
        return retrieval_recall(scores, txt2img)


@TASKS.register_module(name="wra")
class WRATask(PairTask):
    """Word-region alignment as its own task: mean OT distance of matched pairs minus that of
    mismatched pairs (the contrast keeps the representation from collapsing to zero cost)."""

    metric_names = ("ot_pos", "ot_neg")

    def __init__(self, *, neg_prob: float = 0.5, side: str = "image", ot_solver: dict | None = None):
        super().__init__(neg_prob=neg_prob, side=side)
        self.solver = _build_solver(ot_solver or {"type": "ipot"}, where="wra.ot_solver")

    def forward(self, model, batch):
        d = wra_distances(model(batch), self.solver)
        target = batch.targets["itm"]
        pos, neg = d[target == 1], d[target == 0]
        loss = (pos.mean() if pos.numel() else d.new_zeros(())) - (neg.mean() if neg.numel() else d.new_zeros(()))
        return TaskOutput(loss, {"loss": loss.item()}, {"ot_pos": pos, "ot_neg": neg})

    @torch.no_grad()
    def evaluate(self, model, batch):
        d = wra_distances(model(batch), self.solver)
        target = batch.targets["itm"]
        return {
            "ot_pos": (float(d[target == 1].sum()), float((target == 1).sum())),
            "ot_neg": (float(d[target == 0].sum()), float((target == 0).sum())),
        }
