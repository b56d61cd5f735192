"""UNITER's pretraining tasks: MLM, MRFR, MRC, MRC-kl, ITM (with optional WRA inside) and WRA.

Every head, loss and metric is a config node (``head``, ``loss``, ``wra_loss``, ``metrics``)
whose default is the original's choice. Masked-modelling tasks (MLM, MRFR, MRC, MRC-kl) only ever
see matched pairs: negatives are made by ITM/WRA alone, so a mismatched pair never feeds an
MLM/MRM loss. Masked-position heads run on the masked positions only. Losses follow the original
code (means over masked elements).
"""
from __future__ import annotations

from typing import Any

import torch

from vlframe.data.batch import Example, VLBatch, collate, gather_masked_soft_labels
from vlframe.masking import IGNORE_INDEX, Masker, replace_masked_tokens
from vlframe.models import VLEncoder
from vlframe.ot.cost import wra_distance
from vlframe.registry import MASKERS, OT_SOLVERS, TASKS
from vlframe.tasks.base import DataInfo, Task, TaskOutput, build_component, build_loss, text_maskable


class MaskedTask(Task):
    """Draws masks for ``target`` ('text' or 'regions') through a masker; the masker decides
    whether the other modality is masked too (conditional: never; joint: always)."""

    target = "text"

    def __init__(self, *, masker: dict | Masker | None = None, head: dict | None = None,
                 loss: dict | None = None, metrics: list[dict] | None = None):
        super().__init__(metrics=metrics)
        self.masker = build_component(masker, MASKERS, {"type": "conditional"}, where=f"{type(self).__name__}.masker")
        self.head_cfg = dict(head) if head is not None else dict(self.default_head)
        self.loss_fn = build_loss(loss, self.default_loss, where=f"{type(self).__name__}.loss")

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

    def forward(self, model: VLEncoder, batch: VLBatch) -> TaskOutput:
        o = self._run(model, batch)
        logs = {"loss": o["loss"].detach()}
        if "acc" in o:
            logs["acc"] = o["acc"]
        return TaskOutput(o["loss"], logs, o)

    @torch.no_grad()
    def evaluate(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        return self._run(model, batch) | {"loss_count": self.loss_count(batch)}


@TASKS.register_module(name="mlm")
class MLMTask(MaskedTask):
    """Masked language modelling conditioned on the image: CE at masked words."""

    target = "text"
    default_head = {"type": "TiedTokenHead"}
    default_loss = {"type": "cross_entropy"}
    default_metrics = ({"type": "accuracy", "name": "mlm_acc"}, {"type": "loss_average", "name": "mlm_loss"})

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        spec = model.spec
        self.head = self.make_head(self.head_cfg, model=model, sizes={
            "hidden_size": spec.text_dim, "vocab_size": spec.vocab_size, "num_classes": spec.vocab_size,  # untied heads
        })

    def loss_count(self, batch: VLBatch) -> torch.Tensor:
        return (batch.targets["txt_labels"] != IGNORE_INDEX).sum()  # the CE is a mean over masked words

    def _run(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        labels = batch.targets["txt_labels"]
        sel = labels != IGNORE_INDEX
        logits = self.head(model(batch).text[sel])
        target = labels[sel]
        loss = self.loss_fn(logits, target)
        return {"logits": logits, "target": target, "loss": loss, "acc": (logits.detach().argmax(-1) == target).float().mean()}


class RegionTask(MaskedTask):
    """Base of the masked-region tasks: head outputs at masked regions only."""

    target = "regions"

    def _masked_states(self, model: VLEncoder, batch: VLBatch) -> torch.Tensor:
        return model(batch).regions[batch.img_masked]

    def loss_count(self, batch: VLBatch) -> torch.Tensor:
        return batch.img_masked.sum()  # losses that are a mean over masked regions (MRC)


@TASKS.register_module(name="mrfr")
class MRFRTask(RegionTask):
    """Masked region feature regression: L2 to the raw (pre-zeroing) features, tied output."""

    default_head = {"type": "TiedFeatureHead"}
    default_loss = {"type": "mse"}
    default_metrics = ({"type": "loss_average", "name": "mrfr_loss"},)

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        spec = model.spec
        self.head = self.make_head(self.head_cfg, model=model, sizes={"hidden_size": spec.region_dim, "feat_dim": spec.feat_dim})

    def loss_count(self, batch: VLBatch) -> torch.Tensor:
        return batch.img_masked.sum() * batch.img_feat.shape[-1]  # MSE: mean over regions x features

    def _run(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        pred = self.head(self._masked_states(model, batch))
        target = batch.img_feat[batch.img_masked]
        return {"pred": pred, "target": target, "loss": self.loss_fn(pred, target)}


class _RegionClassTask(RegionTask):
    needs_soft_labels = True
    default_head = {"type": "ClassifierHead"}
    default_metrics = (
        {"type": "accuracy", "name": "mrc_acc", "pred": "pred_class", "target": "target_class"},
        {"type": "mean", "name": "mrc_kl", "key": "kl"},
    )

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        if not info.num_labels:
            raise ValueError(f"{self.where}: needs detector soft labels, but the region store has none")
        sizes = {"hidden_size": model.spec.region_dim, "num_classes": info.num_labels}
        self.head = self.make_head(self.head_cfg, model=model, sizes=sizes)

    @staticmethod
    def top_class(soft: torch.Tensor) -> torch.Tensor:
        # The detector's top class, background (index 0) excluded as in the original.
        return soft[:, 1:].argmax(-1) + 1

    def _run(self, model: VLEncoder, batch: VLBatch) -> dict[str, Any]:
        soft = batch.masked_soft_labels  # the masked regions' rows, gathered at collate time
        if soft is None and batch.soft_labels is not None:
            soft = batch.soft_labels[batch.img_masked]
        if soft is None:
            raise ValueError(f"{self.where}: batch has no soft labels (region store without them)")
        logits = self.head(self._masked_states(model, batch))
        out = {"logits": logits, "soft_labels": soft, "loss": self.loss_fn(logits, self.loss_target(soft))}
        with torch.no_grad():
            # Both sides without background: "which object class is this region", as the paper's
            # MRC accuracy; the soft label's background mass is the detector's (1 - confidence).
            out["pred_class"], out["target_class"] = self.top_class(logits.detach()), self.top_class(soft)
            out["kl"] = torch.nn.functional.kl_div(
                torch.log_softmax(logits.detach().float(), -1), soft.float(), reduction="none"
            ).sum(-1)
        return out


@TASKS.register_module(name="mrc")
class MRCTask(_RegionClassTask):
    """Masked region classification: CE to the detector's top class."""

    default_loss = {"type": "cross_entropy"}

    def loss_target(self, soft: torch.Tensor) -> torch.Tensor:
        return self.top_class(soft)

    def _run(self, model, batch):
        out = super()._run(model, batch)
        out["acc"] = (out["logits"].detach().argmax(-1) == out["target_class"]).float().mean()
        return out


@TASKS.register_module(name="mrc_kl")
class MRCKLTask(_RegionClassTask):
    """Masked region classification with KL(detector soft label || prediction), element mean."""

    default_loss = {"type": "kl_div"}

    def loss_count(self, batch: VLBatch) -> torch.Tensor:
        return batch.img_masked.sum() * int(self.info.num_labels)  # KL: mean over regions x classes

    def loss_target(self, soft: torch.Tensor) -> torch.Tensor:
        return soft


def log_marginal_error(logs: dict, solver) -> None:
    """The solver's marginal error on the last plan into the task's logs (a solver that
    converges slowly, e.g. Sinkhorn at small epsilon, shows here; see vlframe.ot.base)."""
    err = getattr(solver, "last_marginal_error", None)
    if err is not None:
        logs["ot_marginal_err"] = torch.as_tensor(err).detach()  # a device tensor: read at the log interval


class PairTask(Task):
    """Makes mismatched pairs: with probability ``neg_prob`` an example's image (``side='image'``),
    its text (``'text'``) or either (``'both'``) is replaced by one from another image."""

    def __init__(self, *, neg_prob: float = 0.5, side: str = "image", metrics: list[dict] | None = None):
        super().__init__(metrics=metrics)
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


def _wra(solver: Any, out: Any) -> torch.Tensor:
    # Words with [CLS]/[SEP], as the original, against regions; cost and solver run in fp32.
    return wra_distance(solver, out.text, out.regions, out.text_mask, out.region_mask)


@TASKS.register_module(name="itm")
class ITMTask(PairTask):
    """Image-text matching: a pair head (default Linear(H, 2) on the pooled output) and its loss
    (CE). With ``wra_weight > 0`` the word-region alignment rides inside, as in the original:
    loss = CE + wra_weight * wra_loss(OT distances, match), whose default is
    (sum of matched distances - sum of mismatched) / batch size."""

    default_head = {"type": "PooledLinearHead"}
    default_loss = {"type": "cross_entropy"}
    default_wra_loss = {"type": "ot_contrast", "normalize": "batch"}
    default_metrics = (
        {"type": "accuracy", "name": "itm_acc"},
        {"type": "ot_distance"},
        {"type": "retrieval_recall", "num_images": 50},
    )

    def __init__(
        self,
        *,
        neg_prob: float = 0.5,
        side: str = "image",
        head: dict | None = None,
        loss: dict | None = None,
        wra_weight: float = 0.0,
        ot_solver: dict | None = None,
        wra_loss: dict | None = None,
        metrics: list[dict] | None = None,
    ):
        super().__init__(neg_prob=neg_prob, side=side, metrics=metrics)
        self.head_cfg = dict(head or self.default_head)
        self.loss_fn = build_loss(loss, self.default_loss, where="itm.loss")
        self.wra_weight = wra_weight
        if wra_weight and ot_solver is None:
            raise ValueError("itm: wra_weight > 0 needs an ot_solver")
        if not wra_weight and (ot_solver is not None or wra_loss is not None):
            raise ValueError("itm: ot_solver / wra_loss are set but wra_weight is 0, so they would be ignored")
        self.solver = build_component(ot_solver, OT_SOLVERS, {}, where="itm.ot_solver") if wra_weight else None
        self.wra_loss = build_loss(wra_loss, self.default_wra_loss, where="itm.wra_loss") if wra_weight else None

    def setup(self, *, model: VLEncoder, info: DataInfo, where: str | None = None) -> None:
        super().setup(model=model, info=info, where=where)
        self.head = self.make_head(self.head_cfg, model=model, sizes={"hidden_size": model.spec.pooled_dim, "num_classes": 2})

    def forward(self, model, batch):
        out = model(batch)
        target = batch.targets["itm"]
        logits = self.head(out)
        ce = self.loss_fn(logits, target)
        logs = {"ce": ce.detach(), "acc": (logits.detach().argmax(-1) == target).float().mean()}
        loss = ce
        outputs = {"logits": logits, "target": target, "encoder": out}
        if self.wra_weight:
            d = _wra(self.solver, out)
            ot_loss = self.wra_loss(d, target)
            loss = ce + self.wra_weight * ot_loss
            logs["ot_loss"] = ot_loss.detach()
            log_marginal_error(logs, self.solver)
            outputs["ot_distance"] = d
        logs["loss"] = loss.detach()
        return TaskOutput(loss, logs, outputs)

    @torch.no_grad()
    def evaluate(self, model, batch):
        res = self.forward(model, batch)
        return res.outputs | {"loss": res.loss, "loss_count": self.loss_count(batch)}

    @torch.no_grad()
    def score_pairs(self, model, batch) -> torch.Tensor:
        """Matching probability of each pair in the batch (retrieval)."""
        return self.head(model(batch)).float().softmax(-1)[:, 1]


@TASKS.register_module(name="wra")
class WRATask(PairTask):
    """Word-region alignment as its own task: by default mean OT distance of matched pairs minus
    that of mismatched pairs (the contrast keeps the representation from collapsing to zero cost)."""

    default_loss = {"type": "ot_contrast", "normalize": "per_side"}
    default_metrics = ({"type": "ot_distance"},)

    def __init__(self, *, neg_prob: float = 0.5, side: str = "image", ot_solver: dict | None = None,
                 loss: dict | None = None, metrics: list[dict] | None = None):
        super().__init__(neg_prob=neg_prob, side=side, metrics=metrics)
        self.solver = build_component(ot_solver, OT_SOLVERS, {"type": "ipot"}, where="wra.ot_solver")
        self.loss_fn = build_loss(loss, self.default_loss, where="wra.loss")

    def forward(self, model, batch):
        out = model(batch)
        d = _wra(self.solver, out)
        target = batch.targets["itm"]
        loss = self.loss_fn(d, target)
        logs = {"loss": loss.detach()}
        log_marginal_error(logs, self.solver)
        return TaskOutput(loss, logs, {"ot_distance": d, "target": target, "encoder": out})

    @torch.no_grad()
    def evaluate(self, model, batch):
        res = self.forward(model, batch)
        return res.outputs | {"loss": res.loss, "loss_count": self.loss_count(batch)}
