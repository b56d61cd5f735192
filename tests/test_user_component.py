"""Components written outside vlframe, selected by config: the README's worked examples (a new
ITM head; a span masker), and a head plus a loss in a module outside the repository selected
from the command line of tools/train.py."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine.trainer import Trainer

EXAMPLES = os.path.join(ROOT, "examples", "my_project")


def test_readme_head_example_trains(synth_cache, tmp_path):
    cfg = load_and_validate(
        os.path.join(EXAMPLES, "pretrain_mlp_itm.yaml"),
        tiny_overrides(synth_cache) + ["train.max_steps=3", "train.phases=[]",
                                       "tasks.itm.metrics=[{type: accuracy, name: itm_acc}]"],
    )
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    head = trainer.model.tasks["itm"].head
    assert type(head).__name__ == "MLPITMHead" and type(head).__module__ == "examples.my_project.mlp_itm_head"
    # Sizes came from the model (hidden 32 in the tiny overrides) and the task (2 classes).
    assert head.net[0].in_features == 32 and head.net[-1].out_features == 2 and head.net[0].out_features == 256
    before = head.net[0].weight.detach().clone()
    metrics = trainer.train()
    assert not torch.equal(before, head.net[0].weight), "the user's head did not train"
    assert 0.0 <= metrics["val/itm/itm_acc"] <= 1.0


def test_span_masker_from_config_trains(synth_cache, tmp_path):
    cfg = load_and_validate(os.path.join(EXAMPLES, "pretrain_span_mlm.yaml"), tiny_overrides(synth_cache) + ["train.max_steps=2"])
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    task = trainer.model.tasks["mlm"]
    assert type(task.masker).__name__ == "SpanMasker" and task.masker.span == 3
    # The batches the loader makes carry spans: per example the masked words are contiguous.
    batch = trainer.streams["mlm"].next()
    labels = batch.targets["txt_labels"]
    for row in labels:
        idx = torch.nonzero(row != -100).flatten()
        assert 1 <= len(idx) <= 3 and int(idx[-1] - idx[0]) == len(idx) - 1
    metrics = trainer.train()
    assert "val/mlm/mlm_acc" in metrics


USER_MODULE = '''
"""A user's own components, in a folder outside the repository."""
import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import LOSSES, MODELS


@MODELS.register_module(name="outside_bilinear_itm")
class BilinearITMHead(nn.Module):
    """Scores a pair from the mean text state and the mean region state, bilinearly."""

    def __init__(self, *, hidden_size: int, num_classes: int, rank: int = 8):
        super().__init__()
        self.text = nn.Linear(hidden_size, rank * num_classes)
        self.region = nn.Linear(hidden_size, rank * num_classes)
        self.num_classes, self.rank = num_classes, rank

    def forward(self, out):
        def mean(x, m):
            m = m[..., None].to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp(min=1)
        t = self.text(mean(out.text, out.text_mask)).view(-1, self.num_classes, self.rank)
        r = self.region(mean(out.regions, out.region_mask)).view(-1, self.num_classes, self.rank)
        return (t * r).sum(-1)


@LOSSES.register_module(name="outside_focal")
class FocalLoss(nn.Module):
    """Focal loss (Lin et al.): mean over rows of (1 - p_target)^gamma * CE."""

    def __init__(self, *, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target):
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()
'''


def test_head_and_loss_outside_the_repo_from_the_command_line(synth_cache, tmp_path):
    plugin = tmp_path / "my_lab"
    plugin.mkdir()
    (plugin / "vl_components.py").write_text(textwrap.dedent(USER_MODULE))
    work = tmp_path / "run"
    overrides = tiny_overrides(synth_cache) + [
        "train.max_steps=4", "train.phases=[]", "train.val_interval=4",
        "custom_imports=[projects.uniter,vl_components]",
        "tasks.itm.head={type: outside_bilinear_itm, rank: 4}",
        "tasks.itm.loss={type: outside_focal, gamma: 2.0}",
        "tasks.itm.metrics=[{type: accuracy, name: itm_acc}]",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), ROOT]))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
           os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml"), "--work-dir", str(work), *overrides]
    run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("val/itm/itm_acc" in r for r in records)
    assert any(k.startswith("train/itm/") for r in records for k in r)
    state = torch.load(next((work / "checkpoints").glob("ckpt_*.pt")), map_location="cpu", weights_only=True)
    # The bilinear head's weights are in the checkpoint, under the ITM task.
    assert state["model"]["tasks.itm.head.text.weight"].shape == (2 * 4, 32)
    assert state["config"]["tasks"]["itm"]["loss"] == {"type": "outside_focal", "gamma": 2.0}
    # An argument the user's head does not take fails at validation, naming the dotted path.
    typo = [o if not o.startswith("tasks.itm.head=") else "tasks.itm.head={type: outside_bilinear_itm, rnk: 4}" for o in cmd]
    bad = subprocess.run(typo,
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "tasks.itm.head.rnk: unknown argument of 'outside_bilinear_itm'" in bad.stderr
    assert "did you mean 'tasks.itm.head.rank'?" in bad.stderr


def test_list_components_shows_user_component():
    from vlframe.config import format_components

    text = format_components(config=os.path.join(EXAMPLES, "pretrain_span_mlm.yaml"))
    assert "span" in text and "examples.my_project.span_masker" in text


def test_readme_head_typo_message():
    from vlframe.config import ConfigError

    try:
        load_and_validate(os.path.join(EXAMPLES, "pretrain_mlp_itm.yaml"), ["tasks.itm.head.hiden=3"])
    except ConfigError as e:
        message = str(e)
    assert message.startswith(
        "tasks.itm.head.hiden: unknown argument of 'MLPITMHead' (examples.my_project.mlp_itm_head.MLPITMHead); "
        "did you mean 'tasks.itm.head.hidden'?"
    ), message
