"""The Table 2 lines differ from the line each is compared with only in what the paper varies.

Each pair of resolved configs is diffed key by key (dotted paths of the leaves); the test fails
on any difference outside the pair's declared keys, and on a pair that does not differ at all."""
import functools
import os

import pytest

from tests.conftest import ROOT
from vlframe.config import config_to_dict, load_and_validate

ABL = os.path.join(ROOT, "configs", "uniter", "ablations")

# (line, the line it is compared with, the dotted prefixes allowed to differ, why)
PAIRS = [
    ("L01_none", "L05_mlm", {"train.max_steps"}, "no pretraining: the initialisation"),
    ("L02_mlm_text_only", "L05_mlm", {"data.train.text_only", "data.val.text_only"}, "text without images"),
    ("L06_mlm_itm", "L05_mlm", {"tasks.itm"}, "+ITM"),
    ("L07_mlm_itm_mrc", "L06_mlm_itm", {"tasks.mrc"}, "+MRC"),
    ("L08_mlm_itm_mrfr", "L06_mlm_itm", {"tasks.mrfr"}, "+MRFR"),
    ("L09_mlm_itm_mrckl", "L06_mlm_itm", {"tasks.mrc_kl"}, "+MRC-kl"),
    ("L10_mlm_itm_mrckl_mrfr", "L09_mlm_itm_mrckl", {"tasks.mrfr"}, "+MRFR"),
    ("L11_mlm_itm_mrckl_mrfr_wra", "L10_mlm_itm_mrckl_mrfr",
     {"tasks.itm.wra_weight", "tasks.itm.ot_solver", "tasks.itm.wra_loss", "train.phases"}, "+WRA (and its warm-up phase)"),
    ("L11_sinkhorn", "L11_mlm_itm_mrckl_mrfr_wra", {"tasks.itm.ot_solver"}, "Sinkhorn instead of IPOT"),
    ("L11_exact_ot", "L11_mlm_itm_mrckl_mrfr_wra", {"tasks.itm.ot_solver"}, "exact OT instead of IPOT"),
    ("L12_joint_masking", "L10_mlm_itm_mrckl_mrfr", {"tasks.mlm.masker", "tasks.mrc_kl.masker", "tasks.mrfr.masker"},
     "joint instead of conditional masking"),
    ("L13_out_of_domain", "L11_mlm_itm_mrckl_mrfr_wra", {"data.train.domain", "data.val.domain"}, "out-of-domain data"),
    ("L14_in_and_out_domain", "L11_mlm_itm_mrckl_mrfr_wra", {"data.train.domain", "data.val.domain"}, "in+out-of-domain"),
]


def leaves(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out |= leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out or {prefix: {}}
    return {prefix: node}


def diff(a: str, b: str) -> set[str]:
    la = leaves(config_to_dict(load_and_validate(os.path.join(ABL, a + ".yaml"))))
    lb = leaves(config_to_dict(load_and_validate(os.path.join(ABL, b + ".yaml"))))
    # work_dir is named after the config file: not a difference of the recipe.
    return {k for k in la.keys() | lb.keys() if la.get(k, "<absent>") != lb.get(k, "<absent>") and k != "work_dir"}


def test_every_line_is_in_a_pair():
    lines = {f[:-5] for f in os.listdir(ABL) if f.endswith(".yaml")}
    paired = {a for a, *_ in PAIRS} | {b for _, b, *_ in PAIRS}
    assert lines - paired <= {"L03_mrfr", "L04_itm"}, "a line compared with nothing"  # single-task lines
    assert paired <= lines


@pytest.mark.parametrize("line,other,allowed,why", PAIRS, ids=[p[0] for p in PAIRS])
def test_line_differs_only_in_what_the_paper_varies(line, other, allowed, why):
    changed = diff(line, other)
    assert changed, f"{line} and {other} resolve to the same config ({why})"
    stray = sorted(k for k in changed if not any(k == p or k.startswith(p + ".") for p in allowed))
    assert stray == [], f"{line} vs {other} ({why}) also differ in {stray}"


def test_l11_is_the_demo_recipe():
    assert diff("L11_mlm_itm_mrckl_mrfr_wra", os.path.join("..", "pretrain_tiny_synth")) == set()


def test_the_diff_sees_a_stray_difference(tmp_path):
    """The check can fail: a line that also changes the learning rate is caught."""
    stray = tmp_path / "L11_stray.yaml"
    stray.write_text(f"_base_: [{os.path.join(ABL, 'L11_sinkhorn.yaml')}]\ntrain: {{lr: 0.5}}\n")
    changed = diff(str(stray)[:-5], "L11_mlm_itm_mrckl_mrfr_wra")
    assert "tasks.itm.ot_solver.type" in changed
    assert sorted(k for k in changed if not k.startswith("tasks.itm.ot_solver")) == ["train.lr"]


@functools.lru_cache(maxsize=1)
def _sweep_points() -> dict[str, dict]:
    """Each Table 2 line as the sweep configs/uniter/sweeps/table2_tiny.yaml pretrains it (its
    config + the sweep's overrides + the point's own), by config name; the seed left out."""
    from vlframe.launch.sweep import expand, read_sweep_file

    spec = read_sweep_file(os.path.join(ROOT, "configs", "uniter", "sweeps", "table2_tiny.yaml"))
    out = {}
    for run in expand(spec):
        if run.seed == 0:
            own = [o for o in run.overrides if not o.startswith("seed=")]
            cfg = config_to_dict(load_and_validate(run.config, [*spec["overrides"], *own]))
            out[os.path.basename(run.config)[:-5]] = leaves(cfg)
    return out


def test_the_table2_sweep_has_every_line():
    lines = {f[:-5] for f in os.listdir(ABL) if f.endswith(".yaml")}
    assert set(_sweep_points()) == lines


@pytest.mark.parametrize("line,other,allowed,why", PAIRS, ids=[p[0] for p in PAIRS])
def test_sweep_lines_differ_only_in_what_the_paper_varies(line, other, allowed, why):
    """The sweep's budgets and per-point overrides keep each pair's difference to what the paper varies."""
    la, lb = _sweep_points()[line], _sweep_points()[other]
    changed = {k for k in la.keys() | lb.keys() if la.get(k, "<absent>") != lb.get(k, "<absent>") and k != "work_dir"}
    assert changed, f"{line} and {other} resolve to the same config in the sweep ({why})"
    stray = sorted(k for k in changed if not any(k == p or k.startswith(p + ".") for p in allowed))
    assert stray == [], f"in the sweep, {line} vs {other} ({why}) also differ in {stray}"

