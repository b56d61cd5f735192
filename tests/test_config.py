"""Config loading (_base_, overrides, interpolation, _delete_), validation and saving."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from vlframe import registry as R
from vlframe.config import (
    ConfigError,
    UnknownTypeError,
    config_to_dict,
    load_and_validate,
    load_config,
    save_config,
    validate,
)

# Throwaway components with unique names (the real models and tasks are written elsewhere).


@R.MODELS.register_module(name="cfgtest_model")
class CfgTestModel:
    def __init__(self, *, hidden_size: int, num_layers: int = 2, dropout: float = 0.1, head: dict | None = None):
        self.hidden_size = hidden_size


@R.MODELS.register_module(name="cfgtest_head")
class CfgTestHead:
    # hidden_size and num_classes are head sizes the task fills in (HEAD_SIZE_KWARGS).
    def __init__(self, *, hidden_size: int, num_classes: int, depth: int):
        self.num_classes = num_classes


@R.TASKS.register_module(name="cfgtest_task")
class CfgTestTask:
    def __init__(self, *, ot_solver: dict | None = None, neg_prob: float = 0.5, extras: dict | None = None,
                 metrics: list[dict] | None = None):
        self.ot_solver = ot_solver


@R.OT_SOLVERS.register_module(name="cfgtest_ipot")
class CfgTestIpot:
    def __init__(self, *, beta: float = 0.5, iterations: int = 50):
        self.beta = beta


@R.OT_SOLVERS.register_module(name="cfgtest_sinkhorn")
class CfgTestSinkhorn:
    def __init__(self, *, epsilon: float, iterations: int = 100):
        self.epsilon = epsilon


@R.DATASETS.register_module(name="cfgtest_dataset")
class CfgTestDataset:
    def __init__(self, *, path: str, max_len: int = 40):
        self.path = path


@R.SAMPLERS.register_module(name="cfgtest_sampler")
class CfgTestSampler:
    def __init__(self, *, budget: int, shuffle: bool = True):
        self.budget = budget


@R.METRICS.register_module(name="cfgtest_kwargs_metric")
class CfgTestKwargsMetric:
    def __init__(self, *, name: str, **options):
        self.options = options


BASE = """
model: {type: cfgtest_model, hidden_size: 8}
tasks:
  itm: {type: cfgtest_task, mix: 2, ot_solver: {type: cfgtest_ipot, beta: 0.5, iterations: 50}}
data:
  train: {type: cfgtest_dataset, path: /data/train}
  sampler: {type: cfgtest_sampler, budget: 256}
train: {max_steps: 10}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base_cfg(tmp_path: Path) -> Path:
    """A valid config: a base file plus a child that only inherits."""
    write(tmp_path, "base.yaml", BASE)
    return write(tmp_path, "run.yaml", "_base_: base.yaml\n")


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- loading


def test_inheritance_order_and_merge(tmp_path):
    write(tmp_path, "other/base0.yaml", "a: 0\nonly0: true\n")
    write(tmp_path, "base1.yaml", "a: 1\nd: {x: 1, y: 1}\nl: [1, 2]\nb: 5\n")
    write(tmp_path, "other/base2.yaml", "_base_: base0.yaml\na: 2\nd: {y: 2, z: 2}\n")
    child = write(tmp_path, "exp/child.yaml", "_base_: [../base1.yaml, ../other/base2.yaml]\nd: {z: 3}\nc: 1\n")

    cfg = config_to_dict(load_config(child))
    # base0 via base2's own _base_; base2 after base1 (a=2); the file's d.z over both; lists kept
    assert cfg == {"a": 2, "only0": True, "d": {"x": 1, "y": 2, "z": 3}, "l": [1, 2], "b": 5, "c": 1}

    cfg = config_to_dict(load_config(child, ["a=7", "d.w.deep=4", "l=[7,8]", "b=null", "new.k=x"]))
    assert cfg["a"] == 7 and cfg["l"] == [7, 8] and cfg["b"] is None
    assert cfg["d"] == {"x": 1, "y": 2, "z": 3, "w": {"deep": 4}}
    assert cfg["new"] == {"k": "x"} and "_base_" not in cfg


def test_interpolation_resolved_after_overrides(tmp_path):
    write(tmp_path, "base.yaml", "hidden: 16\nmodel: {type: m, hidden_size: '${hidden}', ffn: '${mul:4}'}\n")
    path = write(tmp_path, "run.yaml", "_base_: base.yaml\nmodel: {ffn: '${hidden}'}\n")
    cfg = load_config(path, ["hidden=32"])
    assert cfg.model.hidden_size == 32 and cfg.model.ffn == 32

    bad = write(tmp_path, "bad.yaml", "a: {b: '${nope.x}'}\n")
    with pytest.raises(ConfigError, match=r"^a\.b: cannot resolve interpolation: .*nope\.x"):
        load_config(bad)


def test_delete_replaces_inherited_node(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    merged = write(
        tmp_path, "merged.yaml",
        "_base_: base.yaml\ntasks: {itm: {ot_solver: {type: cfgtest_sinkhorn, epsilon: 0.05}}}\n",
    )
    replaced = write(
        tmp_path, "replaced.yaml",
        "_base_: base.yaml\ntasks: {itm: {ot_solver: {_delete_: true, type: cfgtest_sinkhorn, epsilon: 0.05}}}\n",
    )
    # Without _delete_ the ipot kwargs are inherited, and sinkhorn rejects them by name.
    assert load_config(merged).tasks.itm.ot_solver.beta == 0.5
    assert error_of(merged).startswith("tasks.itm.ot_solver.beta: unknown argument of 'cfgtest_sinkhorn'")

    cfg = load_config(replaced)
    assert config_to_dict(cfg.tasks.itm.ot_solver) == {"type": "cfgtest_sinkhorn", "epsilon": 0.05}
    assert cfg.tasks.itm.mix == 2  # only the marked node is replaced
    validate(cfg)


def test_cli_mapping_override_replaces_node(base_cfg):
    cfg = load_config(base_cfg, ["tasks.itm.ot_solver={type: cfgtest_sinkhorn, epsilon: 0.05}"])
    assert config_to_dict(cfg.tasks.itm.ot_solver) == {"type": "cfgtest_sinkhorn", "epsilon": 0.05}
    validate(cfg)

    # Changing only the type keeps ipot's kwargs; the error says how to swap the whole node.
    message = error_of(base_cfg, ["tasks.itm.ot_solver.type=cfgtest_sinkhorn"])
    assert message.startswith("tasks.itm.ot_solver.beta: unknown argument of 'cfgtest_sinkhorn'")
    assert "tasks.itm.ot_solver='{type: ..., ...}'" in message

    with pytest.raises(ConfigError, match="space after ':'"):
        load_config(base_cfg, ["tasks.itm.ot_solver={type:cfgtest_sinkhorn}"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(base_cfg, ["train.max_steps"])


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    child = write(tmp_path, "sub/child.yaml", "_base_: [../gone.yaml]\n")
    with pytest.raises(FileNotFoundError) as info:
        load_config(child)
    message = str(info.value)
    assert str(tmp_path / "sub" / ".." / "gone.yaml") in message and f"_base_ of {child}" in message
    assert "\n" not in message


def test_base_cycle_names_chain(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\nx: 1\n")
    write(tmp_path, "b.yaml", "_base_: [c.yaml]\n")
    write(tmp_path, "c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(a)
    message = str(info.value)
    assert message.startswith("_base_ cycle:")
    assert message.index("a.yaml") < message.index("b.yaml") < message.index("c.yaml") < message.rindex("a.yaml")

    selfref = write(tmp_path, "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(selfref)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:3: invalid YAML"):
        load_config(bad)
    dup = write(tmp_path, "dup.yaml", "a: 1\na: 2\n")
    with pytest.raises(ConfigError, match=rf"^{dup}:2: invalid YAML: found duplicate key"):
        load_config(dup)
    lst = write(tmp_path, "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)


# ----------------------------------------------------------------------------- validation


def test_valid_config_and_defaults(base_cfg):
    validate(load_config(base_cfg))
    cfg = load_and_validate(base_cfg, ["train.lr=1"])  # int accepted for float
    assert cfg.train.lr == 1 and cfg.train.grad_accum == 1 and cfg.train.betas == [0.9, 0.98]
    assert cfg.data.num_workers == 0 and cfg.data.val is None and cfg.hooks == []
    assert cfg.work_dir == "work_dirs/run" and cfg.tasks.itm.mix == 2


def test_unknown_key_in_file_and_override(tmp_path, base_cfg):
    typo = write(tmp_path, "typo.yaml", "_base_: base.yaml\ntrain: {max_step: 5}\n")
    expected = "train.max_step: unknown key; did you mean 'train.max_steps'?"
    assert error_of(typo) == expected
    assert error_of(base_cfg, ["train.max_step=5"]) == expected
    assert error_of(base_cfg, ["sed=1"]) == "sed: unknown key; did you mean 'seed'?"
    assert error_of(base_cfg, ["data.num_worker=2"]) == "data.num_worker: unknown key; did you mean 'data.num_workers'?"


def test_wrong_types_and_enums(base_cfg):
    assert error_of(base_cfg, ["train.max_steps=abc"]) == "train.max_steps: expected int, got str 'abc'"
    assert error_of(base_cfg, ["train.max_steps=1.5"]) == "train.max_steps: expected int, got float 1.5"
    assert error_of(base_cfg, ["train.amp=bf17"]) == (
        "train.amp: expected one of 'auto', 'fp32', 'bf16', 'fp16', got str 'bf17'"
    )
    assert error_of(base_cfg, ["train.progress=3"]) == "train.progress: expected bool, got int 3"
    assert error_of(base_cfg, ["train.betas=[0.9, x]"]) == "train.betas.1: expected float, got str 'x'"
    assert error_of(base_cfg, ["data.pin_memory=yes_please"]).startswith("data.pin_memory: expected bool or null")
    assert error_of(base_cfg, ["train=5"]) == "train: expected a mapping, got int 5"
    assert error_of(base_cfg, ["train.grad_accum=0"]) == "train.grad_accum: must be >= 1, got 0"
    assert error_of(base_cfg, ["train.lr=-0.1"]) == "train.lr: must be >= 0, got -0.1"


def test_required_keys(tmp_path):
    no_steps = write(tmp_path, "a.yaml", BASE.replace("train: {max_steps: 10}", "train: {lr: 0.1}"))
    assert error_of(no_steps) == "train.max_steps: required key is missing"
    no_model = write(tmp_path, "b.yaml", BASE.replace("model: {type: cfgtest_model, hidden_size: 8}", ""))
    assert error_of(no_model) == "model: required key is missing"


def test_component_kwargs(base_cfg):
    sampler = f"{CfgTestSampler.__module__}.CfgTestSampler"
    assert error_of(base_cfg, ["data.sampler.budgt=5"]) == (
        f"data.sampler.budgt: unknown argument of 'cfgtest_sampler' ({sampler}); did you mean 'data.sampler.budget'?"
    )
    assert error_of(base_cfg, ["data.sampler.budget=many"]) == "data.sampler.budget: expected int, got str 'many'"
    dataset = f"{CfgTestDataset.__module__}.CfgTestDataset"
    assert error_of(base_cfg, ["data.train={type: cfgtest_dataset}"]) == (
        f"data.train: missing required argument(s) of 'cfgtest_dataset' ({dataset}): path"
    )
    assert error_of(base_cfg, ["model=cfgtest_model"]).startswith(
        "model: expected a component node {type: <name>, ...} of the 'model' registry"
    )
    # a nested node in a known position (ot_solver) is checked against its own class
    assert error_of(base_cfg, ["tasks.itm.ot_solver.iterations=many"]) == (
        "tasks.itm.ot_solver.iterations: expected int, got str 'many'"
    )


def test_unknown_type_names_closest(base_cfg):
    with pytest.raises(UnknownTypeError) as info:
        validate(load_config(base_cfg, ["tasks.itm.ot_solver.type=cfgtest_ipto"]))
    assert isinstance(info.value, R.UnknownComponentError) and isinstance(info.value, ConfigError)
    message = str(info.value)
    assert message.startswith("tasks.itm.ot_solver.type: 'cfgtest_ipto' is not in the 'ot_solver' registry")
    assert "'cfgtest_ipot'" in message


def test_nested_heads_injected_kwargs_and_unknown_key_names(base_cfg):
    validate(load_config(base_cfg, ["model.head={type: cfgtest_head, depth: 3}"]))  # sizes are injected
    assert error_of(base_cfg, ["model.head={type: cfgtest_head}"]).endswith(": depth")
    assert error_of(base_cfg, ["model.head={type: cfgtest_head, depth: 1, dept: 2}"]).startswith(
        "model.head.dept: unknown argument of 'cfgtest_head'"
    )
    assert error_of(base_cfg, ["tasks.itm.extras={solver: {type: cfgtest_ipot}}"]).startswith(
        "tasks.itm.extras.solver: a component node (type 'cfgtest_ipot') under key 'solver', "
        "which names no registry"
    )


def test_reserved_mix_extra_splits_and_kwargs_classes(base_cfg):
    assert error_of(base_cfg, ["tasks.itm.mix=lots"]) == "tasks.itm.mix: expected float, got str 'lots'"
    assert error_of(base_cfg, ["tasks.itm.mix=-1"]) == "tasks.itm.mix: must be >= 0, got -1"
    validate(load_config(base_cfg, ["data.test={type: cfgtest_dataset, path: /t}"]))
    assert error_of(base_cfg, ["data.test={type: cfgtest_dataset}"]).startswith("data.test: missing required")
    # **options accepts any key; declared ones are still type-checked
    validate(load_config(base_cfg, ["tasks.itm.metrics=[{type: cfgtest_kwargs_metric, name: acc, anything: 1}]"]))
    assert error_of(base_cfg, ["tasks.itm.metrics=[{type: cfgtest_kwargs_metric, name: 3}]"]) == (
        "tasks.itm.metrics.0.name: expected str, got int 3"
    )


def test_custom_imports_failure_names_entry(base_cfg):
    message = error_of(base_cfg, ["custom_imports=[json, no_such_module_cfgtest]"])
    assert message.startswith("custom_imports[1]: cannot import module 'no_such_module_cfgtest'")


# ----------------------------------------------------------------------------- saving


def test_save_config_round_trip(tmp_path):
    write(tmp_path, "base.yaml", BASE + "vars: {name: tiny}\nwork_dir: 'runs/${vars.name}'\n")
    path = write(tmp_path, "run.yaml", "_base_: base.yaml\n")
    cfg = load_and_validate(path, ["train.max_steps=3"])
    out = save_config(cfg, tmp_path / "run_dir" / "config.yaml")
    text = out.read_text()
    assert "${" not in text and "work_dir: runs/tiny" in text
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert config_to_dict(load_and_validate(out)) == config_to_dict(cfg)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp file left behind
