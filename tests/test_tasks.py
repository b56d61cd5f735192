"""Pretraining tasks: what their batches are made of, and where their heads run."""
import pytest
import torch

from projects.uniter.uniter.model import UniterModel
from vlframe.data.dataset import SyntheticPairs
from vlframe.masking import IGNORE_INDEX
from vlframe.registry import TASKS, build
from vlframe.tasks.base import DataInfo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ds = SyntheticPairs(cache_dir=str(tmp_path_factory.mktemp("w")), num_images=60, feat_dim=16)
    model = UniterModel(vocab_size=ds.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, img_dim=16).eval()
    return ds, model, DataInfo.from_dataset(ds)


def _task(cfg, world):
    ds, model, info = world
    t = build(cfg, TASKS)
    t.setup(model=model, info=info)
    return t


def _examples(ds, n=24):
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mrc_kl"])
def test_masked_tasks_see_only_matched_pairs(name, world):
    ds, model, info = world
    task = _task({"type": name}, world)
    ex = _examples(ds)
    batch = task.collate(ex, generator=torch.Generator().manual_seed(0), dataset=ds)
    assert batch.img_ids == [e.img_id for e in ex] and batch.txt_ids == [e.txt_id for e in ex]
    for i, e in enumerate(ex):  # the regions are each text's own image's
        k = e.img_feat.shape[0]
        assert torch.equal(batch.img_feat[i, :k], e.img_feat.float())
    assert "itm" not in batch.targets


def test_region_heads_run_on_masked_positions_only(world):
    ds, model, info = world
    for name in ("mrfr", "mrc", "mrc_kl"):
        task = _task({"type": name}, world)
        batch = task.collate(_examples(ds), generator=torch.Generator().manual_seed(1), dataset=ds)
        out = task(model, batch)
        n_masked = int(batch.img_masked.sum())
        assert n_masked >= batch.size  # at least one per example
        assert not (batch.img_masked & ~batch.img_mask).any()
        rows = next(iter(out.outputs.values())).shape[0]
        assert rows == n_masked, name
    task = _task({"type": "mlm"}, world)
    batch = task.collate(_examples(ds), generator=torch.Generator().manual_seed(2), dataset=ds)
    assert task(model, batch).outputs["logits"].shape[0] == int((batch.targets["txt_labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("keep_fp16", [False, True])
def test_region_class_batches_carry_soft_labels_of_masked_regions_only(world, keep_fp16):
    from vlframe.data.batch import collate, collate_keeps_fp16, gather_masked_soft_labels

    import dataclasses

    ds, model, info = world
    ex = _examples(ds)
    if keep_fp16:  # as a real (fp16) store holds them; the synthetic world's are float32
        ex = [dataclasses.replace(e, soft_labels=e.soft_labels.half()) for e in ex]
    padded = collate(ex, soft_labels=True).soft_labels  # every region's, float32
    for name in ("mrc", "mrc_kl"):
        task = _task({"type": name}, world)
        with collate_keeps_fp16(keep_fp16):
            batch = task.collate(ex, generator=torch.Generator().manual_seed(4), dataset=ds)
        assert batch.soft_labels is None  # the padded [B, K, C] tensor is never built
        soft = batch.masked_soft_labels
        assert soft.dtype == (torch.float16 if keep_fp16 else torch.float32)
        assert soft.shape == (int(batch.img_masked.sum()), ds.num_labels)
        assert torch.equal(soft.float(), padded[batch.img_masked])  # same rows, same order
        moved = batch.to("cpu")
        assert moved.masked_soft_labels.dtype == torch.float32
        # the old contract (padded soft labels) gives the same loss
        old = collate(ex, soft_labels=True)
        old.img_masked, old.input_ids = moved.img_masked, moved.input_ids
        assert torch.equal(task(model, moved).loss, task(model, old).loss)
    # an example without soft labels: nothing to gather
    bare = [ex[0], type(ex[1])(ex[1].txt_id, ex[1].img_id, ex[1].input_ids, ex[1].img_feat, ex[1].img_pos)]
    assert gather_masked_soft_labels(bare, torch.ones(2, 3, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="beyond them"):
        k = ex[0].img_feat.shape[0]
        gather_masked_soft_labels(ex[:1], torch.arange(k + 1)[None] == k)


@pytest.mark.parametrize("side", ["image", "text", "both"])
def test_itm_negatives_side_and_rate(side, world):
    ds, model, info = world
    task = _task({"type": "itm", "neg_prob": 0.3, "side": side}, world)
    ex = [ds[i] for i in range(len(ds))]
    g = torch.Generator().manual_seed(3)
    neg = total = swapped_img = swapped_txt = 0
    for s in range(0, len(ex), 50):
        chunk = ex[s : s + 50]
        batch = task.collate(chunk, generator=g, dataset=ds)
        t = batch.targets["itm"]
        neg += int((t == 0).sum())
        total += t.numel()
        for i, e in enumerate(chunk):
            same_img = batch.img_ids[i] == e.img_id
            same_txt = torch.equal(batch.input_ids[i, : e.input_ids.numel()], e.input_ids)
            if t[i] == 1:
                assert same_img and same_txt
            else:
                swapped_img += int(not same_img)
                swapped_txt += int(not same_txt)
    assert abs(neg / total - 0.3) < 0.05
    if side == "image":
        assert swapped_img == neg and swapped_txt == 0
    elif side == "text":
        assert swapped_img == 0 and swapped_txt >= neg * 0.9  # a different caption may tokenise alike
    else:
        assert swapped_img > 0.3 * neg and swapped_txt > 0.3 * neg


def test_wra_inside_itm_follows_the_original_formula(world):
    ds, model, info = world
    task = _task({"type": "itm", "wra_weight": 0.1, "ot_solver": {"type": "ipot"}}, world)
    batch = task.collate(_examples(ds), generator=torch.Generator().manual_seed(4), dataset=ds)
    out = task(model, batch)
    matched = batch.targets["itm"] == 1
    d = out.outputs["ot_distance"]
    pos, neg = d[matched], d[~matched]
    assert pos.numel() + neg.numel() == batch.size and pos.numel() and neg.numel()
    expected = float(out.logs["ce"]) + 0.1 * float((pos.sum() - neg.sum()).detach() / batch.size)
    assert abs(out.loss.item() - expected) < 1e-5


@pytest.mark.parametrize("task_type", ["itm", "wra"])
def test_wra_logs_the_solvers_marginal_error(task_type, world):
    """The marginal error of the plan WRA used is in the task's logs, measured on that plan."""
    from vlframe.ot import cosine_cost

    ds, model, info = world
    cfg = {"type": task_type, "ot_solver": {"type": "sinkhorn", "epsilon": 1e-3, "iterations": 20, "tol": None}}
    if task_type == "itm":
        cfg["wra_weight"] = 0.1
    task = _task(cfg, world)
    batch = task.collate(_examples(ds), generator=torch.Generator().manual_seed(4), dataset=ds)
    logs = task(model, batch).logs
    out = model(batch)
    cost = cosine_cost(out.text, out.regions, out.text_mask, out.region_mask)
    plan = task.solver(cost, out.text_mask, out.region_mask)
    rows = (plan.sum(2) - 1 / out.text_mask.sum(1, keepdim=True)).abs() * out.text_mask
    assert logs["ot_marginal_err"] == pytest.approx(float(rows.max()), rel=1e-4)
    assert logs["ot_marginal_err"] > 1e-3  # 20 unchecked iterations at epsilon 1e-3 are far from converged
