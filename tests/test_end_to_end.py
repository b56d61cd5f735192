"""End to end: a tiny UNITER trained on the synthetic world learns (metrics far above chance),
and the AMP paths run (bf16 autocast; fp16 with a GradScaler) on a tiny model."""
import collections

import pytest
import torch

from tests.conftest import tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine.trainer import Trainer


def _most_frequent_word_rate(dataset) -> float:
    """Chance level for MLM: always predicting the most frequent maskable word of the split.
    (Any predictor that ignores the context does no better on average.)"""
    special = set(dataset.special_ids.values())
    counts = collections.Counter(
        t for i in range(len(dataset)) for t in dataset.text_ids(i).tolist() if t not in special
    )
    return counts.most_common(1)[0][1] / sum(counts.values())


@pytest.mark.slow
def test_tiny_uniter_learns_mlm(synth_cache, tmp_path):
    overrides = tiny_overrides(synth_cache, num_images=400) + [
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
        "train.max_steps=300", "train.warmup_steps=30", "train.lr=2e-3", "train.val_batches=0",
        "train.val_interval=1000", "data.sampler.budget=1024",
    ]
    cfg = load_and_validate("configs/uniter/ablations/L05_mlm.yaml", overrides)
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    chance = _most_frequent_word_rate(trainer.val_set)
    before = trainer.validate()["val/mlm/mlm_acc"]
    metrics = trainer.train()
    acc = metrics["val/mlm/mlm_acc"]
    # Far above chance: at least twice the most-frequent-word rate and 20 points over it.
    assert acc > 2 * chance and acc > chance + 0.2, (acc, chance, before)
    assert acc > before + 0.2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_paths_run(amp, synth_cache, tmp_path):
    cfg = load_and_validate(
        "configs/uniter/pretrain_tiny_synth.yaml",
        tiny_overrides(synth_cache) + [f"train.amp={amp}", "train.max_steps=4", "data.val=null"],
    )
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")  # bf16 needs no loss scaling
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        for task in ("mlm", "itm", "mrfr", "mrc_kl"):
            logs = trainer.train_step(task, [trainer.streams[task].next()])
            assert logs["loss"] == logs["loss"] and abs(logs["loss"]) != float("inf"), (task, logs)
            if amp == "bf16":
                assert logs["grad_norm"] == logs["grad_norm"], (task, logs)
            # fp16: an overflowing step is skipped by the scaler, which lowers its scale instead.
    if amp == "fp16":
        assert trainer.scaler.get_scale() < 65536.0
    changed = sum(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert changed > 10
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "master weights stay fp32"
