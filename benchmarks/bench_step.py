"""Benchmark one UNITER pretraining step (forward + backward + AdamW) against the hardware's limit.

For a model size (tiny | base | large), a task (mlm | mrfr | mrc | mrc_kl | itm, ITM with WRA as
the paper's) and either fixed-shape batches (``--batch`` x ``--text`` + ``--regions``, no padding)
or token-budget batches (``--budget``: lengths drawn from a COCO-like distribution, text U[8,60]
tokens, regions U[10,100]), it prints:

* seconds per step (median of ``--steps`` after ``--warmup``; the batch is collated before the
  timing, so this is the trainer's step without the data path: see bench_data.py for that),
  input units/s (what the encoder runs on: examples x longest joint sequence when padded, the
  real units when packed) and real (non-padding) units/s;
* FLOPs per step counted with fvcore on the task's forward (fvcore counts one multiply-add as one
  flop: doubled here), the step counted as 3 x forward (backward = 2 x forward, the usual model);
  on the packed path the encoder's counts are scaled to the real tokens (linear layers by real /
  padded tokens, attention by sum L_i^2 / (B L^2));
* achieved FLOP/s and that as a fraction of the matmul peak measured IN THE SAME RUN on the same
  device and dtype (square matmuls, best of several sizes, measured before and after the steps);
  the same for the encoder alone (forward + backward on the step's packed sequence);
* peak memory. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's resident-set
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step) minus the
  resident set before the step, with glibc's mmap threshold fixed so that freed tensors leave the
  resident set (in two untimed steps before the timed ones, which then run with glibc's usual
  reuse of freed buffers: with the fixed threshold every large tensor's pages fault in again, a
  quarter of a base step on this VM); "persistent" is weights + grads + AdamW state, "step" what one step adds on top.

``--fit`` instead measures CPU step peaks of UNITER-base and -large at two small batch sizes
(fp32), fits bytes = a + b x units and answers whether a base step with 10240 units and a large
step with 6144 units fit in 16 GB in fp16 under the memory model it prints.

    python benchmarks/bench_step.py --model tiny
    python benchmarks/bench_step.py --model base --task mlm --batch 32 --text 20 --regions 36
    python benchmarks/bench_step.py --model base --budget 10240 --device cuda --dtype bf16 --compile
    python benchmarks/bench_step.py --fit
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SIZES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}
SPECIAL = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASK_CFG = {
    "mlm": {"type": "mlm", "masker": {"type": "conditional", "text_prob": 0.15}},
    "mrfr": {"type": "mrfr", "masker": {"type": "conditional", "region_prob": 0.15}},
    "mrc": {"type": "mrc", "masker": {"type": "conditional", "region_prob": 0.15}},
    "mrc_kl": {"type": "mrc_kl", "masker": {"type": "conditional", "region_prob": 0.15}},
    "itm": {"type": "itm", "neg_prob": 0.5, "wra_weight": 0.1,
            "ot_solver": {"type": "ipot", "beta": 0.5, "iterations": 50, "inner_steps": 1}},
}


# ------------------------------------------------------------------------------------ memory
def _fix_malloc() -> None:
    """Freed large tensors leave the resident set (glibc raises its mmap threshold otherwise).
    Memory measurement only: every large tensor is then a fresh mapping whose pages fault in, which
    on this VM cost a quarter of a base step (the timed steps run after ``keep_freed_memory``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so no dynamic adjustment
        libc.malloc_trim(0)
    except OSError:
        pass


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set to the current one
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak bytes a block adds on top of what is live when it starts (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _rss()[0]
            if not _reset_hwm():
                self.method = "ru_maxrss delta (clear_refs unavailable)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss()[1] - self.base
        return False


def live_bytes(device: torch.device) -> int:
    gc.collect()
    return torch.cuda.memory_allocated() if device.type == "cuda" else _rss()[0]


# ---------------------------------------------------------------------------------- the data
class BenchData:
    """In-memory examples with the interface the tasks' collate uses (negatives, lengths)."""

    def __init__(self, text_len, region_len, *, feat_dim: int, num_labels: int | None, seed: int):
        from vlframe.data.batch import Example

        g = torch.Generator().manual_seed(seed)
        self.special_ids, self.vocab_size, self.feat_dim, self.num_labels = SPECIAL, 30522, feat_dim, num_labels
        self.first_word_id = 999
        self.examples, self.images = [], {}
        for i, (t, k) in enumerate(zip(text_len, region_len)):
            ids = torch.randint(1000, 30000, (int(t),), generator=g)
            ids[0], ids[-1] = SPECIAL["cls"], SPECIAL["sep"]
            feat = torch.randn(int(k), feat_dim, generator=g).relu_().half()
            xy = torch.rand(int(k), 2, generator=g) * 0.5
            wh = torch.rand(int(k), 2, generator=g) * 0.5 + 0.01
            pos = torch.cat([xy, xy + wh, wh, wh.prod(1, keepdim=True)], 1)
            soft = torch.rand(int(k), num_labels, generator=g).softmax(-1).half() if num_labels else None
            self.images[f"img{i}"] = (feat, pos, soft)
            self.examples.append(Example(f"t{i}", f"img{i}", ids, feat, pos, soft))
        self.img_ids = [e.img_id for e in self.examples]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def lengths(self):
        return np.array([e.num_units for e in self.examples])

    def image_ids(self):
        return sorted(self.images)

    def image_example(self, img_id):
        return self.images[img_id]

    def text_ids(self, j):
        return self.examples[j].input_ids


def make_batches(args, task, real_units: bool) -> tuple[list, BenchData]:
    """Collated batches for warm-up + timed steps (built before any timing)."""
    n_steps = args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    labels = 1601 if task.needs_soft_labels else None
    if args.budget:
        from vlframe.data.sampler import TokenBudgetSampler

        pool = max(64, 3 * n_steps * args.budget // 90)
        text, regions = rng.integers(8, 61, pool), rng.integers(10, 101, pool)
        sampler = TokenBudgetSampler(lengths=text + regions, budget=args.budget, bucket_size=pool, seed=args.seed,
                                     cost="real" if real_units else "padded")
        index = sampler.batches()[:n_steps]
        used = sorted({i for b in index for i in b})
        remap = {old: new for new, old in enumerate(used)}
        data = BenchData(text[used], regions[used], feat_dim=2048, num_labels=labels, seed=args.seed)
        index = [[remap[i] for i in b] for b in index]
    else:
        n = args.batch
        data = BenchData([args.text] * max(n, 2), [args.regions] * max(n, 2), feat_dim=2048, num_labels=labels,
                         seed=args.seed)
        index = [list(range(n))] * n_steps
    batches = []
    for s, idx in enumerate(index):
        g = torch.Generator().manual_seed(args.seed + s)
        batches.append(task.collate([data[i] for i in idx], generator=g, dataset=data))
    return batches, data


# -------------------------------------------------------------------------------------- peak
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=None, seconds: float = 0.6) -> tuple[float, int]:
    """Best FLOP/s of square matmuls (2 n^3 flops each) over a few sizes."""
    if sizes is None:
        sizes = PEAK_SIZES or ((1024, 2048, 3072) if device.type == "cpu" else (4096, 8192, 12288))
        if device.type == "cpu" and dtype != torch.float32 and not PEAK_SIZES:
            sizes = (256, 512)  # half precision matmuls are emulated and slow on most CPUs
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=c)
        _sync(device)
        times, cpu, t_end = [], [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 3:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(4 if device.type == "cuda" else 1):
                torch.mm(a, b, out=c)
            _sync(device)
            times.append((time.perf_counter() - t0) / (4 if device.type == "cuda" else 1))
            cpu.append((time.process_time() - c0) / (4 if device.type == "cuda" else 1))
        rate = 2 * n**3 / min(times)
        if rate > best:
            best, best_n = rate, n
        CPU_PEAK[0] = max(CPU_PEAK[0], 2 * n**3 / max(min(cpu), 1e-9))
        del a, b, c
    return best, best_n


PEAK_SIZES: tuple[int, ...] = ()  # --peak-sizes
CPU_PEAK = [0.0]  # best matmul FLOP per CPU-second of this process seen so far (CPU device)


class PeakProbe:
    """A matmul timed right next to each step: on a shared machine the load changes between
    seconds, so each step's rate is also divided by the peak measured beside it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.device, self.n = device, n
        self.a = torch.randn(n, n, device=device).to(dtype)
        self.b = torch.randn(n, n, device=device).to(dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(self.a, self.b, out=self.c)

    def __call__(self, repeats: int = 2) -> float:
        best = float("inf")
        for _ in range(repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            torch.mm(self.a, self.b, out=self.c)
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- FLOPs
def _sdpa_flop(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: QK^T and PV, in multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = int(np.prod(q[:-2]))
    return 2 * batch * q[-2] * k[-2] * q[-1]


def count_forward_flops(model, task, batch) -> dict[str, float]:
    """fvcore multiply-adds of the task's forward on ``batch`` (padded model path), per top-level
    part: encoder linear layers, encoder attention, everything else. Returns flops (x2)."""
    from fvcore.nn import FlopCountAnalysis

    enc = model.encoder
    saved = enc.varlen, enc._run
    enc.varlen, enc._run = "never", enc._layers  # jit tracing runs the plain padded path

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.task = model, task

        def forward(self, input_ids, img_feat):
            b = dataclasses.replace(batch, input_ids=input_ids, img_feat=img_feat)
            return self.task(self.model, b).loss

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(Wrapped(), (batch.input_ids, batch.img_feat))
            fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by = fca.by_module_and_operator()
            total = fca.total()
    finally:
        enc.varlen, enc._run = saved
    encoder = by.get("model.encoder", {})
    attn = encoder.get("scaled_dot_product_attention", 0)
    enc_total = sum(encoder.values())
    return {"total": 2.0 * total, "encoder_attention": 2.0 * attn, "encoder_other": 2.0 * (enc_total - attn)}


def step_flops(counts: dict[str, float], packed: bool, mask: torch.Tensor) -> tuple[float, float]:
    """(executed, useful) training-step flops = 3 x forward; packed: the encoder on real tokens."""
    b, length = mask.shape
    lens = mask.sum(1).double()
    token_ratio = float(lens.sum()) / (b * length)
    attn_ratio = float((lens**2).sum()) / (b * length**2)
    real = counts["total"] - counts["encoder_other"] * (1 - token_ratio) - counts["encoder_attention"] * (1 - attn_ratio)
    return 3.0 * (real if packed else counts["total"]), 3.0 * real


# -------------------------------------------------------------------------------------- run
def build(args, device: torch.device):
    from projects.uniter.uniter.model import UniterModel
    from vlframe.engine.optim import build_optimizer
    from vlframe.registry import TASKS
    from vlframe.registry import build as build_component
    from vlframe.tasks.base import DataInfo

    torch.manual_seed(args.seed)
    model = UniterModel(vocab_size=30522, img_dim=2048, **SIZES[args.model], varlen=args.varlen,
                        compile=args.compile, compile_backend=args.compile_backend, length_multiple=args.length_multiple,
                        gradient_checkpointing=args.checkpointing)
    task = build_component(dict(TASK_CFG[args.task]), TASKS, where="bench.task")
    info = DataInfo(special_ids=SPECIAL, vocab_size=30522, feat_dim=2048,
                    num_labels=1601 if task.needs_soft_labels else None, random_range=(999, 30522))
    task.setup(model=model, info=info)
    model.to(device)
    task.to(device)
    params = list(model.parameters()) + [p for p in task.parameters() if all(p is not q for q in model.parameters())]
    module = torch.nn.ModuleDict({"model": model, "task": task})
    opt = build_optimizer(module, lr=5e-5, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    return model, task, opt, params


def run_steps(model, task, opt, params, batches, device, dtype, probe=None):
    """The trainer's step: forward under autocast, backward, clip, fused AdamW, zero_grad."""
    amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    times, peaks, beside, cpu = [], [], [], []
    for batch in batches:
        if probe is not None:
            beside.append(probe())
        with PeakMemory(device) as mem:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            b = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = task(model, b).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peaks.append(mem.peak)
        if probe is not None:
            beside[-1] = max(beside[-1], probe())
    return times, peaks, mem.method, beside, cpu


def encoder_fwd_bwd(model, mask: torch.Tensor, device, dtype, steps: int, warmup: int, probe):
    """Encoder alone, forward + backward, on the step's packed sequence shape; with the matmul
    peak probed beside each repetition."""
    b, length = mask.shape
    x = torch.randn(b, length, model.spec.text_dim, device=device, requires_grad=True)
    mask = mask.to(device)
    grad = torch.randn(b, length, model.spec.text_dim, device=device)
    times, beside, cpu = [], [], []
    for i in range(warmup + steps):
        if i >= warmup:
            beside.append(probe())
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = model.encoder(x, mask)
        y.backward(grad)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            beside[-1] = max(beside[-1], probe())
        x.grad = None
        model.zero_grad(set_to_none=True)
    return times, beside, cpu


def encoder_flops(model, mask: torch.Tensor, packed: bool) -> float:
    from fvcore.nn import FlopCountAnalysis

    enc = model.encoder
    saved = enc.varlen, enc._run
    enc.varlen, enc._run = "never", enc._layers
    b, length = mask.shape
    x = torch.zeros(b, length, model.spec.text_dim, device=mask.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(enc, (x, mask))
            fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by = fca.by_operator()
    finally:
        enc.varlen, enc._run = saved
    attn = 2.0 * by.get("scaled_dot_product_attention", 0)
    other = 2.0 * sum(by.values()) - attn
    counts = {"total": attn + other, "encoder_attention": attn, "encoder_other": other}
    return step_flops(counts, packed, mask.cpu())[1 if packed else 0]


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def bench(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, task, opt, params = build(args, device)
    packed = model.runs_real_units(device)
    batches, _ = make_batches(args, task, real_units=packed)
    persistent0 = live_bytes(device)
    peak0, n0 = matmul_peak(device, dtype)
    probe = PeakProbe(device, dtype, n0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Peak memory first, from two untimed steps; on the CPU with the allocator made to return
        # what is freed (_fix_malloc), then set back to glibc's usual large-buffer reuse, which the
        # timed steps need (fresh mappings fault in every page: a quarter of a base step here).
        if device.type == "cpu":
            _fix_malloc()
        _, peaks, method, _, _ = run_steps(model, task, opt, params, batches[:2], device, dtype)
        persistent = live_bytes(device)  # weights + grads freed + AdamW state now allocated
        if device.type == "cpu":
            # glibc's steady state for a process that frees large buffers (the dynamic maximum)
            from vlframe.data.loader import keep_freed_memory

            keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=256 << 20)
        times, _, _, beside, cpu = run_steps(model, task, opt, params, batches, device, dtype, probe)
    times, beside, cpu = times[args.warmup:], beside[args.warmup:], cpu[args.warmup:]
    # FLOPs and units of the timed batches
    real = [float(b.num_units) for b in batches[args.warmup:]]
    from vlframe.modules.packing import make_packing

    masks = [make_packing(b.text_mask, b.img_mask).mask for b in batches[args.warmup:]]
    padded_units = [float(m.numel()) for m in masks]
    timed = batches[args.warmup:]
    flops_exec, flops_useful = [], []
    for b, m in zip(timed if args.budget else timed[:1], masks):  # fixed shapes: one count holds for all
        fe, fu = step_flops(count_forward_flops(model, task, b.to(device)), packed, m)
        flops_exec.append(fe)
        flops_useful.append(fu)
    if not args.budget:
        flops_exec, flops_useful = flops_exec * len(times), flops_useful * len(times)
    enc_times, enc_beside, enc_cpu = encoder_fwd_bwd(model, masks[0], device, dtype, steps=args.encoder_reps,
                                                     warmup=1, probe=probe)
    enc_fl = encoder_flops(model, masks[0].to(device), packed)
    peak1, n1 = matmul_peak(device, dtype)
    peak = max(peak0, peak1)
    sec = statistics.median(times)
    # per step rates, then their median (token-budget batches differ in shape)
    rate = statistics.median([f / t for f, t in zip(flops_useful, times)])
    paired = statistics.median([f / t / p for f, t, p in zip(flops_useful, times, beside)])
    enc_paired = statistics.median([enc_fl / t / p for t, p in zip(enc_times, enc_beside)])
    peak = max(peak, *beside, *enc_beside)
    cpu_rate = statistics.median([f / t for f, t in zip(flops_useful, cpu)])
    enc_cpu_rate = statistics.median([enc_fl / t for t in enc_cpu])
    return dict(
        device=device, dtype=args.dtype, packed=packed, compiled=args.compile, sec=sec,
        times=times, input_units=statistics.median([(r if packed else p) / t for r, p, t in zip(real, padded_units, times)]),
        real_units=statistics.median([r / t for r, t in zip(real, times)]),
        flops=statistics.median(flops_useful), flops_exec=statistics.median(flops_exec), rate=rate,
        peak=peak, peak_n=n0 if peak0 >= peak1 else n1, peaks=(peak0, peak1), enc_time=statistics.median(enc_times), enc_flops=enc_fl,
        paired=paired, enc_paired=enc_paired, cpu_rate=cpu_rate, enc_cpu_rate=enc_cpu_rate, cpu_peak=CPU_PEAK[0],
        mem_step=peaks[-1], mem_method=method, persistent=persistent, persistent0=persistent0,
        examples=statistics.median([b.size for b in batches[args.warmup:]]), real_mean=statistics.mean(real),
        padded_mean=statistics.mean(padded_units), graphs=model.encoder.compiled_graphs,
    )


def report(args, r: dict) -> None:
    shape = (f"token-budget batches of {args.budget} {'real' if r['packed'] else 'padded'} units "
             f"(text U[8,60] + regions U[10,100]), median {r['examples']:.0f} examples"
             if args.budget else f"{args.batch} x ({args.text} text + {args.regions} regions)")
    path = "packed (real tokens only)" if r["packed"] else "padded"
    print(f"UNITER-{args.model} {args.task} step on {r['device']} ({torch.cuda.get_device_name(r['device']) if r['device'].type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{r['dtype']}, {path}, {'compiled' if r['compiled'] else 'eager'}"
          f"{', activation checkpointing' if args.checkpointing else ''}; {shape}")
    print(f"  matmul peak ({r['dtype']}, square n={r['peak_n']}, best of before/after/beside the steps): "
          f"{r['peak'] / 1e9:8.1f} GFLOP/s  (before {r['peaks'][0] / 1e9:.1f}, after {r['peaks'][1] / 1e9:.1f})")
    print(f"  seconds/step: median {r['sec']:.4f} of {len(r['times'])} after {args.warmup} warm-up "
          f"(min {min(r['times']):.4f}, max {max(r['times']):.4f})")
    print(f"  units/step: real {r['real_mean']:.0f}, padded joint sequence {r['padded_mean']:.0f} "
          f"({1 - r['real_mean'] / r['padded_mean']:.1%} padding)")
    print(f"  input units/s {r['input_units']:10.0f}   real units/s {r['real_units']:10.0f}")
    executed = "" if r["packed"] else f", {r['flops_exec'] / 1e9:.1f} GFLOP executed (padded)"
    print(f"  FLOPs/step (fvcore forward x2 x3): {r['flops'] / 1e9:.1f} GFLOP useful{executed}")
    print(f"  achieved {r['rate'] / 1e9:8.1f} GFLOP/s = {r['rate'] / r['peak']:.1%} of the run's best matmul peak"
          f"{' (MFU)' if r['device'].type == 'cuda' else ''}; {r['paired']:.1%} of the peak probed beside each step")
    enc_rate = r["enc_flops"] / r["enc_time"]
    print(f"  encoder alone fwd+bwd: {r['enc_time']:.4f} s, {r['enc_flops'] / 1e9:.1f} GFLOP, "
          f"{enc_rate / 1e9:.1f} GFLOP/s = {enc_rate / r['peak']:.1%} of the run's best matmul peak; "
          f"{r['enc_paired']:.1%} of the peak probed beside each repetition")
    if r["device"].type == "cpu":
        print(f"  per CPU-second of this process (what other processes on a shared machine do not change): "
              f"matmul peak {r['cpu_peak'] / 1e9:.1f} GFLOP/CPU-s; step {r['cpu_rate'] / 1e9:.1f} = "
              f"{r['cpu_rate'] / r['cpu_peak']:.1%}; encoder alone fwd+bwd {r['enc_cpu_rate'] / 1e9:.1f} = "
              f"{r['enc_cpu_rate'] / r['cpu_peak']:.1%} of the peak")
    print(f"  peak memory ({r['mem_method']}): step adds {fmt_bytes(r['mem_step'])} on top of "
          f"{fmt_bytes(r['persistent'])} live after two steps (weights, AdamW state, process"
          f"{' heap' if r['device'].type == 'cpu' else ''}); {fmt_bytes(r['persistent0'])} before the first step")
    if r["compiled"]:
        print(f"  torch.compile ({args.compile_backend}): {r['graphs']} graph(s) compiled (first + recompiles + "
              f"graph breaks) over {args.warmup + args.steps} steps, length_multiple={args.length_multiple}")


# ------------------------------------------------------------------------------ memory fit
def saved_bytes(model, task, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward in the task's forward: the
    activation memory a step holds at the end of its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_nested:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(task.parameters())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = task(model, batch).loss
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)  # weights are counted apart


def fit(args) -> None:
    """Measured CPU figures -> the fp16 16 GB question for UNITER-base and -large."""
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    _fix_malloc()
    print("Memory model for a GPU step in fp16 AMP (torch.autocast + GradScaler, fp32 master weights):")
    print("  persistent 16 B/param: fp32 weights 4 + fp32 grads 4 + AdamW exp_avg 4 + exp_avg_sq 4;")
    print("  activations: the bytes autograd saves for backward, measured on the CPU in fp32 at two batch")
    print("  sizes (20 text + 36 regions each) and fitted as a + b x units; under fp16 autocast the saved matmul")
    print("  inputs are fp16 but LayerNorm/softmax/loss tensors stay fp32: bounded by the fp32 figure (1.0x),")
    print("  estimated at 0.6x; with checkpointing, + the layer inputs it keeps + one layer recomputed in backward;")
    print("  + 1.0 GiB for the CUDA context, cuBLAS workspace and allocator fragmentation.")
    print("  Cross-check: the measured CPU fp32 step peak (VmHWM above the live set, 2nd step) at the smaller size.")
    for size, units, tag in (("base", 10240, "UNITER-base"), ("large", 6144, "UNITER-large")):
        sizes = (4, 8)
        a = argparse.Namespace(**{**vars(args), "model": size, "batch": sizes[0], "text": 20, "regions": 36,
                                  "budget": 0, "checkpointing": False, "compile": False, "varlen": "never",
                                  "warmup": 1, "steps": 1})
        model, task, opt, params = build(a, device)
        n_params = sum(p.numel() for p in params)
        batches, _ = make_batches(a, task, real_units=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, peaks, _, _, _ = run_steps(model, task, opt, params, batches, device, torch.float32)
        measured = {}
        for ckpt in (False, True):
            model.encoder.gradient_checkpointing = ckpt
            for n in sizes:
                b = make_batches(argparse.Namespace(**{**vars(a), "batch": n}), task, real_units=False)[0][0]
                measured[ckpt, n] = saved_bytes(model, task, b)
        model.encoder.gradient_checkpointing = False
        layers = len(model.encoder.layers)
        u0, u1 = sizes[0] * 56, sizes[1] * 56
        step_act = measured[False, sizes[0]]
        print(f"  {tag}: {n_params / 1e6:.1f}M params (with the MLM head) -> persistent {fmt_bytes(16 * n_params)}; "
              f"CPU fp32 @ {u0} units: saved {fmt_bytes(step_act)}, step peak {fmt_bytes(peaks[-1])} "
              f"(grads {fmt_bytes(4 * n_params)} + saved = {fmt_bytes(4 * n_params + step_act)})")
        for ckpt in (False, True):
            per_unit = (measured[ckpt, sizes[1]] - measured[ckpt, sizes[0]]) / (u1 - u0)
            fixed = measured[ckpt, sizes[0]] - per_unit * u0
            act = fixed + per_unit * units
            if ckpt:  # one layer's activations come back during its recomputation, and the layer
                # inputs that checkpoint holds (not seen by the hooks): layers x H fp32 per unit
                full = (measured[False, sizes[1]] - measured[False, sizes[0]]) / (u1 - u0)
                act += full * units / layers + units * layers * model.spec.text_dim * 4
            est = 16 * n_params + 0.6 * act + 2**30
            bound = 16 * n_params + act + 2**30
            verdict = ("fits" if bound <= 16 * 2**30 else
                       "fits by the estimate, not by the bound" if est <= 16 * 2**30 else "does NOT fit")
            print(f"    {units} units{', activation checkpointing' if ckpt else ''}: {per_unit / 2**10:.0f} KiB/unit "
                  f"saved in fp32 -> activations {fmt_bytes(act)}; total {fmt_bytes(est)} (bound "
                  f"{fmt_bytes(bound)}) of 16 GiB: {verdict}")
        del model, task, opt, params, batches
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SIZES), default="tiny")
    p.add_argument("--task", choices=sorted(TASK_CFG), default="mlm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text", type=int, default=20)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--budget", type=int, default=0, help="token-budget batches of this many units (0: fixed shapes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--varlen", choices=("cuda", "always", "never"), default="cuda",
                   help="the encoder's packed path: cuda = on CUDA only (the model's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (model.compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: quick checks)")
    p.add_argument("--length-multiple", type=int, default=32, help="length bucket for --compile")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per encoder layer")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--encoder-reps", type=int, default=5, help="timed repetitions of the encoder alone")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peaks", action="store_true", help="print the fp32/bf16/fp16 matmul peaks of --device and exit")
    p.add_argument("--peak-sizes", type=int, nargs="*", default=[], help="square matmul sizes for the peaks")
    p.add_argument("--fit", action="store_true", help="the 16 GB fp16 question for base/large (CPU measurement)")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    global PEAK_SIZES
    PEAK_SIZES = tuple(args.peak_sizes)
    if args.fit:
        fit(args)
        return
    if args.peaks:
        device = torch.device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; tf32 printed apart
        for dt in ("fp32", "bf16", "fp16"):
            rate, n = matmul_peak(device, DTYPES[dt])
            print(f"matmul peak {dt:4s} on {name}: {rate / 1e9:10.1f} GFLOP/s (square n={n})")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            rate, n = matmul_peak(device, torch.float32)
            print(f"matmul peak tf32 on {name}: {rate / 1e9:10.1f} GFLOP/s (square n={n})")
        return
    report(args, bench(args))


if __name__ == "__main__":
    main()
