"""Golden parity with the original UNITER code.

``shared/fixtures/uniter_ref_tiny.pt`` holds a tiny ``UniterForPretraining`` (original key layout)
and, for each pretraining task, the batch exactly as the original collates it plus the original's
outputs and per-element losses in eval mode. The checkpoint goes through our converter into
vlframe's model + task heads; each original batch is rewritten as a :class:`VLBatch`; every
output and loss must match.
"""
from __future__ import annotations

import os

import pytest
import torch

from projects.uniter.uniter.convert import original_to_vlframe
from projects.uniter.uniter.model import UniterModel
from vlframe.data.batch import VLBatch
from vlframe.engine.trainer import VLModule
from vlframe.masking import IGNORE_INDEX
from vlframe.registry import OT_SOLVERS, TASKS, build
from vlframe.tasks.base import DataInfo
from tests.conftest import FIXTURES, needs_fixtures

REF_PATH = os.path.join(FIXTURES, "uniter_ref_tiny.pt")
pytestmark = needs_fixtures("uniter_ref_tiny.pt")

ATOL = 1e-5
OT_ATOL = 1e-4
INFO = DataInfo(
    special_ids={"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100},
    vocab_size=28996,
    feat_dim=2048,
    num_labels=1601,
    random_range=(999, 28996),
)
TASK_CFGS = {
    "mlm": {"type": "mlm"},
    "mrfr": {"type": "mrfr"},
    "mrc": {"type": "mrc"},
    "mrc_kl": {"type": "mrc_kl"},
    "itm": {
        "type": "itm",
        "wra_weight": 0.1,
        "ot_solver": {"type": "ipot", "beta": 0.5, "iterations": 50, "inner_steps": 1},
    },
}
# Our task name -> the original's name in the fixture.
FIXTURE_NAME = {"mlm": "mlm", "mrfr": "mrfr", "mrc": "mrc", "mrc_kl": "mrckl", "itm": "itm"}


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def module(ref) -> VLModule:
    c = ref["config"]
    model = UniterModel(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        max_positions=c["max_position_embeddings"],
        type_vocab_size=c["type_vocab_size"],
        img_dim=ref["img_dim"],
    )
    tasks = {name: build(dict(cfg), TASKS) for name, cfg in TASK_CFGS.items()}
    for t in tasks.values():
        t.setup(model=model, info=INFO)
    vl = VLModule(model, tasks)
    state = original_to_vlframe(ref["state_dict"]).state_dict
    vl.load_state_dict(state, strict=True)  # every parameter of model and heads comes from the original
    return vl.eval()


def to_vlbatch(b: dict) -> VLBatch:
    """The original's collated batch -> vlframe's VLBatch (right-padded text and regions)."""
    input_ids = b["input_ids"]
    text_mask = input_ids != 0
    attn = b["attn_masks"].bool()
    text_len = text_mask.sum(1)
    num_bb = attn.sum(1) - text_len
    k = b["img_feat"].shape[1]
    img_mask = torch.arange(k)[None, :] < num_bb[:, None]
    # The original's attention mask covers exactly text + regions, packed from slot 0.
    assert torch.equal(attn, torch.arange(attn.shape[1])[None, :] < (text_len + num_bb)[:, None])
    batch = VLBatch(
        input_ids=input_ids,
        text_mask=text_mask,
        img_feat=b["img_feat"].clone(),
        img_pos=b["img_pos_feat"],
        img_mask=img_mask,
    )
    if "img_masks" in b:
        masked = b["img_masks"].bool()
        assert not (masked & ~img_mask).any()  # padding is never masked
        batch.img_masked = masked
        # The original zeroes masked features in the batch and keeps the raw ones as targets
        # (row-major over masked slots); our MRFR reads targets from img_feat at masked slots,
        # and the model zeroes them itself.
        assert (batch.img_feat[masked] == 0).all()
        if "feat_targets" in b:
            batch.img_feat[masked] = b["feat_targets"]
        if "label_targets" in b:
            soft = torch.zeros(*masked.shape, b["label_targets"].shape[1])
            soft[masked] = b["label_targets"]
            batch.soft_labels = soft
    if "txt_labels" in b:
        labels = b["txt_labels"].clone()
        labels[labels == -1] = IGNORE_INDEX
        batch.targets["txt_labels"] = labels
    if "targets" in b:
        batch.targets["itm"] = b["targets"]
    return batch


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == theirs.shape, (tuple(ours.shape), tuple(theirs.shape))
    err = float((ours.double() - theirs.double()).abs().max()) if ours.numel() else 0.0
    assert err <= atol, f"max |diff| {err:.3g} > {atol}"


@pytest.mark.parametrize("task", list(TASK_CFGS))
def test_backbone_matches_original(ref, module, task):
    r = ref["tasks"][FIXTURE_NAME[task]]
    batch = to_vlbatch(r["batch"])
    with torch.no_grad():
        out = module.model(batch)
    # Same packed layout (text, regions, padding), same length; compare the real slots only.
    real = r["batch"]["attn_masks"].bool()
    assert torch.equal(out.sequence_mask, real)
    close(out.sequence[real], r["sequence_output"][real])
    close(out.pooled, r["pooled_output"])


def test_mlm_matches_original(ref, module):
    r = ref["tasks"]["mlm"]
    with torch.no_grad():
        res = module.tasks["mlm"](module.model, to_vlbatch(r["batch"]))
    close(res.outputs["logits"], r["outputs"])
    close(res.loss, r["losses"].mean())
    # MRC-kl's loss is ~1e-3 here, so also hold it to a relative bound.
    assert abs(float(res.loss) - float(r["losses"].mean())) <= 1e-4 * float(r["losses"].mean())


def test_mrfr_matches_original(ref, module):
    r = ref["tasks"]["mrfr"]
    with torch.no_grad():
        res = module.tasks["mrfr"](module.model, to_vlbatch(r["batch"]))
    close(res.outputs["pred"], r["outputs"])
    close(res.loss, r["losses"].mean())


@pytest.mark.parametrize("task", ["mrc", "mrc_kl"])
def test_region_classification_matches_original(ref, module, task):
    r = ref["tasks"][FIXTURE_NAME[task]]
    with torch.no_grad():
        res = module.tasks[task](module.model, to_vlbatch(r["batch"]))
    # One shared region classifier in the original: both heads reproduce its logits.
    close(res.outputs["logits"], r["outputs"])
    close(res.loss, r["losses"].mean())
    # MRC-kl's loss is ~1e-3 here, so also hold it to a relative bound.
    assert abs(float(res.loss) - float(r["losses"].mean())) <= 1e-4 * float(r["losses"].mean())


def test_itm_with_wra_matches_original(ref, module):
    r = ref["tasks"]["itm"]
    batch = to_vlbatch(r["batch"])
    # The original's OT padding masks agree with ours.
    assert torch.equal(r["batch"]["ot_inputs"]["txt_pad"].bool(), ~batch.text_mask)
    assert torch.equal(r["batch"]["ot_inputs"]["img_pad"].bool(), ~batch.img_mask)
    with torch.no_grad():
        res = module.tasks["itm"](module.model, batch)
    logits_ref, (pos_ref, neg_ref) = r["outputs"]
    ce_ref, (pos_loss_ref, neg_loss_ref) = r["losses"]
    close(res.outputs["logits"], logits_ref)
    close(res.logs["ce"], ce_ref.mean())
    matched = batch.targets["itm"] == 1
    ot_pos, ot_neg = res.outputs["ot_distance"][matched], res.outputs["ot_distance"][~matched]
    close(ot_pos, pos_loss_ref, OT_ATOL)
    close(ot_neg, neg_loss_ref, OT_ATOL)
    close(ot_pos, pos_ref, OT_ATOL)
    close(ot_neg, neg_ref, OT_ATOL)
    # The original's total: ITM CE + 0.1 * (sum of matched OT - sum of mismatched) / batch.
    ot_loss = (pos_loss_ref.sum() - neg_loss_ref.sum()) / (pos_loss_ref.numel() + neg_loss_ref.numel())
    close(res.loss, ce_ref.mean() + 0.1 * ot_loss)  # the loss itself within 1e-5


def test_ipot_matches_original(ref):
    from vlframe.ot.cost import wra_distance

    c = ref["ipot"]
    solver = build({"type": "ipot", "beta": c["beta"], "iterations": c["iteration"], "inner_steps": c["k"]}, OT_SOLVERS)
    d = wra_distance(solver, c["txt_emb"], c["img_emb"], ~c["txt_pad"], ~c["img_pad"])
    close(d, c["distance"], OT_ATOL)  # default: plan rounded to exact marginals
    raw = build({"type": "ipot", "beta": c["beta"], "iterations": c["iteration"], "inner_steps": c["k"],
                 "round_marginals": False}, OT_SOLVERS)
    close(wra_distance(raw, c["txt_emb"], c["img_emb"], ~c["txt_pad"], ~c["img_pad"]), c["distance"])  # the original's plan
