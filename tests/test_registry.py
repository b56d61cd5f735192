"""Registries: duplicates, unknown names, user code via custom_imports and entry points, listing."""
from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

from vlframe import registry as R
from vlframe.config import ConfigError, format_components, load_and_validate

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@R.OT_SOLVERS.register_module(name="ipot_solver_test")
class IpotSolverTest:
    def __init__(self, *, beta: float = 0.5, iterations: int = 50):
        self.beta, self.iterations = beta, iterations


@R.DATASETS.register_module(name="regtest_dataset")
class RegTestDataset:
    def __init__(self, *, path: str):
        self.path = path


@R.SAMPLERS.register_module(name="regtest_sampler")
class RegTestSampler:
    def __init__(self, *, budget: int):
        self.budget = budget


PLUGIN_CONFIG = """
custom_imports: [fixtures_plugin.my_heads]
model: {type: MyTinyHead, hidden_size: 4, num_outputs: 3, scale: 2.0}
data:
  train: {type: regtest_dataset, path: /x}
  sampler: {type: regtest_sampler, budget: 64}
train: {max_steps: 1}
"""


def test_duplicate_name_raises():
    @R.METRICS.register_module(name="regtest_dup_metric")
    class First:
        pass

    with pytest.raises(KeyError, match="regtest_dup_metric is already registered in metric"):

        @R.METRICS.register_module(name="regtest_dup_metric")
        class Second:
            pass

    assert R.lookup(R.METRICS, "regtest_dup_metric") is First


def test_unknown_type_names_registry_and_closest():
    assert R.lookup(R.OT_SOLVERS, "ipot_solver_test") is IpotSolverTest
    with pytest.raises(R.UnknownComponentError) as info:
        R.lookup(R.OT_SOLVERS, "ipot_solver_tset", where="tasks.itm.ot_solver.type")
    assert str(info.value).startswith(
        "tasks.itm.ot_solver.type: 'ipot_solver_tset' is not in the 'ot_solver' registry; "
        "did you mean 'ipot_solver_test'"
    )
    solver = R.build({"type": "ipot_solver_test", "beta": 0.25}, R.OT_SOLVERS)
    assert isinstance(solver, IpotSolverTest) and solver.beta == 0.25 and solver.iterations == 50


def test_custom_imports_builds_user_component(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # fixtures_plugin lives outside vlframe, beside the tests
    path = tmp_path / "plugin.yaml"
    path.write_text(PLUGIN_CONFIG)
    cfg = load_and_validate(path)
    head = R.build(cfg.model, R.MODELS, where="model")
    assert type(head).__module__ == "fixtures_plugin.my_heads" and head.scale == 2.0
    h = torch.randn(2, 4)
    torch.testing.assert_close(head(h), torch.nn.functional.linear(h, head.proj.weight, head.proj.bias) * 2.0)

    # the user's class signature is enforced like any other
    typo = r"^model\.num_output: unknown argument of 'MyTinyHead' .*'model\.num_outputs'"
    with pytest.raises(ConfigError, match=typo):
        load_and_validate(path, ["model.num_output=3"])


def test_entry_point_plugin_discovered(tmp_path, monkeypatch):
    # A real (uninstalled) distribution: a dist-info folder with entry_points.txt on sys.path.
    (tmp_path / "regtest_fake_plugin_mod.py").write_text(textwrap.dedent("""
        from vlframe.registry import OT_SOLVERS

        @OT_SOLVERS.register_module(name="regtest_plugin_solver")
        class PluginSolver:
            def __init__(self, *, epsilon: float):
                self.epsilon = epsilon
    """))
    info = tmp_path / "regtest_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regtest-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlframe.plugins]\nfake = regtest_fake_plugin_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(R, "_plugins_loaded", False)  # plugins load once per process; look again

    assert "regtest_fake_plugin_mod" in R.load_plugins()
    assert R.load_plugins() == []  # only once
    solver = R.build({"type": "regtest_plugin_solver", "epsilon": 0.1}, R.OT_SOLVERS)
    assert type(solver).__module__ == "regtest_fake_plugin_mod" and solver.epsilon == 0.1


def test_list_components(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    path = tmp_path / "plugin.yaml"
    path.write_text(PLUGIN_CONFIG)
    text = format_components(config=path)
    for name in R.ALL_REGISTRIES:
        assert any(line.startswith((f"{name} (", f"{name}: ")) for line in text.splitlines())
    assert "MyTinyHead" in text and "fixtures_plugin.my_heads.MyTinyHead" in text
    assert re.search(rf"^  ipot_solver_test +{__name__}\.IpotSolverTest$", text, re.MULTILINE)

    only = format_components(registry="ot_solvers").splitlines()
    assert only[0].startswith("ot_solver (") and all(line.startswith("  ") for line in only[1:])
    with pytest.raises(ConfigError, match="did you mean 'ot_solver'"):
        format_components(registry="otsolver")

    # the thin tool prints the same listing
    spec = importlib.util.spec_from_file_location("list_components_tool", ROOT / "tools" / "list_components.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config", str(path), "--registry", "model"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model (") and "MyTinyHead" in out and "ot_solver" not in out
