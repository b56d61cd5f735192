"""OT solvers for WRA against real references: POT's exact (emd/emd2) and log-domain Sinkhorn,
torch autograd (gradcheck) for the cosine cost, and the original UNITER code's IPOT output
(golden fixture, skipped where the shared fixtures folder is absent)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, needs_fixtures
import torch
import torch.nn.functional as F

from vlframe.ot import IPOT, ExactOT, Sinkhorn, cosine_cost, ot_distance, wra_distance
from vlframe.ot.base import round_to_marginals
from vlframe.registry import OT_SOLVERS, UnknownComponentError, build

ot = pytest.importorskip("ot")  # POT, the reference implementation

FIXTURE = Path(FIXTURES) / "uniter_ref_tiny.pt"


@pytest.fixture(autouse=True)
def _one_thread():
    """The problems here are tiny: a second OpenMP thread only adds waits (gradcheck: 1 s -> 13 s
    on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(seed: int, b: int = 6, n: int = 7, m: int = 9, dim: int = 16, dtype=torch.float32):
    """Random WRA problem: embeddings, masks with random valid lengths (incl. 1 on each side)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g).to(dtype)
    y = torch.randn(b, m, dim, generator=g).to(dtype)
    n_valid = torch.randint(1, n + 1, (b,), generator=g)
    m_valid = torch.randint(1, m + 1, (b,), generator=g)
    n_valid[0], m_valid[1] = 1, 1  # degenerate sides are always present
    n_valid[2], m_valid[2] = n, m  # and one example without padding
    # valid entries scattered (not only a prefix): the solvers must not assume left-aligned padding
    mask_x = torch.rand(b, n, generator=g).argsort(1).argsort(1) < n_valid[:, None]
    mask_y = torch.rand(b, m, generator=g).argsort(1).argsort(1) < m_valid[:, None]
    return x, y, mask_x, mask_y


def _valid_sub(cost, mask_a, mask_b, k):
    ia, ib = mask_a[k].nonzero().flatten(), mask_b[k].nonzero().flatten()
    return cost[k][ia][:, ib].double().numpy(), ia, ib


def _check_marginals(plan, mask_a, mask_b, row_tol, col_tol):
    """Uniform marginals on valid entries (a tol of None skips that side), exact 0 on padding."""
    n = mask_a.sum(1, keepdim=True).double()
    m = mask_b.sum(1, keepdim=True).double()
    plan = plan.double()
    rows, cols = plan.sum(2), plan.sum(1)
    if row_tol is not None:
        assert ((rows - 1 / n).abs() * mask_a).max() <= row_tol
    if col_tol is not None:
        assert ((cols - 1 / m).abs() * mask_b).max() <= col_tol
    joint = mask_a[:, :, None] & mask_b[:, None, :]
    assert torch.all(plan[~joint] == 0)  # exactly zero on padding
    assert torch.all(plan >= 0)


# ---------------------------------------------------------------- registry and interface


def test_registry_builds_each_solver():
    ipot = build({"type": "ipot", "beta": 0.5}, OT_SOLVERS)
    assert isinstance(ipot, IPOT) and ipot.beta == 0.5 and ipot.iterations == 50 and ipot.inner_steps == 1
    assert ipot.round_marginals is True
    sk = build({"type": "sinkhorn", "epsilon": 0.05, "detach_plan": False}, OT_SOLVERS)
    assert isinstance(sk, Sinkhorn) and sk.epsilon == 0.05 and sk.detach_plan is False
    assert isinstance(build({"type": "exact"}, OT_SOLVERS), ExactOT)
    assert repr(ipot) == "IPOT(beta=0.5, iterations=50, inner_steps=1, round_marginals=True)"
    assert repr(sk) == "Sinkhorn(epsilon=0.05, iterations=100, tol=0.0001, check_every=10, max_iterations=10000, detach_plan=False)"
    with pytest.raises(UnknownComponentError, match="ipot"):
        build({"type": "ipto"}, OT_SOLVERS)


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"type": "ipot", "beta": 0}, "beta"),
        ({"type": "ipot", "iterations": 0}, "iterations"),
        ({"type": "ipot", "inner_steps": 1.5}, "inner_steps"),
        ({"type": "ipot", "round_marginals": "yes"}, "round_marginals"),
        ({"type": "sinkhorn", "epsilon": -1.0}, "epsilon"),
        ({"type": "sinkhorn", "tol": 0}, "tol"),
        ({"type": "sinkhorn", "iterations": 200, "max_iterations": 100}, "max_iterations"),
        ({"type": "sinkhorn", "detach_plan": "yes"}, "detach_plan"),
    ],
)
def test_bad_kwargs_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=f"{cfg['type']}: {key}"):
        build(cfg, OT_SOLVERS)


def test_bad_inputs_raise_clear_errors():
    solver = IPOT()
    with pytest.raises(ValueError, match=r"ipot: cost must be a \[B, N, M\] tensor"):
        solver(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ipot: mask_b"):
        solver(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="sinkhorn: cost must be a floating tensor"):
        Sinkhorn()(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cosine_cost: expected x"):
        cosine_cost(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="ot_distance"):
        ot_distance(torch.zeros(2, 3, 4), torch.zeros(2, 4, 3))


def test_exact_without_pot_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    with pytest.raises(ImportError, match="exact OT solver: needs POT"):
        ExactOT()


# ---------------------------------------------------------------- cost


def test_cosine_cost_matches_normalised_embeddings_and_autograd():
    x, y, mx, my = _problem(0, dim=8, dtype=torch.float64)
    with torch.no_grad():
        x[3, 0] = 0.0  # zero vector: normalised by eps, cost 1, no NaN
        y[4, 1] *= 1e-7  # norm under eps
    ref = 1 - F.normalize(x, dim=-1, eps=1e-5) @ F.normalize(y, dim=-1, eps=1e-5).transpose(1, 2)
    joint = mx[:, :, None] & my[:, None, :]
    cost = cosine_cost(x, y, mx, my)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), ref * joint, atol=1e-6, rtol=0)
    assert torch.all(cost[~joint] == 0)
    assert cost.min() >= -1e-6 and cost.max() <= 2 + 1e-6

    from vlframe.ot.cost import _CosineCost

    # the fused backward against autograd's numerical Jacobian (three examples keep it fast)
    xg, yg = x[2:5].clone().requires_grad_(), y[2:5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _CosineCost.apply(a, b, mx[2:5], my[2:5], 1e-5), (xg, yg))


def test_cosine_cost_gradient_matches_normalize_autograd_fp32():
    x, y, mx, my = _problem(1, b=4, n=20, m=36, dim=768)
    w = torch.rand(4, 20, 36, generator=torch.Generator().manual_seed(0))
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    (cosine_cost(xa, ya, mx, my) * w).sum().backward()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    joint = mx[:, :, None] & my[:, None, :]
    ref = (1 - F.normalize(xb, dim=-1, eps=1e-5) @ F.normalize(yb, dim=-1, eps=1e-5).transpose(1, 2)) * joint
    (ref * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ya.grad, yb.grad, atol=1e-6, rtol=1e-4)


def test_cosine_cost_half_inputs_give_fp32_cost_and_grads():
    x, y, mx, my = _problem(2, dtype=torch.float16)
    x.requires_grad_()
    cost = cosine_cost(x, y, mx, my)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, cosine_cost(x.detach().float(), y.float(), mx, my))
    cost.sum().backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()


def test_cost_and_solvers_stay_fp32_under_autocast():
    x, y, mx, my = _problem(9, dim=32)
    ref_cost = cosine_cost(x, y, mx, my)
    plans = {s: s(ref_cost, mx, my) for s in (IPOT(), Sinkhorn())}
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = cosine_cost(xg, y, mx, my)
        assert cost.dtype == torch.float32
        torch.testing.assert_close(cost, ref_cost, atol=1e-6, rtol=0)  # bf16 would be ~1e-2 off
        for solver, plan in plans.items():
            torch.testing.assert_close(solver(cost, mx, my), plan, atol=1e-7, rtol=0)
        ot_distance(cost, plans[next(iter(plans))]).sum().backward()
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()


# ---------------------------------------------------------------- IPOT


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dim", [4, 16, 768])
def test_ipot_distance_within_one_percent_of_exact_emd(seed, dim):
    x, y, mx, my = _problem(seed, b=8, n=12, m=20, dim=dim)
    cost = cosine_cost(x, y, mx, my)
    dist = ot_distance(cost, IPOT()(cost, mx, my))
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        exact = ot.emd2(ot.unif(len(ia)), ot.unif(len(ib)), sub)
        # the rounded plan is feasible, so its cost can only be above the optimum
        assert exact - 1e-6 <= float(dist[k]) <= 1.01 * exact, (k, float(dist[k]), exact)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dim", [4, 16, 768])
def test_ipot_marginals_and_padding(seed, dim):
    x, y, mx, my = _problem(seed, b=8, n=12, m=20, dim=dim)
    cost = cosine_cost(x, y, mx, my)
    # defaults: both marginals hold (spec: 1e-4; the rounding leaves only float error)
    _check_marginals(IPOT()(cost, mx, my), mx, my, row_tol=1e-6, col_tol=1e-6)
    # the original algorithm alone: exact rows, columns off by IPOT's single-inner-step error
    raw = IPOT(round_marginals=False)(cost, mx, my)
    _check_marginals(raw, mx, my, row_tol=1e-6, col_tol=3e-3)
    if dim == 4:  # low-dimensional costs: the error the rounding exists for
        col_err = (raw.sum(1) - 1 / my.sum(1, keepdim=True)).abs() * my
        assert col_err.max() > 1e-4


def _random_plans(seed: int, b: int = 5, n: int = 6, m: int = 8):
    """Positive plans with random masks and marginal errors of a few percent, fp64."""
    g = torch.Generator().manual_seed(seed)
    _, _, ma, mb = _problem(seed, b=b, n=n, m=m)
    ma[3] = False  # an example with no valid row: its plan must stay all 0
    joint = ma[:, :, None] & mb[:, None, :]
    r = ma.double() / ma.sum(1, keepdim=True).clamp_min(1)
    c = mb.double() / mb.sum(1, keepdim=True)
    plan = (r[:, :, None] * c[:, None, :]) * (1 + 0.1 * torch.randn(b, n, m, generator=g, dtype=torch.float64)).abs()
    return plan * joint, r, c, ma, mb


@pytest.mark.parametrize("seed", range(3))
def test_round_to_marginals_is_feasible_and_within_altschuler_bound(seed):
    plan, r, c, ma, mb = _random_plans(seed)
    rounded = round_to_marginals(plan.clone(), r, c)
    live = [0, 1, 2, 4]
    _check_marginals(rounded[live], ma[live], mb[live], row_tol=1e-12, col_tol=1e-12)
    assert torch.all(rounded[3] == 0)
    # Altschuler et al. 2017 bound the mass moved: ||G - F||_1 <= 2 (||r(F) - r||_1 + ||c(F) - c||_1)
    bound = 2 * ((plan.sum(2) - r).abs().sum(1) + (plan.sum(1) - c).abs().sum(1))
    moved = (rounded - plan).abs().sum((1, 2))
    assert torch.all(moved <= bound + 1e-12) and moved.max() > 0
    # batched and masked = each example rounded alone on its valid entries
    for k in live:
        ia, ib = ma[k], mb[k]
        alone = round_to_marginals(plan[k][ia][:, ib][None].clone(), r[k][ia][None], c[k][ib][None])[0]
        torch.testing.assert_close(rounded[k][ia][:, ib], alone, atol=1e-15, rtol=0)


def test_round_to_marginals_keeps_an_exact_plan():
    x, y, mx, my = _problem(12, dim=16)
    cost = cosine_cost(x, y, mx, my)
    plan = torch.zeros(cost.shape, dtype=torch.float64)
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        plan[k, ia[:, None], ib[None, :]] = torch.from_numpy(ot.emd(ot.unif(len(ia)), ot.unif(len(ib)), sub))
    r, c = mx.double() / mx.sum(1, keepdim=True), my.double() / my.sum(1, keepdim=True)
    torch.testing.assert_close(round_to_marginals(plan.clone(), r, c), plan, atol=1e-15, rtol=0)


def test_ipot_padding_does_not_influence_valid_part():
    x, y, mx, my = _problem(5)
    cost = cosine_cost(x, y, mx, my)
    joint = mx[:, :, None] & my[:, None, :]
    garbage = cost.masked_fill(~joint, 1e4)  # a solver that let padded cells in would change
    garbage[0, ~mx[0]] = float("nan")
    for solver in (IPOT(), Sinkhorn(epsilon=0.05)):
        plan = solver(cost, mx, my)
        torch.testing.assert_close(solver(garbage, mx, my), plan, atol=0, rtol=0)
        # and each example alone (no batch cross-talk), trimmed to its valid entries
        for k in range(cost.shape[0]):
            sub = cost[k][mx[k]][:, my[k]][None]
            torch.testing.assert_close(solver(sub)[0], plan[k][mx[k]][:, my[k]], atol=1e-6, rtol=1e-5)


def test_ipot_gradient_is_through_the_cost_only():
    x, y, mx, my = _problem(3, dim=32)
    solver = IPOT()
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    dist = wra_distance(solver, xa, ya, mx, my)
    dist.sum().backward()

    plan = solver(cosine_cost(x, y, mx, my), mx, my)
    assert not plan.requires_grad
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    (cosine_cost(xb, yb, mx, my) * plan).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)
    torch.testing.assert_close(ya.grad, yb.grad, atol=0, rtol=0)
    assert xa.grad.abs().sum() > 0
    assert torch.all(xa.grad[~mx] == 0) and torch.all(ya.grad[~my] == 0)


@needs_fixtures("uniter_ref_tiny.pt")
def test_ipot_matches_original_uniter_code():
    ref = torch.load(FIXTURE, weights_only=True)["ipot"]
    mask_t, mask_i = ~ref["txt_pad"], ~ref["img_pad"]  # the original's masks are True on padding
    cfg = {"type": "ipot", "beta": float(ref["beta"]), "iterations": int(ref["iteration"])}
    cfg["inner_steps"] = int(ref["k"])

    def distance(**extra):
        return wra_distance(build({**cfg, **extra}, OT_SOLVERS), ref["txt_emb"], ref["img_emb"], mask_t, mask_i)

    # the original algorithm, unrounded: the original's distances
    torch.testing.assert_close(distance(round_marginals=False), ref["distance"].float(), atol=1e-5, rtol=0)
    # the default (feasible plan): OT distances within the spec's 1e-4 (measured 7.6e-5)
    torch.testing.assert_close(distance(), ref["distance"].float(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("epsilon", [0.1, 0.05])
@pytest.mark.parametrize("seed", range(2))
def test_sinkhorn_matches_pot_log_domain(epsilon, seed):
    x, y, mx, my = _problem(seed, dim=16)
    cost = cosine_cost(x, y, mx, my)
    solver = Sinkhorn(epsilon=epsilon, iterations=10, tol=5e-7, max_iterations=5000)
    plan = solver(cost, mx, my)
    assert 10 < solver.last_iterations < 5000  # the budget rose by itself, and stopped at tol
    dist = ot_distance(cost, plan)
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        a, b = ot.unif(len(ia)), ot.unif(len(ib))
        kw = dict(method="sinkhorn_log", numItermax=100000, stopThr=1e-12)
        ref_dist = float(ot.sinkhorn2(a, b, sub, epsilon, **kw))
        ref_plan = torch.from_numpy(ot.sinkhorn(a, b, sub, epsilon, **kw))
        assert abs(float(dist[k]) - ref_dist) <= 1e-4, (k, float(dist[k]), ref_dist)
        torch.testing.assert_close(plan[k][ia][:, ib].double(), ref_plan, atol=1e-5, rtol=0)
    _check_marginals(plan, mx, my, row_tol=1e-6, col_tol=1e-6)


def test_sinkhorn_small_epsilon_stays_finite_and_near_exact():
    x, y, mx, my = _problem(7, dim=16)
    cost = cosine_cost(x, y, mx, my)
    solver = Sinkhorn(epsilon=1e-3, tol=1e-5, check_every=50, max_iterations=20000)
    plan = solver(cost, mx, my)
    assert torch.isfinite(plan).all()
    _check_marginals(plan, mx, my, row_tol=1e-5, col_tol=1e-6)
    dist = ot_distance(cost, plan)
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        exact = ot.emd2(ot.unif(len(ia)), ot.unif(len(ib)), sub)
        # entropic bias at eps=1e-3 is at most eps * log(n m) above the exact cost
        assert exact - 1e-5 <= float(dist[k]) <= exact + 1e-3 * (1 + torch.tensor(len(ia) * len(ib)).log()), k
    # a fixed iteration budget far from convergence must still be finite
    assert torch.isfinite(Sinkhorn(epsilon=1e-3, iterations=3, tol=None)(cost, mx, my)).all()


def test_sinkhorn_gradient_modes():
    x, y, mx, my = _problem(4, dim=16)
    # detach_plan=True (default): like IPOT, d distance / d cost = plan
    cost = cosine_cost(x, y, mx, my).requires_grad_()
    plan = Sinkhorn(epsilon=0.1)(cost, mx, my)
    assert not plan.requires_grad
    ot_distance(cost, plan).sum().backward()
    torch.testing.assert_close(cost.grad, plan, atol=0, rtol=0)

    # detach_plan=False: the gradient also flows through the plan; compare with POT's torch
    # backend, which differentiates through its own (converged) log-domain iterations
    cost = cosine_cost(x, y, mx, my).double()
    ours = cost.float().requires_grad_()
    ot_distance(ours, Sinkhorn(epsilon=0.1, iterations=500, detach_plan=False)(ours, mx, my)).sum().backward()
    assert torch.isfinite(ours.grad).all() and torch.all(ours.grad[~(mx[:, :, None] & my[:, None, :])] == 0)
    for k in range(cost.shape[0]):
        ia, ib = mx[k].nonzero().flatten(), my[k].nonzero().flatten()
        sub = cost[k][ia][:, ib].clone().requires_grad_()
        a = torch.full((len(ia),), 1.0 / len(ia), dtype=torch.float64)
        b = torch.full((len(ib),), 1.0 / len(ib), dtype=torch.float64)
        ot.sinkhorn2(a, b, sub, 0.1, method="sinkhorn_log", numItermax=500, stopThr=0.0).backward()
        torch.testing.assert_close(ours.grad[k][ia][:, ib].double(), sub.grad, atol=2e-5, rtol=1e-3)


# ---------------------------------------------------------------- exact and robustness


def test_exact_matches_pot_emd():
    x, y, mx, my = _problem(6, dim=16)
    cost = cosine_cost(x, y, mx, my)
    plan = ExactOT()(cost, mx, my)
    _check_marginals(plan, mx, my, row_tol=1e-6, col_tol=1e-6)
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        exact = ot.emd2(ot.unif(len(ia)), ot.unif(len(ib)), sub)
        assert float(ot_distance(cost, plan)[k]) == pytest.approx(exact, abs=1e-6)


def _degenerate_cases():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 8, generator=g)
    y = torch.randn(4, 5, 8, generator=g)
    full_x, full_y = torch.ones(4, 6, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool)
    one_x, one_y = torch.zeros_like(full_x), torch.zeros_like(full_y)
    one_x[:, 2], one_y[:, 4] = True, True
    same = torch.randn(4, 5, 8, generator=g)
    yield "one valid per side", cosine_cost(x, y, one_x, one_y), one_x, one_y
    yield "identical embeddings", cosine_cost(same, same), None, None
    yield "all costs 0", torch.zeros(4, 6, 5), full_x, full_y
    yield "all costs 2", torch.full((4, 6, 5), 2.0), full_x, full_y
    yield "fp16 cost", cosine_cost(x.half(), y.half(), full_x, full_y).half(), full_x, full_y
    yield "bf16 cost", cosine_cost(x, y).bfloat16(), full_x, full_y


@pytest.mark.parametrize(
    "make, row_tol, col_tol",
    [
        (IPOT, 1e-6, 1e-6),  # rounded: both marginals hold
        (lambda: IPOT(round_marginals=False), 1e-6, 3e-3),  # the original: exact rows, inexact columns
        # small beta: columns far from converged in 50 steps, but the rounding still makes it feasible
        (lambda: IPOT(beta=0.05), 1e-6, 1e-6),
        (Sinkhorn, 1e-4, 1e-6),  # exact columns; rows slower on the zero-diagonal cost
        (lambda: Sinkhorn(epsilon=1e-3, iterations=200, tol=None), None, 1e-6),  # not converged, but finite
        (lambda: Sinkhorn(epsilon=1e-3), 1e-4, 1e-6),  # the default budget rises until converged
        (ExactOT, 1e-6, 1e-6),
    ],
    ids=["ipot", "ipot-raw", "ipot-beta0.05", "sinkhorn", "sinkhorn-eps1e-3-fixed", "sinkhorn-eps1e-3", "exact"],
)
def test_no_nan_on_degenerate_problems(make, row_tol, col_tol):
    solver = make()
    for name, cost, ma, mb in _degenerate_cases():
        plan = solver(cost, ma, mb)
        assert plan.dtype == torch.float32, name
        assert torch.isfinite(plan).all(), name
        ma = torch.ones(cost.shape[:2], dtype=torch.bool) if ma is None else ma
        mb = torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool) if mb is None else mb
        _check_marginals(plan, ma, mb, row_tol=row_tol, col_tol=col_tol)
        assert torch.isfinite(ot_distance(cost, plan)).all(), name
    # identical embeddings: the identity matching is free
    same = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    cost = cosine_cost(same, same)
    assert ot_distance(cost, solver(cost)).max() < 0.05


@pytest.mark.parametrize(
    "make",
    [IPOT, lambda: IPOT(round_marginals=False), Sinkhorn, lambda: Sinkhorn(detach_plan=False), ExactOT],
    ids=["ipot", "ipot-raw", "sinkhorn", "sinkhorn-grad", "exact"],
)
def test_empty_example_gets_zero_plan(make):
    x, y, mx, my = _problem(8, b=3)
    mx[1] = False  # no text at all in example 1
    xg = x.clone().requires_grad_()
    cost = cosine_cost(xg, y, mx, my)
    plan = make()(cost, mx, my)
    assert torch.all(plan[1] == 0) and torch.isfinite(plan).all()
    _check_marginals(plan[[0, 2]], mx[[0, 2]], my[[0, 2]], row_tol=2e-3, col_tol=2e-3)
    ot_distance(cost, plan).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_sinkhorn_small_epsilon_default_budget_converges_against_pot():
    """Epsilon 1e-3 with the default iteration count used to return rows off by more than the
    row mass, silently. Now the budget rises until the rows hold (the reported error is the
    plan's own), and the distance is within the entropic bias above POT's exact EMD."""
    x, y, mx, my = _problem(9, dim=16)
    cost = cosine_cost(x, y, mx, my)
    solver = Sinkhorn(epsilon=1e-3)
    plan = solver(cost, mx, my)
    assert solver.last_iterations > solver.iterations
    _check_marginals(plan, mx, my, row_tol=1e-4, col_tol=1e-6)
    n = mx.sum(1, keepdim=True).float()
    true_err = ((plan.sum(2) - 1 / n).abs() * mx).max()
    assert float(solver.last_marginal_error) == pytest.approx(float(true_err), rel=1e-3, abs=1e-7)
    dist = ot_distance(cost, plan)
    for k in range(cost.shape[0]):
        sub, ia, ib = _valid_sub(cost, mx, my, k)
        exact = ot.emd2(ot.unif(len(ia)), ot.unif(len(ib)), sub)
        # a feasible plan costs at least the EMD (less only by the 1e-4 the rows may be off);
        # the entropic one at most eps * log(n m) more
        assert exact - 1e-3 <= float(dist[k]) <= exact + 1e-3 * (1 + float(torch.tensor(len(ia) * len(ib)).log())), k


def test_sinkhorn_warns_when_the_budget_is_not_enough():
    x, y, mx, my = _problem(9, dim=16)
    cost = cosine_cost(x, y, mx, my)
    solver = Sinkhorn(epsilon=1e-3, max_iterations=100)
    with pytest.warns(RuntimeWarning, match=r"not converged after max_iterations=100 at epsilon=0.001: row marginals off by up to"):
        solver(cost, mx, my)
    assert float(solver.last_marginal_error) > 1e-4


@pytest.mark.parametrize("make", [IPOT, Sinkhorn, lambda: Sinkhorn(detach_plan=False), ExactOT],
                         ids=["ipot", "sinkhorn", "sinkhorn-grad", "exact"])
def test_non_finite_padding_never_reaches_valid_gradients(make):
    x, y, mx, my = _problem(10, dim=16)
    clean = []
    for poison in (False, True):
        xg, yg = x.clone(), y.clone()
        if poison:  # whatever padded positions hold (e.g. an overflow in a padded slot)
            xg[~mx], yg[~my] = float("nan"), float("inf")
        xg.requires_grad_(), yg.requires_grad_()
        wra_distance(make(), xg, yg, mx, my).sum().backward()
        clean.append((xg.grad[mx], yg.grad[my]))
        assert torch.isfinite(xg.grad).all() and torch.isfinite(yg.grad).all()
    torch.testing.assert_close(clean[1], clean[0], atol=1e-6, rtol=1e-5)
    # and a cost with NaN on padded cells, straight into a solver and the distance
    cost = cosine_cost(x, y, mx, my).detach()
    poisoned = cost.masked_fill(~(mx[:, :, None] & my[:, None, :]), float("nan")).requires_grad_()
    ot_distance(poisoned, make()(poisoned, mx, my)).sum().backward()
    assert torch.isfinite(poisoned.grad).all()


@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0)], ids=["B=0", "N=0", "M=0"])
@pytest.mark.parametrize("make", [IPOT, Sinkhorn, lambda: Sinkhorn(detach_plan=False), ExactOT],
                         ids=["ipot", "sinkhorn", "sinkhorn-grad", "exact"])
def test_empty_batches(shape, make):
    b, n, m = shape
    x = torch.randn(b, n, 8, requires_grad=True)
    y = torch.randn(b, m, 8, requires_grad=True)
    solver = make()
    d = wra_distance(solver, x, y, torch.ones(b, n, dtype=torch.bool), torch.ones(b, m, dtype=torch.bool))
    assert d.shape == (b,) and torch.all(d == 0)
    assert float(solver.last_marginal_error) == 0.0
    d.sum().backward()
    assert x.grad.shape == x.shape
def test_ipot_runs_small_cpu_problems_on_one_thread_and_restores_the_count():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 5, 6, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = IPOT()(cost)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = IPOT()(cost)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # same ops, same order: the thread count changes nothing else
    assert torch.allclose(one.sum(2), torch.full((4, 5), 1 / 5)) and torch.allclose(one.sum(1), torch.full((4, 6), 1 / 6))
