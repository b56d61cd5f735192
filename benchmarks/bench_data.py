"""Data-path benchmark: token-budget batching and region-store loading.

(a) Budget use and padding of TokenBudgetSampler next to a simulation of the original UNITER
    sampler, on COCO-like lengths (text 8-60 tokens, regions 10-100).
(b) Examples per second one loader process reads from an LMDB region store (RegionStore.get +
    building Examples), in the main process (num_workers=0) and through one worker
    (num_workers=1, timed in the main process, collate included).
(c) Peak memory of that reading process (it runs in a fresh subprocess so the writing phase and
    the benchmark harness do not count).

    python benchmarks/bench_data.py                 # everything
    python benchmarks/bench_data.py --skip-store    # (a) only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np


def bench_sampler(n: int, budget: int, seed: int) -> None:
    from vlframe.data.sampler import TokenBudgetSampler, original_uniter_batches

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


def write_store(path: str, n_images: int, feat_dim: int, num_labels: int, seed: int) -> float:
    from vlframe.data.stores import RegionStoreWriter

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with RegionStoreWriter(path, feat_dim=feat_dim, num_labels=num_labels or None) as w:
        for i in range(n_images):
            k = int(rng.integers(36, 101))
            xy = rng.random((k, 2), dtype=np.float32) * 0.5
            wh = rng.random((k, 2), dtype=np.float32) * 0.5 + 0.01
            soft = None
            if num_labels:
                soft = rng.random((k, num_labels), dtype=np.float32)
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
    return time.perf_counter() - t0


def _memory() -> dict[str, float]:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def read_store(path: str, budget: int, seed: int) -> dict:
    """Runs in a fresh process: read every image of the store through the loader path."""
    import torch

    from vlframe.data.batch import Example, collate
    from vlframe.data.loader import build_loader
    from vlframe.data.sampler import TokenBudgetSampler
    from vlframe.data.stores import RegionStore

    torch.set_num_threads(1)
    # Records decode into read-only numpy views of the LMDB value; every tensor is copied at once.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    base = _memory()

    class StoreDataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            # All 36-100 stored regions. The store reopens its LMDB handle in each worker process.
            self.store = RegionStore(path, conf_threshold=None)
            ids = sorted(self.store.ids())
            rng = np.random.default_rng(seed)
            self.img_ids = ids
            self.texts = [rng.integers(1000, 30000, int(rng.integers(8, 61))) for _ in ids]

        def __len__(self) -> int:
            return len(self.img_ids)

        def __getitem__(self, i: int) -> Example:
            rec = self.store.get(self.img_ids[i])
            ids = np.concatenate([[101], self.texts[i], [102]])
            return Example(
                txt_id=f"t{i}",
                img_id=rec.img_id,
                input_ids=torch.from_numpy(ids),
                # torch's fp16 -> fp32 cast is ~2.5x faster than numpy's astype; it is the one copy.
                img_feat=torch.from_numpy(rec.features).float(),
                img_pos=torch.from_numpy(rec.boxes).clone(),
                soft_labels=None if rec.soft_labels is None else torch.from_numpy(rec.soft_labels).float(),
            )

    ds = StoreDataset()
    n = len(ds)
    out: dict = {"images": n}

    # Main process, no collate: RegionStore.get + Example, in a random order (no page-cache luck).
    order = np.random.default_rng(seed).permutation(n)
    t0, c0 = time.perf_counter(), time.process_time()
    units = 0
    for i in order:
        units += ds[int(i)].num_units
    out["main_get_example_per_s"] = n / (time.perf_counter() - t0)
    # Per CPU-second too: on a shared machine wall time also counts other processes' turns.
    out["main_get_example_per_cpu_s"] = n / (time.process_time() - c0)
    out["mem_after_main"] = _memory()

    store = ds.store
    text_lengths = [len(t) + 2 for t in ds.texts]
    region_lengths = store.num_regions_array(ds.img_ids)
    t0 = time.perf_counter()
    _ = [store.num_regions(i) for i in ds.img_ids]
    out["num_regions_per_s"] = n / (time.perf_counter() - t0)
    for workers in (0, 1):
        # collate pads text and regions separately: the two-part cost is the collated size.
        sampler = TokenBudgetSampler(text_lengths=text_lengths, region_lengths=region_lengths, budget=budget,
                                     bucket_size=8192, seed=seed)
        loader = build_loader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        seen = 0
        for batch in loader:
            seen += batch.size
        assert seen == n
        out[f"loader_w{workers}_per_s"] = n / (time.perf_counter() - t0)
        out[f"loader_w{workers}_per_cpu_s"] = n / (time.process_time() - c0)  # main process CPU only
        out[f"batches_w{workers}"] = len(sampler)
    out["mem_base"] = base
    out["mem_end"] = _memory()
    out["worker_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def bench_store(n_images: int, feat_dim: int, num_labels: int, budget: int, seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vlframe_bench_") as tmp:
        path = os.path.join(tmp, "regions.lmdb")
        secs = write_store(path, n_images, feat_dim, num_labels, seed)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else os.path.getsize(path)
        print(f"\n(b) region store: {n_images} images x 36-100 regions x {feat_dim} fp16"
              f"{f' + {num_labels} soft labels' if num_labels else ''}; written in {secs:.1f} s "
              f"({n_images / secs:.0f} img/s), {size / 2**20:.0f} MiB on disk")
        proc = subprocess.run(
            [sys.executable, __file__, "--_read", path, "--budget", str(budget), "--seed", str(seed)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode:
            raise SystemExit(f"reader subprocess failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"    main process, RegionStore.get + Example (random order): {r['main_get_example_per_s']:8.0f} examples/s  "
          f"({r['main_get_example_per_cpu_s']:.0f} per CPU-second; target >= 2000)")
    print(f"    RegionStore.num_regions (sampler lengths):               {r['num_regions_per_s']:8.0f} images/s")
    print(f"    build_loader num_workers=0 (main process, + collate):    {r['loader_w0_per_s']:8.0f} examples/s  "
          f"({r['loader_w0_per_cpu_s']:.0f} per CPU-second; {r['batches_w0']} batches)")
    print(f"    build_loader num_workers=1 (one worker, + collate):      {r['loader_w1_per_s']:8.0f} examples/s")
    m0, m1, me = r["mem_base"], r["mem_after_main"], r["mem_end"]
    print("\n(c) memory of the reading process (fresh subprocess, MiB)")
    print(f"    after imports:               RSS peak {m0['ru_maxrss_mb']:7.0f}   anon {m0.get('RssAnon', float('nan')):7.0f}   file {m0.get('RssFile', float('nan')):7.0f}")
    print(f"    after main-process reading:  RSS peak {m1['ru_maxrss_mb']:7.0f}   anon {m1.get('RssAnon', float('nan')):7.0f}   file {m1.get('RssFile', float('nan')):7.0f}")
    print(f"    after both loaders:          RSS peak {me['ru_maxrss_mb']:7.0f}   anon {me.get('RssAnon', float('nan')):7.0f}   file {me.get('RssFile', float('nan')):7.0f}")
    print(f"    the num_workers=1 worker:    RSS peak {r['worker_maxrss_mb']:7.0f}")
    print("    (file-backed RSS is LMDB's memory map: page cache shared with the OS, not heap)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=50_000, help="examples for (a)")
    p.add_argument("--budget", type=int, default=10240)
    p.add_argument("--images", type=int, default=3000, help="images in the store for (b)/(c)")
    p.add_argument("--feat-dim", type=int, default=2048)
    p.add_argument("--num-labels", type=int, default=0, help="soft-label classes to store (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-store", action="store_true", help="run (a) only")
    p.add_argument("--_read", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._read:
        print(json.dumps(read_store(a._read, a.budget, a.seed)))
        return
    bench_sampler(a.examples, a.budget, a.seed)
    if not a.skip_store:
        bench_store(a.images, a.feat_dim, a.num_labels, a.budget, a.seed)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
