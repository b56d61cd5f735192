"""Data-path benchmark: token-budget batching and region-store loading.

(a) Budget use and padding of TokenBudgetSampler next to a simulation of the original UNITER
    sampler, on COCO-like lengths (text 8-60 tokens, regions 10-100).
(b) Examples per second read from an LMDB region store (36-100 regions x 2048 fp16 features,
    1601-class fp16 soft labels by default) + a text store, through the real read path
    (ImageTextDataset -> collate -> VLBatch.to):
      - main process: ``dataset[i]`` alone, then dataset + collate into float32 batches;
      - one DataLoader worker (num_workers=1), timed in the main process up to a float32 batch
        (``batch.to("cpu")``), with the worker collating to float32 (what a plain ``collate``
        does) and keeping fp16 (``collate_keeps_fp16``: half the bytes cross the process
        boundary, ``.to`` makes them float32 on the target device).
    Each is run with the soft labels read and with ``soft_labels=False`` (tasks other than MRC).
      - the MRC task's batches as the trainer builds them (``TaskBatches``: masking, the soft labels
        of the masked regions only, fp16 until ``.to``, the worker's reused shared-memory blocks),
        main process and one worker.
    The worker runs read the store ``--passes`` times in one epoch: a worker faults in its reused
    blocks once per start, which a real epoch (thousands of batches) amortises.
    Wall-clock figures depend on what else the machine runs; "per CPU-second" figures divide by
    the CPU time of the process doing the reading (the worker's, for num_workers=1), which is
    what one loader core sustains.
(c) Peak memory of that reading process and of its worker (a fresh subprocess, so the writing
    phase and the harness do not count); file-backed RSS is LMDB's memory map (page cache).

    python benchmarks/bench_data.py                 # everything
    python benchmarks/bench_data.py --skip-store    # (a) only
    python benchmarks/bench_data.py --images 1000 --num-labels 0
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def bench_sampler(n: int, budget: int, seed: int) -> None:
    from original_sampler import original_uniter_batches  # beside this script
    from vlframe.data.sampler import TokenBudgetSampler

    rng = np.random.default_rng(seed)
    text = rng.integers(8, 61, n)
    regions = rng.integers(10, 101, n)
    lengths = text + regions
    print(f"(a) token-budget batching: {n} examples, text U[8,60] + regions U[10,100], budget {budget}")
    print(f"    {'sampler':44s} {'batches':>8s} {'ex/batch':>9s} {'budget use':>11s} {'padding':>8s} {'build s':>8s}")

    def row(name: str, batches: list[list[int]], padded: int, secs: float) -> None:
        real = int(sum(int(lengths[b].sum()) for b in batches))
        use = real / (len(batches) * budget)
        pad = 1 - real / padded
        print(f"    {name:44s} {len(batches):8d} {n / len(batches):9.1f} {use:11.1%} {pad:8.1%} {secs:8.3f}")

    t0 = time.perf_counter()
    orig = original_uniter_batches(lengths, budget, seed)
    secs = time.perf_counter() - t0
    row("original UNITER (max never reset), b*max", orig, sum(len(b) * int(lengths[b].max()) for b in orig), secs)
    for bucket in (8192, n):
        s = TokenBudgetSampler(lengths=lengths, budget=budget, bucket_size=bucket, seed=seed)
        t0 = time.perf_counter()
        batches = s.batches()
        secs = time.perf_counter() - t0
        row(f"token_budget b*max(len), bucket {bucket}", batches, sum(len(b) * int(lengths[b].max()) for b in batches), secs)
    for bucket in (8192, n):
        s = TokenBudgetSampler(text_lengths=text, region_lengths=regions, budget=budget, bucket_size=bucket, seed=seed)
        t0 = time.perf_counter()
        batches = s.batches()
        secs = time.perf_counter() - t0
        padded = sum(len(b) * int(text[b].max() + regions[b].max()) for b in batches)
        row(f"token_budget b*(max_t+max_r), bucket {bucket}", batches, padded, secs)
    print("    budget use = real units / (batches * budget); padding = padded cells that are padding / all padded cells")


def write_stores(root: str, n_images: int, feat_dim: int, num_labels: int, seed: int) -> float:
    """A region store and a text store (one 8-60 token caption per image) under ``root``."""
    from vlframe.data.stores import RegionStoreWriter, TextStoreWriter

    rng = np.random.default_rng(seed)
    special = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
    t0 = time.perf_counter()
    with RegionStoreWriter(os.path.join(root, "regions"), feat_dim=feat_dim, num_labels=num_labels or None) as w, \
            TextStoreWriter(os.path.join(root, "texts"), tokenizer_name="bert-base-uncased", special_ids=special,
                            vocab_size=30522) as tw:
        for i in range(n_images):
            k = int(rng.integers(36, 101))
            xy = rng.random((k, 2), dtype=np.float32) * 0.5
            wh = rng.random((k, 2), dtype=np.float32) * 0.5 + 0.01
            soft = None
            if num_labels:
                soft = rng.random((k, num_labels), dtype=np.float32).astype(np.float16)
                soft /= soft.sum(1, keepdims=True)
            w.add(
                f"img{i:06d}",
                features=rng.standard_normal((k, feat_dim), dtype=np.float32).astype(np.float16),
                boxes=np.concatenate([xy, xy + wh], 1),
                soft_labels=soft,
                conf=np.sort(rng.random(k, dtype=np.float32))[::-1].copy(),
                width=640,
                height=480,
            )
            tw.add(f"t{i:06d}", token_ids=rng.integers(1000, 30000, int(rng.integers(8, 61))), img_id=f"img{i:06d}")
    return time.perf_counter() - t0


def _memory(pid: int | str = "self") -> dict[str, float]:
    """MiB from /proc/PID/status: VmHWM (peak RSS of this process image; ru_maxrss would carry
    the pre-exec parent's), RssAnon (heap), RssFile (mapped files: LMDB), RssShmem (batches in
    shared memory)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def _max_memory(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Collate:
    """A picklable collate_fn; ``keep_fp16`` as a DataLoader worker would run it."""

    def __init__(self, keep_fp16: bool):
        self.keep_fp16 = keep_fp16

    def __call__(self, examples):
        from vlframe.data.batch import collate, collate_keeps_fp16

        with collate_keeps_fp16(self.keep_fp16):
            return collate(examples)


def read_store(root: str, budget: int, seed: int) -> dict:
    """Runs in a fresh process: read every example of the stores through the loader path."""
    import torch

    from vlframe.data.batch import collate
    from vlframe.data.dataset import ImageTextDataset
    from vlframe.data.loader import build_loader
    from vlframe.data.sampler import TokenBudgetSampler

    torch.set_num_threads(1)
    out: dict = {"mem_base": _memory()}
    for soft in (True, False):
        tag = "soft" if soft else "nosoft"
        # All 36-100 stored regions; the store reopens its LMDB handle in the worker process.
        ds = ImageTextDataset(region_store=os.path.join(root, "regions"), text_store=os.path.join(root, "texts"),
                              conf_threshold=None, max_regions=100, soft_labels=soft)
        n = len(ds)
        out["examples"] = n
        ds[0]  # open the LMDB environments outside the timings

        # Main process, no collate: dataset[i] in a random order (no page-cache luck).
        order = np.random.default_rng(seed).permutation(n)
        t0, c0 = time.perf_counter(), time.process_time()
        units = 0
        for i in order:
            units += ds[int(i)].num_units
        out[f"{tag}_get_per_s"] = n / (time.perf_counter() - t0)
        out[f"{tag}_get_per_cpu_s"] = n / (time.process_time() - c0)

        def sampler() -> TokenBudgetSampler:
            # collate pads text and regions separately: the two-part cost is the collated size.
            return TokenBudgetSampler(text_lengths=ds.text_lengths(), region_lengths=ds.region_lengths(),
                                      budget=budget, bucket_size=8192, seed=seed)

        # Main process, dataset + collate into float32 batches.
        t0, c0 = time.perf_counter(), time.process_time()
        seen = 0
        for idx in sampler():
            batch = collate([ds[i] for i in idx])
            seen += batch.size
        assert seen == n and batch.img_feat.dtype == torch.float32
        out[f"{tag}_main_collate_per_s"] = n / (time.perf_counter() - t0)
        out[f"{tag}_main_collate_per_cpu_s"] = n / (time.process_time() - c0)
        out["batches"] = len(sampler())

        for keep in (False, True):
            name = f"{tag}_w1_{'fp16' if keep else 'fp32'}"
            loader = build_loader(ds, batch_sampler=_Passes(sampler, PASSES), collate_fn=_Collate(keep), num_workers=1,
                                  seed=seed)
            w0 = _children_cpu()
            t0, c0 = time.perf_counter(), time.process_time()
            seen = 0
            it = iter(loader)
            worker_pid = it._workers[0].pid  # private, benchmark only: to read the worker's /proc
            worker_mem: dict[str, float] = {}
            for batch in it:
                worker_mem = _max_memory(worker_mem, _memory(worker_pid))
                batch = batch.to("cpu")  # what the trainer does: fp16 -> float32 happens here
                seen += batch.size
            assert seen == n * PASSES and batch.img_feat.dtype == torch.float32
            out[f"{name}_per_s"] = seen / (time.perf_counter() - t0)
            out[f"{name}_main_cpu_per_s"] = seen / (time.process_time() - c0)
            del it, loader
            out[f"{name}_worker_per_cpu_s"] = seen / max(_children_cpu() - w0, 1e-9)
            out[f"{name}_worker_mem"] = worker_mem
        if soft:
            _task_runs(ds, sampler, seed, out)
            _best_of_rounds(ds, sampler, seed, out, rounds=ROUNDS)
        out[f"mem_after_{tag}"] = _memory()
    return out


ROUNDS = 5
PASSES = 3


class _Passes:
    """``passes`` passes of a fresh token-budget sampler (epochs 0, 1, ...) as one epoch of batches:
    the worker runs read the store that many times, so what a worker does once per start (its
    first reused shared-memory blocks fault in) weighs as little as in a real epoch of thousands
    of batches."""

    def __init__(self, make, passes: int):
        self.make = make
        self.passes = passes

    def __iter__(self):
        for p in range(self.passes):
            s = self.make()
            s.set_epoch(p)
            yield from s

    def __len__(self) -> int:
        return self.passes * len(self.make())


def _best_of_rounds(ds, sampler, seed: int, out: dict, rounds: int) -> None:
    """Examples per CPU-second of dataset + collate in this process, fp16 kept (the worker's
    work, without the shared-memory hand-over), best of ``rounds`` round-robin rounds: on a shared
    machine the best round is the closest to an idle one. Three batch contracts side by side."""
    import torch

    from projects.uniter.uniter.model import UniterModel
    from vlframe.data.batch import collate, collate_keeps_fp16
    from vlframe.engine.data import TaskBatches, _SeededBatches
    from vlframe.registry import TASKS, build
    from vlframe.tasks.base import DataInfo

    task = build({"type": "mrc"}, TASKS)
    task.setup(model=UniterModel(hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                                 img_dim=ds.feat_dim), info=DataInfo.from_dataset(ds))
    keys = [key[0] for key in _SeededBatches(sampler(), seed)]
    batches = TaskBatches(ds, task)
    n = len(ds)

    def padded_soft():  # the old contract: every region's soft labels, padded [B, K, C]
        for _, idx in keys:
            with collate_keeps_fp16():
                collate([ds[i] for i in idx], soft_labels=True)

    def mrc_task():  # the MRC task now: masking + the masked regions' soft labels only
        for key in keys:
            batches[key]

    def no_soft():
        for _, idx in keys:
            with collate_keeps_fp16():
                collate([ds[i] for i in idx], soft_labels=False)

    runs = {"padded_soft": padded_soft, "mrc_task": mrc_task, "no_soft": no_soft}
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, fn in runs.items():
            c0 = time.process_time()
            fn()
            best[name] = max(best[name], n / max(time.process_time() - c0, 1e-9))
    out["best_of"] = {"rounds": rounds, **best}


def _task_runs(ds, sampler, seed: int, out: dict) -> None:
    """The MRC task's batches as the trainer builds them (vlframe.engine.data.TaskBatches: masking,
    and only the masked regions' soft labels; fp16 until ``.to``), in the main process and in
    one DataLoader worker."""
    import torch

    from projects.uniter.uniter.model import UniterModel
    from vlframe.data.loader import build_loader
    from vlframe.engine.data import TaskBatches, _only, _SeededBatches
    from vlframe.registry import TASKS, build
    from vlframe.tasks.base import DataInfo

    task = build({"type": "mrc"}, TASKS)
    task.setup(model=UniterModel(hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                                 img_dim=ds.feat_dim), info=DataInfo.from_dataset(ds))
    n = len(ds)
    batches = TaskBatches(ds, task)
    t0, c0 = time.perf_counter(), time.process_time()
    seen = soft_rows = 0
    for key in _SeededBatches(sampler(), seed):
        batch = batches[key[0]].to("cpu")
        seen += batch.size
        soft_rows += batch.masked_soft_labels.shape[0]
    assert seen == n and batch.soft_labels is None and batch.masked_soft_labels.dtype == torch.float32
    out["mrc_main_per_s"] = n / (time.perf_counter() - t0)
    out["mrc_main_per_cpu_s"] = n / (time.process_time() - c0)
    out["mrc_soft_rows"] = soft_rows
    out["regions"] = int(ds.region_lengths().sum())
    # As TaskStream builds it: the worker fills reused shared-memory blocks, handed back by .to().
    loader = build_loader(TaskBatches(ds, task, num_workers=1), batch_sampler=_SeededBatches(_Passes(sampler, PASSES), seed),
                          collate_fn=_only, num_workers=1, seed=seed)
    w0 = _children_cpu()
    t0, c0 = time.perf_counter(), time.process_time()
    seen = 0
    it = iter(loader)
    worker_pid = it._workers[0].pid
    worker_mem: dict[str, float] = {}
    for batch in it:
        worker_mem = _max_memory(worker_mem, _memory(worker_pid))
        seen += batch.to("cpu").size
    assert seen == n * PASSES
    out["mrc_w1_per_s"] = seen / (time.perf_counter() - t0)
    out["mrc_w1_main_cpu_per_s"] = seen / (time.process_time() - c0)
    del it, loader
    out["mrc_w1_worker_per_cpu_s"] = seen / max(_children_cpu() - w0, 1e-9)
    out["mrc_w1_worker_mem"] = worker_mem


def bench_store(n_images: int, feat_dim: int, num_labels: int, budget: int, seed: int, thp: bool,
                rounds: int = 5, passes: int = 3) -> None:
    with tempfile.TemporaryDirectory(prefix="vlframe_bench_") as tmp:
        secs = write_stores(tmp, n_images, feat_dim, num_labels, seed)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        print(f"\n(b) region store: {n_images} images x 36-100 regions x {feat_dim} fp16"
              f"{f' + {num_labels} fp16 soft labels' if num_labels else ''}, one 8-60 token text each; "
              f"written in {secs:.1f} s ({n_images / secs:.0f} img/s), {size / 2**20:.0f} MiB on disk")
        with contextlib.suppress(OSError):
            print(f"    load average before reading: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
        env = dict(os.environ)
        if thp:
            # torch's CPU allocator then backs blocks >= 2 MB with transparent huge pages: a fresh
            # float32 batch faults in 512x fewer pages (read once, at the first allocation).
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        print(f"    reader: THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
        proc = subprocess.run(
            [sys.executable, __file__, "--_read", tmp, "--budget", str(budget), "--seed", str(seed),
             "--rounds", str(rounds), "--passes", str(passes)],
            capture_output=True, text=True, check=False, env=env,
        )
        if proc.returncode:
            raise SystemExit(f"reader subprocess failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"    {r['examples']} examples, {r['batches']} token-budget batches of <= {budget} units; examples/s "
          f"(wall) and per CPU-second of the reading process; target >= 2000 per loader core;\n"
          f"    the num_workers=1 runs read the store {passes} times in one epoch (class _Passes)")
    for tag, what in (("soft", "soft labels read (MRC tasks)"), ("nosoft", "soft_labels=False")):
        if tag == "soft" and not num_labels:
            continue
        print(f"    -- {what}")
        print(f"    main process, dataset[i] (random order):         {r[f'{tag}_get_per_s']:7.0f} /s   "
              f"{r[f'{tag}_get_per_cpu_s']:7.0f} per CPU-s")
        print(f"    main process, dataset + collate -> float32:      {r[f'{tag}_main_collate_per_s']:7.0f} /s   "
              f"{r[f'{tag}_main_collate_per_cpu_s']:7.0f} per CPU-s")
        for prec, how in (("fp32", "worker collates float32"), ("fp16", "worker keeps fp16, .to() -> f32")):
            k = f"{tag}_w1_{prec}"
            print(f"    num_workers=1, {how:33s} {r[f'{k}_per_s']:7.0f} /s   "
                  f"{r[f'{k}_worker_per_cpu_s']:7.0f} per worker CPU-s, {r[f'{k}_main_cpu_per_s']:7.0f} per main CPU-s")
    if num_labels:
        print(f"    -- the MRC task's batches as the trainer builds them (TaskBatches: masking; soft labels of the "
              f"{r['mrc_soft_rows']} masked of {r['regions']} regions only; fp16 until .to())")
        print(f"    main process, task collate -> .to() float32:     {r['mrc_main_per_s']:7.0f} /s   "
              f"{r['mrc_main_per_cpu_s']:7.0f} per CPU-s")
        print(f"    num_workers=1, task collate in the worker         {r['mrc_w1_per_s']:7.0f} /s   "
              f"{r['mrc_w1_worker_per_cpu_s']:7.0f} per worker CPU-s, {r['mrc_w1_main_cpu_per_s']:7.0f} per main CPU-s")
    if num_labels:
        b = r["best_of"]
        print(f"    -- dataset + collate in one process, fp16 kept (a worker's work without the shared-memory hand-over),"
              f"\n       examples per CPU-second, best of {b['rounds']} round-robin rounds (closest to an idle machine)")
        print(f"    all soft labels padded [B, K, C] (the old contract): {b['padded_soft']:7.0f} per CPU-s")
        print(f"    MRC task: masking + masked regions' soft labels:     {b['mrc_task']:7.0f} per CPU-s")
        print(f"    no soft labels (other tasks):                         {b['no_soft']:7.0f} per CPU-s")
    print("\n(c) memory (MiB; peak = VmHWM, the rest as last sampled; file = LMDB's memory map, i.e. page cache\n"
          "    shared with the OS and other readers, not heap; shmem = batches in shared memory)")

    def row(name: str, m: dict[str, float]) -> None:
        print(f"    {name:48s} peak {m.get('VmHWM', float('nan')):6.0f}  anon {m.get('RssAnon', float('nan')):6.0f}  "
              f"file {m.get('RssFile', float('nan')):6.0f}  shmem {m.get('RssShmem', float('nan')):5.0f}")

    row("reader, after imports", r["mem_base"])
    for tag in (("soft", "nosoft") if num_labels else ("nosoft",)):
        row(f"reader, after the {'soft-label' if tag == 'soft' else 'soft_labels=False'} runs", r[f"mem_after_{tag}"])
        for prec in ("fp32", "fp16"):
            row(f"  its num_workers=1 worker ({prec} collate, peak)", r[f"{tag}_w1_{prec}_worker_mem"])
        if tag == "soft":
            row("  its num_workers=1 worker (MRC task collate, peak)", r["mrc_w1_worker_mem"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=50_000, help="examples for (a)")
    p.add_argument("--budget", type=int, default=10240)
    p.add_argument("--images", type=int, default=2000, help="images in the store for (b)/(c)")
    p.add_argument("--feat-dim", type=int, default=2048)
    p.add_argument("--num-labels", type=int, default=1601, help="soft-label classes to store (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-store", action="store_true", help="run (a) only")
    p.add_argument("--thp", action="store_true", help="run the reader with THP_MEM_ALLOC_ENABLE=1 (huge pages)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the best-of comparison in (b)")
    p.add_argument("--passes", type=int, default=3, help="passes over the store in one epoch of the num_workers=1 runs")
    p.add_argument("--_read", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._read:
        global ROUNDS, PASSES
        ROUNDS, PASSES = a.rounds, a.passes
        print(json.dumps(read_store(a._read, a.budget, a.seed)))
        return
    bench_sampler(a.examples, a.budget, a.seed)
    if not a.skip_store:
        bench_store(a.images, a.feat_dim, a.num_labels, a.budget, a.seed, a.thp, a.rounds, a.passes)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
