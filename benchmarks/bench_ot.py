"""Benchmark the OT solvers of UNITER's WRA on the CPU.

Times, in ms over ``--repeats`` rounds after warm-up (median and p90), all variants run
round-robin so that they see the same machine load:
  * the whole WRA path as the ITM task runs it, ``vlframe.ot.cost.wra_distance`` (cosine cost
    from word [B, N, D] and region [B, M, D] embeddings that require grad, the solver, the
    distance) forward + backward, for IPOT with its default exact-marginal rounding (feasible
    plan), without it (``ipot-raw``) and Sinkhorn, and the ratio to
  * a plain baseline of the same IPOT structured like the original UNITER code, same conditions;
  * the solver alone on a fixed cost.
Also prints both marginals' worst error of each IPOT plan and IPOT's relative gap to POT's exact
``emd2`` (if POT is installed). Other processes
on the machine inflate the figures, 2-thread ones most (OpenMP threads wait for each other).

    python benchmarks/bench_ot.py [--threads 2] [--batch 32] [--words 20] [--regions 36]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from vlframe.ot import IPOT, Sinkhorn, cosine_cost, ot_distance  # noqa: E402
from vlframe.ot.cost import wra_distance  # noqa: E402


def timed(fn, repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def plain_wra_distance(words, regions, mask_w, mask_r, beta=0.5, iterations=50):
    """Baseline: the same IPOT written plainly (normalised embeddings, out-of-place ops,
    [B,N,M] @ [B,M,1] products), structured like the original UNITER code, for comparing
    under the same machine load."""
    xn = torch.nn.functional.normalize(words, dim=-1, eps=1e-5)
    yn = torch.nn.functional.normalize(regions, dim=-1, eps=1e-5)
    joint = mask_w.unsqueeze(2) & mask_r.unsqueeze(1)
    cost = (1 - xn.matmul(yn.transpose(1, 2))).masked_fill(~joint, 0)
    with torch.no_grad():
        b, n, m = cost.shape
        n_len = mask_w.sum(1).float().view(b, 1, 1)
        m_len = mask_r.sum(1).float().view(b, 1, 1)
        kernel = torch.exp(-cost / beta) * joint
        plan = joint.float()
        sigma = (mask_w.float() / n_len.view(b, 1)).view(b, n, 1)
        pad_w = (~mask_w).float().view(b, n, 1) * 1e4
        pad_r = (~mask_r).float().view(b, 1, m) * 1e4
        for _ in range(iterations):
            q = kernel * plan
            delta = 1 / (m_len * q.transpose(1, 2).matmul(sigma).view(b, 1, m) + pad_r)
            sigma = 1 / (n_len * q.matmul(delta.view(b, m, 1)) + pad_w)
            plan = sigma * q * delta
    return (cost * plan).sum((1, 2))


def make_problem(args, generator: torch.Generator):
    b, n, m, dim = args.batch, args.words, args.regions, args.dim
    words = torch.randn(b, n, dim, generator=generator, requires_grad=True)
    regions = torch.randn(b, m, dim, generator=generator, requires_grad=True)
    # realistic padding: every example keeps at least half of each side
    n_valid = torch.randint(n // 2, n + 1, (b,), generator=generator)
    m_valid = torch.randint(m // 2, m + 1, (b,), generator=generator)
    mask_w = torch.arange(n) < n_valid[:, None]
    mask_r = torch.arange(m) < m_valid[:, None]
    return words, regions, mask_w, mask_r


def emd_gap(cost: torch.Tensor, plan: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> list[float]:
    import ot  # POT

    gaps = []
    dist = ot_distance(cost, plan)
    for k in range(cost.shape[0]):
        ia, ib = mask_a[k].nonzero().flatten(), mask_b[k].nonzero().flatten()
        sub = cost[k][ia][:, ib].double().numpy()
        exact = ot.emd2(ot.unif(len(ia)), ot.unif(len(ib)), sub)
        gaps.append((float(dist[k]) - exact) / exact)
    return gaps


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """ms per call of each fn, timed round-robin: every round runs each fn once, so all of them
    see the same machine load (a shared machine's load changes from second to second)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--words", type=int, default=20)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    words, regions, mask_w, mask_r = make_problem(args, g)
    solvers = {
        "ipot": IPOT(beta=0.5, iterations=args.iterations),
        "ipot-raw": IPOT(beta=0.5, iterations=args.iterations, round_marginals=False),
        "sinkhorn": Sinkhorn(epsilon=0.1, iterations=args.iterations),
    }
    print(
        f"B={args.batch} N={args.words} M={args.regions} D={args.dim} iterations={args.iterations} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}, timed round-robin (ms: median / p90)"
    )

    def fwd_bwd(fn):
        def go():
            words.grad = regions.grad = None
            fn().sum().backward()

        return go

    # The whole WRA path as the ITM task runs it: vlframe.ot.cost.wra_distance (cost + solve +
    # distance), forward + backward; and the plain original algorithm under the same load.
    paths = {
        "plain original IPOT (cost + solve + distance)": fwd_bwd(
            lambda: plain_wra_distance(words, regions, mask_w, mask_r, iterations=args.iterations)),
        **{f"wra_distance, {name}": fwd_bwd(lambda solver=solver: wra_distance(solver, words, regions, mask_w, mask_r))
           for name, solver in solvers.items()},
        "cosine cost alone (no solver)": fwd_bwd(lambda: cosine_cost(words, regions, mask_w, mask_r)),
    }
    times = interleaved(paths, args.repeats, args.warmup)
    plain = times["plain original IPOT (cost + solve + distance)"]
    print("  whole path, forward + backward:")
    for name, ts in times.items():
        ratio = ""
        if name.startswith("wra_distance"):
            per_round = [a / b for a, b in zip(ts, plain)]
            ratio = (f"   {statistics.median(ts) / statistics.median(plain):.2f}x plain (per-round median "
                     f"{statistics.median(per_round):.2f}x)")
        print(f"    {name:46s} {statistics.median(ts):7.2f} / {_p90(ts):7.2f}{ratio}")
    fixed_cost = cosine_cost(words.detach(), regions.detach(), mask_w, mask_r)
    alone = interleaved({name: (lambda solver=solver: solver(fixed_cost, mask_w, mask_r))
                         for name, solver in solvers.items()}, args.repeats, args.warmup)
    print("  solver alone on a fixed cost:")
    for name, ts in alone.items():
        print(f"    {name:46s} {statistics.median(ts):7.2f} / {_p90(ts):7.2f}")
    with torch.no_grad():  # the baseline computes the unrounded plan's distances
        plain = plain_wra_distance(words, regions, mask_w, mask_r, iterations=args.iterations)
        for name in ("ipot-raw", "ipot"):
            plan = solvers[name](fixed_cost, mask_w, mask_r).double()
            gap = (plain - ot_distance(fixed_cost, plan)).abs().max()
            row_err = ((plan.sum(2) - 1 / mask_w.sum(1, keepdim=True)).abs() * mask_w).max()
            col_err = ((plan.sum(1) - 1 / mask_r.sum(1, keepdim=True)).abs() * mask_r).max()
            print(
                f"  {name}: max |distance - plain baseline| {float(gap):.1e}, "
                f"marginal error rows {float(row_err):.1e} cols {float(col_err):.1e}"
            )
    try:
        gaps = emd_gap(fixed_cost, solvers["ipot"](fixed_cost, mask_w, mask_r), mask_w, mask_r)
    except ImportError:
        print("  (POT not installed: no emd2 gap)")
    else:
        print(
            f"  ipot vs exact emd2 relative gap: mean {100 * statistics.fmean(gaps):.3f}% "
            f"max {100 * max(gaps):.3f}% min {100 * min(gaps):.3f}%"
        )


if __name__ == "__main__":
    main()
