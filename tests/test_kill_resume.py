"""The kill test: a real training process (tools/train.py) is SIGKILLed at 10 random moments,
several of them in the middle of a checkpoint save. After each restart the newest good
checkpoint is the one resumed from, the temp files of the killed save are gone, and at the end
the losses of every step equal those of an uninterrupted run bit for bit (CPU)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, tiny_overrides
from vlframe.engine import checkpoint as ckpt

STEPS = 30
TMP = re.compile(r"^\.ckpt_\d+\.pt\..+\.tmp$")


def _cmd(cache: str, work: str) -> list[str]:
    over = tiny_overrides(cache) + [f"train.max_steps={STEPS}", "train.ckpt_interval=2", "train.keep_ckpts=2",
                                    "data.val=null", "train.warmup_steps=4"]
    return [sys.executable, os.path.join(ROOT, "tools", "train.py"),
            os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml"), "--work-dir", work, *over]


def _env() -> dict:
    # One thread: the same float summation order in every process.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")


def _temps(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if TMP.match(n)) if os.path.isdir(folder) else []


def _lines(path: str) -> int:
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _losses(work: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with open(os.path.join(work, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            step = rec.pop("step")
            rec.pop("time", None)
            assert step not in out, f"step {step} logged twice in metrics.jsonl"
            out[step] = rec
    return out


def _wait(pred, proc, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(synth_cache, tmp_path):
    from vlframe.data.dataset import SyntheticPairs

    SyntheticPairs(cache_dir=synth_cache, num_images=120, feat_dim=32)  # generate the world once, up front
    ref = str(tmp_path / "ref")
    subprocess.run(_cmd(synth_cache, ref), env=_env(), check=True, capture_output=True, timeout=300)

    work = str(tmp_path / "killed")
    cdir = os.path.join(work, "checkpoints")
    metrics = os.path.join(work, "metrics.jsonl")
    rng = random.Random(0)
    during_save = orphans_seen = 0
    expected_step = None  # the newest good checkpoint's step before a restart
    left_behind: list[str] = []
    for kill in range(10):
        log_path = tmp_path / f"run{kill}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(_cmd(synth_cache, work), env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            if expected_step is not None:  # the restart resumes from the newest good checkpoint
                assert _wait(lambda: "resumed from" in log_path.read_text(), proc, 120), log_path.read_text()
                m = re.search(r"resumed from (\S+) at step (\d+)", log_path.read_text())
                assert int(m.group(2)) == expected_step, (m.group(0), expected_step)
                assert not set(left_behind) & set(_temps(cdir)), "a temp file of the killed save is still there"
            start = _lines(metrics)
            _wait(lambda: _lines(metrics) > start, proc, 120)  # it trains at least one step
            if kill % 2 == 0:  # in the middle of a save: as soon as its temp file exists
                _wait(lambda: bool(_temps(cdir)), proc, 60)
            else:
                time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        left_behind = _temps(cdir)
        during_save += bool(left_behind)
        orphans_seen += len(left_behind)
        found = ckpt.newest_good(cdir)
        expected_step = found[1]["step"] if found else None
        if found is None:  # killed before the first save: the restart starts afresh
            assert not ckpt.list_checkpoints(cdir)
    proc = subprocess.run(_cmd(synth_cache, work), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if expected_step is not None:
        assert f"at step {expected_step}" in proc.stderr
    assert not _temps(cdir)
    assert during_save >= 3, f"only {during_save} of 10 kills landed in a save"
    print(f"kills during a save: {during_save} of 10, temp files left by them: {orphans_seen} (all removed on restart)")

    want, got = _losses(ref), _losses(work)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
