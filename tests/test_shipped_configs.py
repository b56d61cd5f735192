"""Every config shipped in configs/ validates before anything runs, and every Table 2 ablation
trains 2 steps (tiny model, tiny world) and validates."""
import glob
import os

import pytest

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine.trainer import Trainer

# configs/uniter/sweeps/ holds sweep files, not configs (tests/test_table2_sweep.py checks them)
TOP = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "uniter", "**", "*.yaml"), recursive=True)
             if os.sep + "sweeps" + os.sep not in p)
ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "configs", "uniter", "ablations", "*.yaml")))


def test_there_are_configs():
    names = {os.path.basename(p) for p in ABLATIONS}
    for line in range(1, 15):
        assert any(n.startswith(f"L{line:02d}_") for n in names), f"Table 2 line {line} has no config"
    assert "L11_sinkhorn.yaml" in names


@pytest.mark.parametrize("path", TOP, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_validates(path):
    cfg = load_and_validate(path)
    assert cfg.tasks, "a config with no task"
    assert cfg.model.type == "UniterModel"


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_ablation_runs_two_steps(path, synth_cache, tmp_path):
    steps = 0 if os.path.basename(path).startswith("L01") else 2  # L1: no pretraining, still validated
    overrides = tiny_overrides(synth_cache) + [f"train.max_steps={steps}", "train.warmup_steps=1"]
    if "itm" in load_and_validate(path).tasks:
        # Retrieval over 8 images keeps the 2-step runs short; the other ITM metrics as shipped.
        overrides.append("tasks.itm.metrics=[{type: accuracy, name: itm_acc}, {type: ot_distance}, "
                         "{type: retrieval_recall, num_images: 8}]")
    cfg = load_and_validate(path, overrides)
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    metrics = trainer.train()
    assert trainer.step == cfg.train.max_steps
    assert os.path.isfile(tmp_path / "checkpoints" / f"ckpt_{trainer.step:07d}.pt")
    assert metrics, "validation produced no metric"
    for name in cfg.tasks:
        assert any(k.startswith(f"val/{name}/") for k in metrics), name
    assert all(v == v for v in metrics.values()), f"NaN metric: {metrics}"
