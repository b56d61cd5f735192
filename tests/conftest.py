"""Shared test fixtures: one tiny synthetic world per test session, and tiny-model overrides."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # projects/, examples/ and tests/ importable without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The original UNITER's outputs, read from ../shared/fixtures beside the clone (never copied in);
# VLFRAME_FIXTURES points elsewhere, e.g. from a checkout whose ../shared is absent.
FIXTURES = os.environ.get("VLFRAME_FIXTURES") or os.path.join(os.path.dirname(ROOT), "shared", "fixtures")
UNITER_DB = os.path.join(FIXTURES, "uniter_db_sample")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def needs_fixtures(*parts: str) -> pytest.MarkDecorator:
    """Mark a test that reads ``FIXTURES/<parts>``: skipped where it is absent, except under CI
    (env ``CI`` set), where the test fails saying so instead."""
    path = os.path.join(FIXTURES, *parts)
    if os.path.exists(path):
        return pytest.mark.usefixtures()
    if _in_ci():
        return pytest.mark.usefixtures("_fixtures_missing_in_ci")
    return pytest.mark.skip(reason=f"no fixtures at {path} (set VLFRAME_FIXTURES, or place ../shared beside the clone)")


@pytest.fixture
def _fixtures_missing_in_ci():
    pytest.fail(f"CI is set but the fixtures are missing: {FIXTURES} (CI must provide ../shared/fixtures)")


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory):
    """A cache folder the tiny worlds are generated into once per session."""
    return str(tmp_path_factory.mktemp("synth_cache"))


def tiny_overrides(cache: str, *, num_images: int = 120, feat_dim: int = 32) -> list[str]:
    """Overrides that shrink any shipped UNITER config to seconds on a CPU."""
    return [
        f"data.train.cache_dir={cache}",
        f"data.train.num_images={num_images}",
        f"data.train.feat_dim={feat_dim}",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.intermediate_size=64",
        "data.sampler.budget=512",
        "data.val_batch_units=1024",
        "train.val_batches=1",
        "train.progress=false",
        "train.log_interval=1",
    ]
