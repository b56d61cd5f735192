"""AMP and non-finite losses, through the real trainer on a tiny model.

- ``amp=auto``: bf16 only where the GPU has it natively, fp16 + GradScaler elsewhere on CUDA
  (V100), fp32 on the CPU.
- fp16 (CPU autocast + ``GradScaler('cpu')``): a forced overflow of the gradients skips the step
  and halves the scale; the scaler's state goes into the checkpoint and comes back.
- A NaN loss skips the step (fp16 and fp32); ``train.max_bad_steps`` of them in a row stop the run
  with an error that names the step and the task; fewer in a row do not.

The overflow and the NaN come from a test-only task registered here: ITM whose loss is
multiplied by a huge number or by NaN at chosen forwards.
"""
import pytest
import torch

from tests.conftest import tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine import checkpoint as ckpt
from vlframe.engine.hooks import Hook
from vlframe.engine.trainer import Trainer, resolve_amp
from vlframe.registry import TASKS
from vlframe.tasks.pretrain import ITMTask

CONFIG = "configs/uniter/pretrain_tiny_synth.yaml"


@TASKS.register_module(name="test_faulty_itm")
class FaultyITM(ITMTask):
    """ITM whose loss is multiplied by 1e30 (fp16 gradients overflow) or by NaN at the given
    forward calls (0-based)."""

    def __init__(self, *, overflow_at: list[int] = (), nan_at: list[int] = (), neg_prob: float = 0.5):
        super().__init__(neg_prob=neg_prob)
        self.overflow_at, self.nan_at = set(overflow_at), set(nan_at)
        self.calls = 0

    def forward(self, model, batch):
        out = super().forward(model, batch)
        if self.calls in self.overflow_at:
            out.loss = out.loss * 1e30  # finite in fp32; x 65536 and through fp16 backward: inf
        if self.calls in self.nan_at:
            out.loss = out.loss * float("nan")
        self.calls += 1
        return out


def _trainer(synth_cache, tmp_path, task: str, *extra) -> Trainer:
    cfg = load_and_validate(CONFIG, tiny_overrides(synth_cache) + [
        f"tasks={{itm: {{type: test_faulty_itm, mix: 1, {task}}}}}", "train.phases=[]", "data.val=null",
        "train.warmup_steps=0", *extra,
    ])
    return Trainer(cfg, work_dir=str(tmp_path))


def _params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_amp_auto_chooses_by_device(monkeypatch):
    assert resolve_amp("auto", torch.device("cpu")) is None
    # No GPU on this machine: stand in for the device query. A V100 answers the default query
    # (including_emulation=True) with yes - bf16 emulated, far slower than fp16 - and no to the
    # native one; an A100/H100 says yes to both.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_amp("fp16", torch.device("cpu")) == torch.float16


class _Watch(Hook):
    """After each step: whether any parameter changed, and the loss scale."""

    def __init__(self, trainer: Trainer):
        self.before = _params(trainer)
        self.seen: list[tuple[bool, float]] = []

    def after_step(self, trainer, task, logs):
        now = _params(trainer)
        self.seen.append((any(not torch.equal(v, self.before[k]) for k, v in now.items()), trainer.scaler.get_scale()))
        self.before = now


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_auto_on_this_gpu():
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8  # Ampere and later
    assert resolve_amp("auto", torch.device("cuda")) == (torch.bfloat16 if native_bf16 else torch.float16)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(synth_cache, tmp_path, caplog):
    t = _trainer(synth_cache, tmp_path, "overflow_at: [1]", "train.amp=fp16", "train.max_steps=3",
                 "train.ckpt_interval=1", "train.keep_ckpts=5")
    assert t.scaler.is_enabled() and t.scaler.get_scale() == 65536.0
    watch = _Watch(t)
    t.hooks.append(watch)
    t.train()
    assert watch.seen == [(True, 65536.0), (False, 32768.0), (True, 32768.0)], \
        "step 2's gradients overflow: skipped, scale halved; step 3 trains at the new scale"
    assert "non-finite loss" not in caplog.text, "an overflow is no bad step: the loss itself was finite"
    # The scaler's state is in the checkpoint and is restored.
    state = ckpt.load(str(tmp_path / "checkpoints" / "ckpt_0000002.pt"))
    assert state["scaler"]["scale"] == 32768.0
    fresh = _trainer(synth_cache, tmp_path / "other", "overflow_at: []", "train.amp=fp16", "train.max_steps=3")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 32768.0


@pytest.mark.parametrize("amp", ["fp16", "fp32"])
def test_nan_losses_skip_steps_then_stop_the_run(amp, synth_cache, tmp_path, caplog):
    # Two NaN steps in a row (3 and 4) with max_bad_steps=3: skipped, and the run goes on.
    t = _trainer(synth_cache, tmp_path / "two", "nan_at: [2, 3]", f"train.amp={amp}", "train.max_steps=6",
                 "train.max_bad_steps=3", "train.ckpt_interval=2", "train.keep_ckpts=5")
    t.train()
    assert t.step == 6
    assert "step 4 (task itm): non-finite loss, optimizer step skipped (2 in a row, train.max_bad_steps=3)" in caplog.text
    at2 = ckpt.load(str(tmp_path / "two" / "checkpoints" / "ckpt_0000002.pt"))["model"]
    at4 = ckpt.load(str(tmp_path / "two" / "checkpoints" / "ckpt_0000004.pt"))["model"]
    for k, v in at2.items():
        assert torch.equal(v, at4[k]), f"a NaN step changed {k}"
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    if amp == "fp16":
        assert t.scaler.get_scale() == 65536.0 / 4
    # Three in a row (steps 3, 4, 5): the run stops, naming the step and the task.
    t = _trainer(synth_cache, tmp_path / "three", "nan_at: [2, 3, 4]", f"train.amp={amp}", "train.max_steps=6",
                 "train.max_bad_steps=3")
    with pytest.raises(RuntimeError, match=r"step 5, task 'itm': the loss was NaN or inf in 3 consecutive steps "
                                           r"\(steps 3-5; train.max_bad_steps=3\)"):
        t.train()
    assert t.step == 4
