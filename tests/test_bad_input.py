"""Bad input stops with one clear line that names the place: file, key or store."""
import importlib.util
import os

import pytest

from tests.conftest import ROOT, tiny_overrides

DEMO = os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml")


def _train_main():
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(ROOT, "tools", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _run(capsys, *argv):
    code = _train_main()(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_missing_config_file(capsys, tmp_path):
    line = _run(capsys, str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line


def test_missing_base(capsys, tmp_path):
    cfg = tmp_path / "child.yaml"
    cfg.write_text("_base_: [gone/base.yaml]\ntrain: {max_steps: 1}\n")
    line = _run(capsys, str(cfg))
    assert "gone/base.yaml" in line and "child.yaml" in line


def test_typo_in_override_names_path_and_suggestion(capsys, tmp_path):
    line = _run(capsys, DEMO, "train.max_step=5", "--work-dir", str(tmp_path))
    assert "train.max_step" in line and "train.max_steps" in line


def test_typo_in_component_kwarg(capsys, tmp_path):
    line = _run(capsys, DEMO, "tasks.itm.neg_prb=0.3", "--work-dir", str(tmp_path))
    assert "tasks.itm.neg_prb" in line and "neg_prob" in line


def _image_text_config(tmp_path, regions, texts, feat_dim):
    cfg = tmp_path / "real.yaml"
    cfg.write_text(
        f"_base_: [{DEMO}]\n"
        "data:\n"
        f"  train: {{_delete_: true, type: image_text, region_store: {regions}, text_store: {texts}, feat_dim: {feat_dim}}}\n"
        "  val: null\n"
        f"model: {{img_dim: {feat_dim}}}\n"
    )
    return str(cfg)


def test_data_folder_that_does_not_exist(capsys, tmp_path):
    cfg = _image_text_config(tmp_path, tmp_path / "no_regions", tmp_path / "no_texts", 32)
    line = _run(capsys, cfg, "--work-dir", str(tmp_path / "run"))
    assert "no_regions" in line


def test_store_with_another_feature_dim(capsys, tmp_path, synth_cache):
    from vlframe.data.dataset import SyntheticPairs

    world = SyntheticPairs(cache_dir=synth_cache, num_images=120, feat_dim=32).world_dir
    regions, texts = os.path.join(world, "regions"), os.path.join(world, "texts", "in_train")
    cfg = _image_text_config(tmp_path, regions, texts, 64)
    line = _run(capsys, cfg, "--work-dir", str(tmp_path / "run"))
    assert regions in line and "32" in line and "64" in line
