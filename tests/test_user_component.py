"""The README's worked example: a component in one file outside vlframe, named by a config."""
import os

import torch

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine.trainer import Trainer

CONFIG = os.path.join(ROOT, "examples", "my_project", "pretrain_span_mlm.yaml")


def test_span_masker_from_config_trains(synth_cache, tmp_path):
    cfg = load_and_validate(CONFIG, tiny_overrides(synth_cache) + ["train.max_steps=2"])
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    task = trainer.module.tasks["mlm"]
    assert type(task.masker).__name__ == "SpanMasker" and task.masker.span == 3
    # The batches the loader makes carry spans: per example the masked words are contiguous.
    batch = trainer.streams["mlm"].next()
    labels = batch.targets["txt_labels"]
    for row in labels:
        idx = torch.nonzero(row != -100).flatten()
        assert 1 <= len(idx) <= 3 and int(idx[-1] - idx[0]) == len(idx) - 1
    metrics = trainer.train()
    assert "val/mlm/mlm_acc" in metrics


def test_list_components_shows_user_component():
    from vlframe.config import format_components

    text = format_components(config=CONFIG)
    assert "span" in text and "examples.my_project.span_masker" in text
