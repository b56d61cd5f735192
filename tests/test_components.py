"""Heads, losses and metrics are components reached from config: swapping one changes what it
should by the expected amount; metrics reduce across ranks as sums and counts; every registry is
reachable from a config and every schema key is read by code."""
import dataclasses
import os
import re
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from projects.uniter.uniter.model import UniterModel
from tests.conftest import ROOT
from vlframe.data.dataset import SyntheticPairs
from vlframe.registry import ALL_REGISTRIES, METRICS, TASKS, build
from vlframe.tasks.base import DataInfo

sys.path.insert(0, os.path.join(ROOT, "tests"))  # fixtures_plugin: user code outside vlframe
import fixtures_plugin.my_losses  # noqa: E402,F401  (registers MyFocalLoss)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ds = SyntheticPairs(cache_dir=str(tmp_path_factory.mktemp("w")), num_images=60, feat_dim=16)
    torch.manual_seed(0)
    model = UniterModel(vocab_size=ds.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, img_dim=16).eval()
    return ds, model, DataInfo.from_dataset(ds)


def _task(cfg, world, seed=0):
    ds, model, info = world
    torch.manual_seed(seed)  # same head initialisation for every variant of a task
    t = build(cfg, TASKS)
    t.setup(model=model, info=info)
    return t.eval()


def _batch(task, world, seed=3):
    ds = world[0]
    return task.collate([ds[i] for i in range(24)], generator=torch.Generator().manual_seed(seed), dataset=ds)


def test_focal_loss_gamma_zero_equals_cross_entropy_and_gamma_two_down_weights(world):
    ce_task = _task({"type": "itm"}, world)
    batch = _batch(ce_task, world)
    with torch.no_grad():
        ce = ce_task(world[1], batch)
        f0 = _task({"type": "itm", "loss": {"type": "MyFocalLoss", "gamma": 0.0}}, world)(world[1], batch)
        f2 = _task({"type": "itm", "loss": {"type": "MyFocalLoss", "gamma": 2.0}}, world)(world[1], batch)
    assert torch.equal(ce.outputs["logits"], f0.outputs["logits"])  # same head init, same batch
    assert abs(float(f0.loss) - float(ce.loss)) < 1e-6
    # gamma=2 weighs each row's CE by (1 - p_target)^2 < 1: strictly smaller, by that amount.
    logits, target = ce.outputs["logits"], batch.targets["itm"]
    p = logits.softmax(-1).gather(1, target[:, None]).squeeze(1)
    expected = ((1 - p) ** 2 * -p.log()).mean()
    assert float(f2.loss) < float(ce.loss) and abs(float(f2.loss) - float(expected)) < 1e-6


def test_label_smoothing_zero_equals_cross_entropy_and_smoothing_follows_its_formula(world):
    plain = _task({"type": "mlm"}, world)
    batch = _batch(plain, world)
    with torch.no_grad():
        ce = plain(world[1], batch)
        ls0 = _task({"type": "mlm", "loss": {"type": "cross_entropy", "label_smoothing": 0.0}}, world)(world[1], batch)
        ls = _task({"type": "mlm", "loss": {"type": "cross_entropy", "label_smoothing": 0.1}}, world)(world[1], batch)
    assert abs(float(ls0.loss) - float(ce.loss)) < 1e-6
    logp = ce.outputs["logits"].log_softmax(-1)
    nll = -logp.gather(1, ce.outputs["target"][:, None]).squeeze(1)
    expected = (0.9 * nll + 0.1 * -logp.mean(-1)).mean()  # (1-e) CE + e * CE to the uniform
    assert abs(float(ls.loss) - float(expected)) < 1e-5


def test_untied_user_head_owns_its_weights_and_tied_default_shares_the_embedding(world):
    ds, model, info = world
    tied = _task({"type": "mlm"}, world)
    assert tied.head.tied is model.tie_targets()["word_embeddings"]
    assert not any(p is model.tie_targets()["word_embeddings"].weight for p in tied.head.parameters())
    untied = _task({"type": "mlm", "head": {"type": "MLPHead"}}, world)  # an MLM head that is not tied
    assert untied.head.out.out_features == ds.vocab_size and untied.head.hidden.in_features == 32
    batch = _batch(untied, world)
    out = untied(model, batch)
    assert out.outputs["logits"].shape == (int((batch.targets["txt_labels"] != -100).sum()), ds.vocab_size)


def test_head_size_conflicts_and_missing_tie_targets_fail_naming_the_key(world):
    ds, model, info = world
    with pytest.raises(ValueError, match=r"tasks\.mlm\.head\.hidden_size: set to 64, but the model and data give 32"):
        t = build({"type": "mlm", "head": {"type": "TiedTokenHead", "hidden_size": 64}}, TASKS)
        t.setup(model=model, info=info, where="tasks.mlm")

    class NoTies(UniterModel):
        def tie_targets(self):
            return {}

    bare = NoTies(vocab_size=ds.vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, img_dim=16)
    with pytest.raises(ValueError, match=r"tasks\.mrfr\.head: TiedFeatureHead ties to the model's 'region_projection'"):
        build({"type": "mrfr"}, TASKS).setup(model=bare, info=info, where="tasks.mrfr")


# ----------------------------------------------------------------------------- metrics across ranks


def _metric_batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = int(torch.randint(3, 9, (), generator=g))
        logits = torch.randn(b, 5, generator=g)
        out.append({"logits": logits, "target": torch.randint(0, 5, (b,), generator=g),
                    "loss": torch.rand((), generator=g), "loss_count": b,
                    "kl": torch.rand(b, generator=g)})
    return out


METRIC_NODES = [{"type": "accuracy"}, {"type": "loss_average"}, {"type": "mean", "name": "kl", "key": "kl"}]


def _compute(batches):
    metrics = [build(dict(m), METRICS) for m in METRIC_NODES]
    for b in batches:
        for m in metrics:
            m.update(b)
    return {k: v for m in metrics for k, v in m.compute().items()}


def _reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Unequal work: rank 0 sees 7 batches, rank 1 sees 2 (and nothing more).
        torch.save(_compute(_metric_batches(seed=rank, n=7 if rank == 0 else 2)), os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metrics_reduce_sums_and_counts_across_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    union = _compute(_metric_batches(seed=0, n=7) + _metric_batches(seed=1, n=2))
    assert r0 == r1  # every rank gets the global value
    for k, v in union.items():
        assert abs(r0[k] - v) < 1e-12, (k, r0[k], v)
    # ... which is not the mean of the per-rank values (what averaging means would give).
    per_rank = [_compute(_metric_batches(seed=0, n=7)), _compute(_metric_batches(seed=1, n=2))]
    assert any(abs((a[k] + b[k]) / 2 - union[k]) > 1e-6 for a, b in [per_rank] for k in union)


# ----------------------------------------------------------------------------- nothing accepted is ignored


def test_every_registry_is_reachable_from_a_config():
    from vlframe.config.validate import NESTED, POSITIONS

    reachable = {reg.name for _, reg, _ in POSITIONS} | {reg.name for _, reg in NESTED}
    assert set(ALL_REGISTRIES) - reachable == set(), "a registry no config position or key reaches"


def _schema_keys(config_cls):
    import typing

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield prefix + f.name, f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], prefix + f.name + ".")

    return list(walk(config_cls, ""))


def _code_reading_config() -> str:
    text = []
    for folder in ("vlframe", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and not path.endswith(os.path.join("config", "schema.py")):
                    with open(path) as f:
                        text.append(f.read())
    return "\n".join(text)


def unread_schema_keys(config_cls) -> list[str]:
    """Schema keys that no code outside schema.py reads. Read = an attribute access
    ``<cfg-like>.key`` or a ``["key"]`` / ``.get("key"`` lookup."""
    code = _code_reading_config()
    unread = []
    for dotted, key in _schema_keys(config_cls):
        if dotted == "vars":  # read by omegaconf's interpolation (${vars.x}), not by our code
            continue
        if dotted.startswith("slurm."):
            # Read by name in a loop; tests/test_launch.py changes each key and checks the submission.
            continue
        pattern = rf"(\b(cfg|tc|dc|config|train|data)\.{key}\b)|(\[['\"]{key}['\"]\])|(\.get\(['\"]{key}['\"])"
        if not re.search(pattern, code):
            unread.append(dotted)
    return unread


def test_every_schema_key_is_read_by_some_code_path():
    """A key the schema accepts but no code reads is a defect."""
    from vlframe.config.schema import Config

    assert unread_schema_keys(Config) == [], "schema keys no code reads"


def test_the_guard_catches_an_unread_key():
    """The guard can fail: a section with a key that nothing reads is reported."""
    from vlframe.config import schema

    @dataclasses.dataclass
    class Train(schema.TrainConfig):
        frobnicate_level: int = 3  # read by nothing

    @dataclasses.dataclass
    class Patched(schema.Config):
        train: Train = dataclasses.field(default_factory=Train)

    assert unread_schema_keys(Patched) == ["train.frobnicate_level"]


def test_list_components_shows_arguments_defaults_and_task_defaults():
    from vlframe.config import format_components

    tasks = format_components(registry="task")
    assert "default head: {'type': 'TiedTokenHead'}" in tasks and "default loss: {'type': 'kl_div'}" in tasks
    assert "default metrics: [{'type': 'accuracy', 'name': 'itm_acc'}" in tasks
    assert "label_smoothing: float = 0.0" in format_components(registry="loss")
    heads = format_components(registry="model")
    assert "vocab_size: int  (as a head: filled in by the task from the model and data)" in heads
    assert "num_images: int = 50" in format_components(registry="metric")
