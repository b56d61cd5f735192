"""The training loop: accumulation equals the big batch; resume continues exactly; checkpoints
are atomic and load with weights_only; a damaged newest checkpoint is skipped."""
import copy
import os

import pytest
import torch

from tests.conftest import tiny_overrides
from vlframe.config import load_and_validate
from vlframe.data.batch import collate
from vlframe.engine import checkpoint as ckpt
from vlframe.engine.trainer import Trainer

CONFIG = "configs/uniter/pretrain_tiny_synth.yaml"


def _trainer(synth_cache, tmp_path, *extra):
    cfg = load_and_validate(CONFIG, tiny_overrides(synth_cache) + list(extra))
    return Trainer(cfg, work_dir=str(tmp_path))


def test_accumulation_equals_one_big_batch(synth_cache, tmp_path):
    """K=3 micro-batches of N=4 give the same parameters after one step as one batch of 12."""
    # the original's WRA contrast (sums / batch): per-example terms, so exact; the demo's per-side
    # contrast normalises per micro-batch, and the trainer says so (below)
    no_dropout = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0", "train.warmup_steps=0",
                  "tasks.itm.wra_loss={type: ot_contrast, normalize: batch}"]
    with pytest.warns(UserWarning, match=r"tasks.itm.wra_loss: normalised per micro-batch"):
        _trainer(synth_cache, tmp_path / "c", "train.grad_accum=3")
    a = _trainer(synth_cache, tmp_path / "a", *no_dropout, "train.grad_accum=3")
    b = _trainer(synth_cache, tmp_path / "b", *no_dropout, "train.grad_accum=1")
    b.model.load_state_dict(a.model.state_dict())
    before = copy.deepcopy(a.model.state_dict())
    task = a.model.tasks["itm"]  # CE mean + wra_weight * OT sums / batch: per-example terms, so exact
    ds = a.train_set
    examples = [ds[i] for i in range(0, 60, 5)]
    g = torch.Generator().manual_seed(0)
    big = task.collate(examples, generator=g, dataset=ds)
    # The same pairs (negatives included) split into 3 micro-batches of 4.
    micro = []
    for s in range(0, 12, 4):
        m = collate(examples[s : s + 4])
        sel = slice(s, s + 4)
        m.img_feat, m.img_pos, m.img_mask = (
            big.img_feat[sel][:, : big.img_mask[sel].sum(1).max()],
            big.img_pos[sel][:, : big.img_mask[sel].sum(1).max()],
            big.img_mask[sel][:, : big.img_mask[sel].sum(1).max()],
        )
        m.soft_labels = None  # ITM batches carry no soft labels
        m.targets["itm"] = big.targets["itm"][sel]
        micro.append(m)
    assert 0 < int(big.targets["itm"].sum()) < 12, "want both matched and mismatched pairs"
    a.train_step("itm", micro)
    b.train_step("itm", [big])
    moved = 0
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], atol=1e-6, rtol=0), k
        moved += int(not torch.equal(v, before[k]))
    assert moved > 10, "the step changed (almost) nothing: the test would prove nothing"


def test_resume_continues_exactly(synth_cache, tmp_path):
    """6 steps in one go == 3 steps, stop, resume=auto, 3 more: same weights, same task sequence."""
    common = ["train.max_steps=6", "train.ckpt_interval=3", "train.val_interval=100", "data.val=null"]
    full = _trainer(synth_cache, tmp_path / "full", *common, "hooks=[{type: TaskCounter}]")
    full.train()
    part = _trainer(synth_cache, tmp_path / "part", *common, "hooks=[{type: TaskCounter}]", "train.max_steps=3")
    part.train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "part" / "checkpoints"))] == [3]
    resumed = _trainer(synth_cache, tmp_path / "part", *common, "hooks=[{type: TaskCounter}]")
    resumed.train()
    assert resumed.step == 6
    assert resumed.hooks[0].counts == full.hooks[0].counts
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for name in full.streams:
        assert full.streams[name].state_dict() == resumed.streams[name].state_dict()


def test_checkpoint_is_atomic_and_safe(synth_cache, tmp_path):
    t = _trainer(synth_cache, tmp_path, "train.max_steps=2", "train.ckpt_interval=1", "data.val=null",
                 "train.keep_ckpts=5")
    t.train()
    paths = ckpt.list_checkpoints(str(tmp_path / "checkpoints"))
    assert [s for s, _ in paths] == [1, 2]
    state = torch.load(paths[-1][1], weights_only=True)  # no code can run while loading
    assert state["step"] == 2 and state["config"]["train"]["max_steps"] == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "data", "chooser", "config"}
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    # A damaged newest checkpoint (a crash mid-copy elsewhere) is skipped, not trusted.
    with open(tmp_path / "checkpoints" / "ckpt_0000003.pt", "wb") as f:
        f.write(b"\x00garbage")
    path, found = ckpt.newest_good(str(tmp_path / "checkpoints"))
    assert path.endswith("ckpt_0000002.pt") and found["step"] == 2

    # An interrupted save leaves the previous file intact and no stray temp file.
    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        ckpt.atomic_save({"x": Boom()}, paths[-1][1])
    assert torch.load(paths[-1][1], weights_only=True)["step"] == 2
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    # The resolved config sits next to the checkpoints.
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "metrics.jsonl").is_file()


def test_optimizer_groups_exclude_bias_and_layernorm(synth_cache, tmp_path):
    t = _trainer(synth_cache, tmp_path)
    decay, plain = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    ln = t.model.encoder.text_embed.norm
    plain_ids = {id(p) for p in plain["params"]}
    assert id(ln.weight) in plain_ids and id(ln.bias) in plain_ids
    assert id(t.model.encoder.pooler.bias) in plain_ids and id(t.model.encoder.pooler.weight) not in plain_ids
    n_all = sum(1 for _ in t.model.parameters())
    assert len(decay["params"]) + len(plain["params"]) == n_all  # tied weights counted once


def test_loader_workers_train_exactly_as_the_main_process(synth_cache, tmp_path):
    """data.num_workers=2 (every task's workers filling reused shared-memory blocks, handed back by
    VLBatch.to) trains to the same weights as loading in the main process: same batches, same
    masks and negatives, nothing overwritten while in use."""
    common = ["train.max_steps=8", "train.ckpt_interval=100", "train.val_interval=100", "data.val=null",
              "train.phases=[]"]  # the task mix from step 1: every task's stream and workers in use
    main = _trainer(synth_cache, tmp_path / "w0", *common, "data.num_workers=0")
    main.train()
    workers = _trainer(synth_cache, tmp_path / "w2", *common, "data.num_workers=2")
    workers.train()
    pools = [s.loader.dataset.pool for s in workers.streams.values()]
    assert len(pools) == 4 and all(p is not None for p in pools)
    assert sum(int(p.leases.sum()) for p in pools) >= 8 and sum(int(p.leases.max()) > 0 for p in pools) >= 2
    for k, v in main.model.state_dict().items():
        assert torch.equal(v, workers.model.state_dict()[k]), k
