"""DDP, for real: two gloo processes on this machine run the trainer as ``torchrun`` would start
it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment), and their
results are compared with one process.

- A 2-rank run ends with identical parameters on both ranks, equal (1e-5) to one process with
  grad_accum=2: rank r's k-th batch is batch 2k+r of the shared epoch plan, so that process sees
  exactly the union of both ranks' micro-batches, step by step. Validation is reduced across
  ranks: the ranks see different numbers of batches, and the metrics equal one process's.
- The same through ``python -m torch.distributed.run`` and tools/train.py.
- Accumulation is exact: 2 ranks x 2 uneven micro-batches == one batch of all of them (1e-6),
  for ITM (a mean over examples) and MLM (a mean over masked words).
- A run killed after a checkpoint and resumed continues every rank's own RNG streams: the
  dropout masks after the resume equal the uninterrupted run's, rank by rank.
"""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine import checkpoint as ckpt
from vlframe.engine.hooks import Hook
from vlframe.engine.trainer import Trainer

CONFIG = "configs/uniter/pretrain_tiny_synth.yaml"
WORLD = 2
TIMEOUT_S = 240  # per multi-process run; a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(overrides: list[str], work_dir: str) -> Trainer:
    return Trainer(load_and_validate(CONFIG, overrides), work_dir=work_dir)


def _run_ranks(fn, *args, expect_killed: bool = False) -> None:
    """``fn(rank, *args)`` in WORLD spawned processes that join a gloo group from the
    environment; fails (and kills them) after TIMEOUT_S."""
    port = _free_port()
    ctx = mp.start_processes(_entry, args=(port, fn, args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                raise TimeoutError(f"{fn.__name__}: the ranks did not finish within {TIMEOUT_S} s")
    except mp.ProcessExitedException as e:
        if not (expect_killed and e.signal_name == "SIGKILL"):
            raise
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)  # two processes on a small machine
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_close(a: dict, b: dict, atol: float, what: str, *, relative: bool = False) -> None:
    """Every tensor within ``atol``; ``relative``: within ``atol * max(1, max |b|)`` per tensor
    (float32 resolves a value of 5000 to 5e-4 only)."""
    assert a.keys() == b.keys()

    def excess(k):
        tol = atol * max(1.0, float(b[k].float().abs().max())) if relative else atol
        return float((a[k].float() - b[k].float()).abs().max()) / tol, k

    worst, key = max(excess(k) for k in a)
    assert worst <= 1.0, f"{what}: at {key} the difference is {worst:.3g} x the tolerance"


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------ 2 ranks == 1 process
def _common(cache: str) -> list[str]:
    return tiny_overrides(cache) + [
        "train.phases=[]",  # all four tasks from the first step
        "train.max_steps=4", "train.warmup_steps=0", "train.ckpt_interval=100", "train.val_interval=100",
        "train.val_batches=0", "data.val_batch_units=350",  # several validation batches, all of them
    ]


def _train_worker(rank: int, overrides: list[str], work_dir: str, out_dir: str) -> None:
    t = _trainer(overrides, work_dir)
    assert t._wrapped is not t.model, "the trainer did not join the process group"
    val = t.train()
    counts = {name: len(s) for name, s in t.val_streams.items()}
    torch.save({"params": _params(t.model), "val": val, "val_batches": counts},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def one_process(synth_cache, tmp_path_factory):
    """The reference: one process, grad_accum=2, over the same global batches."""
    work = tmp_path_factory.mktemp("one")
    t = _trainer(_common(synth_cache) + ["train.grad_accum=2"], str(work))
    val = t.train()
    return {"params": _params(t.model), "val": val, "val_batches": {n: len(s) for n, s in t.val_streams.items()}}


@pytest.mark.slow
def test_two_ranks_equal_one_process_over_the_same_global_batch(synth_cache, one_process, tmp_path):
    _run_ranks(_train_worker, _common(synth_cache), str(tmp_path / "run"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"ranks disagree on {k}"
    _assert_close(r0["params"], one_process["params"], 1e-5, "2 ranks vs 1 process with grad_accum=2")
    # The comparison can fail: one process seeing only rank 0's batches ends elsewhere.
    alone = _trainer(_common(synth_cache), str(tmp_path / "alone"))
    alone.train()
    assert _max_diff(_params(alone.model), r0["params"]) > 1e-3

    # Validation: each example once over both ranks, unequal batch counts, metrics all-reduced.
    assert {n: r0["val_batches"][n] + r1["val_batches"][n] for n in r0["val_batches"]} == one_process["val_batches"]
    assert any(r0["val_batches"][n] != r1["val_batches"][n] for n in r0["val_batches"]), \
        "want a split the ranks share unevenly"
    reduced = set(r1["val"])  # all but retrieval (rank 0 scores the whole split alone)
    assert {"val/mlm/mlm_acc", "val/itm/itm_acc", "val/mrfr/mrfr_loss"} <= reduced < set(one_process["val"])
    for k, v in one_process["val"].items():
        assert r0["val"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        if k in reduced:
            assert r1["val"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(synth_cache, one_process, tmp_path):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "tools/train.py", CONFIG, "--work-dir", str(work), *_common(synth_cache)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(work / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == WORLD
    _assert_close(state["model"], one_process["params"], 1e-5, "torchrun 2 ranks vs 1 process")
    # Rank 0 wrote both ranks' RNG streams, and they differ (each rank seeds seed + rank).
    assert len(state["rng"]) == WORLD and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["rng"][0]["python"] != state["rng"][1]["python"]


# ------------------------------------------------------------------------------ exact accumulation
def _linear_step(cache: str) -> list[str]:
    # AdamW's first step is lr * g / (|g| + eps): with eps = lr = 1e6 the parameter change is -g
    # (to ~1e-6 relative), so the comparisons below compare gradients, not Adam's sign-like first
    # step (which hides a wrongly weighted gradient). No decay, no clipping. Tolerance: 1e-6,
    # relative for tensors whose values exceed 1 (MRFR's feature-projection bias gets ~5e3).
    # The original's WRA contrast (sums / batch, per-example terms); the demo's per-side contrast
    # is normalised per micro-batch (the trainer warns; tests/test_trainer.py).
    return tiny_overrides(cache) + ["train.lr=1e6", "train.eps=1e6", "train.weight_decay=0", "train.clip_grad=0",
                                   "train.warmup_steps=0", "train.max_steps=1000", "data.val=null",
                                   "tasks.itm.wra_loss={type: ot_contrast, normalize: batch}"]


# Micro-batch slices of one 16-example batch: rank 0 gets the first two, rank 1 the last two.
SPLITS = [[(0, 3), (3, 8)], [(8, 10), (10, 16)]]
_TEXT = ("input_ids", "text_mask", "token_type_ids")
_REGIONS = ("img_feat", "img_pos", "img_mask", "soft_labels", "img_masked")


def _big_batch(trainer: Trainer, task: str):
    ds = trainer.train_set
    examples = [ds[i] for i in range(3, 3 + 16 * 5, 5)]
    return trainer.model.tasks[task].collate(examples, generator=torch.Generator().manual_seed(5), dataset=ds)


def _slice(batch, lo: int, hi: int):
    """Examples lo:hi of a collated batch, padding trimmed to their own longest text / regions
    (what collating them alone gives, with the same masks and negatives)."""
    import dataclasses

    t = int(batch.text_mask[lo:hi].sum(1).max())
    k = int(batch.img_mask[lo:hi].sum(1).max())
    parts = {}
    for name in _TEXT + _REGIONS:
        v = getattr(batch, name)
        parts[name] = None if v is None else v[lo:hi, : t if name in _TEXT else k]
    targets = {}
    for name, v in batch.targets.items():
        assert name in ("itm", "txt_labels"), f"_slice does not know target {name}"
        targets[name] = v[lo:hi] if name == "itm" else v[lo:hi, :t]
    if batch.masked_soft_labels is not None:  # rows of the masked regions, example by example
        first = int(batch.img_masked[:lo].sum())
        parts["masked_soft_labels"] = batch.masked_soft_labels[first : first + int(batch.img_masked[lo:hi].sum())]
    return dataclasses.replace(batch, **parts, targets=targets, txt_ids=batch.txt_ids[lo:hi],
                               img_ids=batch.img_ids[lo:hi])


def _accum_worker(rank: int, overrides: list[str], out_dir: str) -> None:
    t = _trainer(overrides, os.path.join(out_dir, "work"))
    out = {}
    for task in ("itm", "mlm"):
        big = _big_batch(t, task)
        t.train_step(task, [_slice(big, lo, hi) for lo, hi in SPLITS[rank]])
        out[task] = _params(t.model)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_accumulation_under_ddp_equals_one_big_batch(synth_cache, tmp_path):
    """2 ranks x 2 micro-batches of 3, 5 | 2, 6 examples == one batch of 16, within 1e-6.

    Exact for ITM because its loss is a mean over examples, and for MLM, a mean over masked words,
    because each micro-loss is weighted by n_i / N (``Task.loss_count`` over the step's total on
    all ranks, all-reduced before the forward) times the world size, which DDP's gradient average
    divides out again: the gradient is then sum_i (n_i / N) grad(mean_i) = grad(sum of all N
    elements / N), the big batch's. The plain 1/K average is off whenever the counts differ."""
    overrides = _linear_step(synth_cache)
    _run_ranks(_accum_worker, overrides, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _trainer(overrides, str(tmp_path / "ref"))
    before = _params(ref.model)
    for task in ("itm", "mlm"):
        big = _big_batch(ref, task)
        counts = [int(ref.model.tasks[task].loss_count(_slice(big, lo, hi))) for r in SPLITS for lo, hi in r]
        assert sum(counts) == int(ref.model.tasks[task].loss_count(big)) and len(set(counts)) == 4, counts
        if task == "mlm":  # masked words, not examples: the default count would be wrong here
            assert counts != [hi - lo for r in SPLITS for lo, hi in r], counts
        ref.train_step(task, [big])
        after = _params(ref.model)
        for r in ranks:
            _assert_close(r[task], after, 1e-6, f"{task}: 2 ranks x 2 micro-batches vs one batch",
                          relative=True)
        # The parameter change is the gradient: big enough that 1e-6 means something.
        assert _max_diff(after, before) > 1e-2, task
        before = after


def test_accumulation_weights_by_masked_elements_in_one_process(synth_cache, tmp_path):
    """The same without DDP for the region tasks: 4 uneven micro-batches == one batch (1e-6).
    MRFR is a mean over masked regions x features, MRC over masked regions, MRC-kl over masked
    regions x classes."""
    overrides = _linear_step(synth_cache) + ["tasks.mrc={type: mrc, masker: {type: conditional, region_prob: 0.15}}"]
    a, b = _trainer(overrides, str(tmp_path / "a")), _trainer(overrides, str(tmp_path / "b"))
    for task in ("mrfr", "mrc", "mrc_kl"):
        big = _big_batch(a, task)
        counts = [int(a.model.tasks[task].loss_count(_slice(big, lo, hi))) for r in SPLITS for lo, hi in r]
        assert len(set(counts)) > 1, counts
        a.train_step(task, [_slice(big, lo, hi) for r in SPLITS for lo, hi in r])
        b.train_step(task, [big])
        _assert_close(_params(a.model), _params(b.model), 1e-6, task, relative=True)


# ------------------------------------------------------------------------------ kill and resume
class _Recorder(Hook):
    """Records every dropout mask of each training step, and python/NumPy RNG states, per rank."""

    def __init__(self, trainer: Trainer, kill_at: int | None = None):
        self.kill_at = kill_at
        self.masks: dict[int, list[torch.Tensor]] = {}
        self._current: list[torch.Tensor] = []
        self.states: dict[int, tuple] = {}
        for m in trainer.model.modules():
            if isinstance(m, nn.Dropout):
                m.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if module.training and module.p > 0:
            self._current.append((output != 0).flatten())

    def after_step(self, trainer, task, logs) -> None:
        self.masks[trainer.step] = torch.cat(self._current)
        self._current = []
        self.states[trainer.step] = (torch.tensor(random.getstate()[1]),
                                     torch.from_numpy(np.random.get_state()[1].astype(np.int64)))
        if trainer.step == self.kill_at:  # after the checkpoint of step 2: step 3's work is lost
            os.kill(os.getpid(), signal.SIGKILL)


def _resume_worker(rank: int, overrides: list[str], work_dir: str, out: str, kill_at) -> None:
    t = _trainer(overrides, work_dir)
    rec = _Recorder(t, kill_at)
    t.hooks.append(rec)
    t.train()
    torch.save({"masks": rec.masks, "states": rec.states, "params": _params(t.model)}, f"{out}{rank}.pt")


@pytest.mark.slow
def test_killed_ddp_run_resumes_each_ranks_rng_stream(synth_cache, tmp_path):
    overrides = tiny_overrides(synth_cache) + [
        "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "train.phases=[]", "data.val=null",
        "train.max_steps=4", "train.ckpt_interval=2", "train.warmup_steps=0",
    ]
    _run_ranks(_resume_worker, overrides, str(tmp_path / "full"), str(tmp_path / "full"), None)
    _run_ranks(_resume_worker, overrides, str(tmp_path / "part"), str(tmp_path / "killed"), 3, expect_killed=True)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "part" / "checkpoints"))] == [2]
    _run_ranks(_resume_worker, overrides, str(tmp_path / "part"), str(tmp_path / "resumed"), None)
    full = [torch.load(f"{tmp_path / 'full'}{r}.pt", weights_only=True) for r in range(WORLD)]
    resumed = [torch.load(f"{tmp_path / 'resumed'}{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        assert sorted(resumed[r]["masks"]) == [3, 4]
        for step in (3, 4):
            assert torch.equal(resumed[r]["masks"][step], full[r]["masks"][step]), f"rank {r}, step {step}"
            for got, want in zip(resumed[r]["states"][step], full[r]["states"][step]):
                assert torch.equal(got, want), f"rank {r}, step {step}: python/NumPy RNG not restored"
    for r in range(WORLD):
        for k, v in full[r]["params"].items():
            assert torch.equal(resumed[r]["params"][k], v), f"rank {r}: resumed vs uninterrupted differ at {k}"
    # Each rank has its own stream: rank 0's masks are not rank 1's.
    assert not torch.equal(full[0]["masks"][3], full[1]["masks"][3])
    # A resume by another number of processes is refused, naming both.
    with pytest.raises(ValueError, match=r"ckpt_0000004.pt: written by a run of world size 2, this run has world size 1"):
        _trainer(overrides + ["train.max_steps=6"], str(tmp_path / "part")).train()
