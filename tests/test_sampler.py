"""TokenBudgetSampler: coverage, budget, determinism, resume, DDP dealing, budget use."""
from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.original_sampler import original_uniter_batches
from vlframe.data.sampler import TokenBudgetSampler, padded_cost
from vlframe.registry import SAMPLERS, build


def coco_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(8, 61, n), rng.integers(10, 101, n)


def flat(batches):
    return [i for b in batches for i in b]


def assert_within_budget(sampler: TokenBudgetSampler, batches) -> None:
    for b in batches:
        cost = padded_cost(b, sampler.lengths, sampler.text_lengths, sampler.region_lengths)
        if cost > sampler.budget:
            assert len(b) == 1, f"batch of {len(b)} costs {cost} > {sampler.budget}"


@pytest.mark.parametrize("parts", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_and_within_budget(parts, shuffle):
    t, r = coco_like(3000)
    kw = dict(text_lengths=t, region_lengths=r) if parts else dict(lengths=t + r)
    s = TokenBudgetSampler(budget=2048, bucket_size=500, shuffle=shuffle, seed=3, **kw)
    batches = list(s)
    assert sorted(flat(batches)) == list(range(3000))
    assert len(batches) == len(s)
    assert_within_budget(s, batches)
    # Greedy fill: a batch is closed only when its successor in sorted order would not fit.
    assert s.stats()["budget_use"] > 0.8


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200),
    budget=st.integers(1, 1000),
    bucket=st.integers(1, 64),
    cap=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 2**31),
)
def test_property_cover_budget_cap(lengths, budget, bucket, cap, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = TokenBudgetSampler(lengths=lengths, budget=budget, bucket_size=bucket, seed=seed, max_batch_examples=cap)
    batches = list(s)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    assert_within_budget(s, batches)
    if cap is not None:
        assert max(len(b) for b in batches) <= cap
    assert s.num_oversized == sum(x > budget for x in lengths)


def test_running_max_is_reset_per_batch():
    # Sorted bucket [1]*10 + [100]: a batch of the ten 1s must not be sized by the 100.
    lengths = [100] + [1] * 10
    s = TokenBudgetSampler(lengths=lengths, budget=100, bucket_size=64, shuffle=False)
    assert list(s) == [list(range(1, 11)), [0]]


def test_oversized_example_gets_its_own_batch_and_a_warning():
    lengths = [5, 5, 500, 5, 5]
    with pytest.warns(UserWarning, match=r"1 example\(s\).*indices 2"):
        s = TokenBudgetSampler(lengths=lengths, budget=20, bucket_size=8, shuffle=False)
    assert s.num_oversized == 1
    batches = list(s)
    assert [2] in batches
    assert sorted(flat(batches)) == list(range(5))


def test_exact_part_cost():
    # text 2/10, regions 10/2: joint lengths are 12 and 12, but padded parts cost 2 * (10 + 10) = 40.
    s = TokenBudgetSampler(text_lengths=[2, 10], region_lengths=[10, 2], budget=39, bucket_size=8, shuffle=False)
    assert sorted(map(sorted, s)) == [[0], [1]]
    s = TokenBudgetSampler(text_lengths=[2, 10], region_lengths=[10, 2], budget=40, bucket_size=8, shuffle=False)
    assert [sorted(b) for b in s] == [[0, 1]]
    s = TokenBudgetSampler(lengths=[12, 12], budget=24, bucket_size=8, shuffle=False)
    assert [sorted(b) for b in s] == [[0, 1]]


def test_determinism_and_epochs():
    t, r = coco_like(2000, seed=1)
    a = TokenBudgetSampler(lengths=t + r, budget=1500, bucket_size=400, seed=7)
    b = TokenBudgetSampler(lengths=t + r, budget=1500, bucket_size=400, seed=7)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = list(a)
    assert e1 == list(b)
    assert e1 != e0
    assert sorted(flat(e1)) == sorted(flat(e0))
    c = TokenBudgetSampler(lengths=t + r, budget=1500, bucket_size=400, seed=8)
    assert list(c) != e0
    # An epoch's plan does not depend on which epochs were iterated before.
    d = TokenBudgetSampler(lengths=t + r, budget=1500, bucket_size=400, seed=7)
    d.set_epoch(1)
    assert list(d) == e1


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_resume_mid_epoch(k):
    t, r = coco_like(2000, seed=2)
    kw = dict(lengths=t + r, budget=1200, bucket_size=300, seed=11)
    s = TokenBudgetSampler(**kw)
    s.set_epoch(3)
    it = iter(s)
    seen = [next(it) for _ in range(k)]
    state = s.state_dict()
    assert state == {"epoch": 3, "batches_done": k, "seed": 11}
    rest = list(it)

    fresh = TokenBudgetSampler(**{**kw, "seed": 0})  # the saved seed must win
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # a trainer re-entering the saved epoch keeps the pending skip
    assert len(fresh) == k + len(rest)
    assert list(fresh) == rest
    assert fresh.state_dict()["batches_done"] == k + len(rest)
    # The skip applies once: the next pass over the same epoch is complete again.
    assert list(fresh) == seen + rest
    # Moving to another epoch drops a pending skip.
    other = TokenBudgetSampler(**kw)
    other.load_state_dict(state)
    other.set_epoch(4)
    assert sorted(flat(other)) == list(range(2000))


def test_state_dict_override_for_prefetching_loaders():
    s = TokenBudgetSampler(lengths=[3] * 100, budget=30, bucket_size=50, seed=0)
    it = iter(s)
    batches = [next(it) for _ in range(6)]  # a loader pulled 6, the trainer consumed 4
    state = s.state_dict(batches_done=4)
    t = TokenBudgetSampler(lengths=[3] * 100, budget=30, bucket_size=50, seed=0)
    t.load_state_dict(state)
    assert list(t)[:2] == batches[4:6]


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_dealing(replicas, drop_last):
    t, r = coco_like(2500, seed=4)
    kw = dict(lengths=t + r, budget=1000, bucket_size=300, seed=5, drop_last=drop_last)
    glob = list(TokenBudgetSampler(**kw))
    ranks = [TokenBudgetSampler(**kw, num_replicas=replicas, rank=i) for i in range(replicas)]
    per_rank = [list(s) for s in ranks]
    assert len({len(s) for s in ranks}) == 1
    assert all(len(b) == len(ranks[0]) for b in per_rank)
    dealt = [per_rank[i % replicas][i // replicas] for i in range(replicas * len(ranks[0]))]
    if drop_last:
        assert dealt == glob[: len(glob) - len(glob) % replicas]
        counts = collections.Counter(flat(dealt))
        assert max(counts.values()) == 1  # disjoint
        dropped = set(flat(glob[len(dealt):]))
        assert set(counts) | dropped == set(range(2500))
    else:
        pad = (-len(glob)) % replicas
        assert dealt == glob + glob[:pad]  # the only repeats are the documented wrap-around
        assert set(flat(dealt)) == set(range(2500))
        counts = collections.Counter(flat(dealt))
        assert {i for i, c in counts.items() if c > 1} == set(flat(glob[:pad]))
    # Ranks draw different batches.
    assert per_rank[0] != per_rank[1]


@pytest.mark.parametrize("replicas", [2, 3])
def test_uneven_dealing_for_evaluation(replicas):
    """even_ranks=False: every batch exactly once over the ranks, the first ones one more."""
    t, r = coco_like(777, seed=1)  # 77 batches
    kw = dict(lengths=t + r, budget=1000, bucket_size=300, seed=2, shuffle=False)
    glob = list(TokenBudgetSampler(**kw))
    assert len(glob) % replicas, "want a count the ranks cannot share evenly"
    per_rank = [list(TokenBudgetSampler(**kw, num_replicas=replicas, rank=i, even_ranks=False)) for i in range(replicas)]
    assert [len(b) for b in per_rank] == [len(glob[i::replicas]) for i in range(replicas)]
    assert sorted(tuple(b) for rank in per_rank for b in rank) == sorted(map(tuple, glob))
    with pytest.raises(ValueError, match="contradicts even_ranks=False"):
        TokenBudgetSampler(**kw, num_replicas=replicas, rank=0, even_ranks=False, drop_last=True)


def test_defaults_from_torch_distributed(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        s = TokenBudgetSampler(lengths=[4] * 10, budget=8)
        assert (s.num_replicas, s.rank) == (1, 0)
    finally:
        torch.distributed.destroy_process_group()


def test_budget_use_coco_like():
    t, r = coco_like(20000, seed=0)
    s = TokenBudgetSampler(lengths=t + r, budget=10240, bucket_size=8192, seed=0)
    st_ = s.stats()
    assert st_["budget_use"] >= 0.95, st_
    assert st_["padding_ratio"] <= 0.03, st_
    # Exact two-part cost: more padding is unavoidable, the two-level sort keeps it low.
    p = TokenBudgetSampler(text_lengths=t, region_lengths=r, budget=10240, bucket_size=8192, seed=0)
    assert p.stats()["budget_use"] >= 0.87, p.stats()
    assert_within_budget(p, list(p))


def test_original_simulation_has_the_bug():
    t, r = coco_like(20000, seed=0)
    lengths = t + r
    batches = original_uniter_batches(lengths, 10240, seed=0)
    assert sorted(flat(batches)) == list(range(20000))
    # The running max reaches the data's longest example (160) and stays: 10240 // 160 = 64.
    sizes = collections.Counter(len(b) for b in batches)
    assert sizes.most_common(1)[0][0] == 64
    assert max(sizes) == 64
    use = sum(int(lengths[b].sum()) for b in batches) / (len(batches) * 10240)
    ours = TokenBudgetSampler(lengths=lengths, budget=10240, bucket_size=8192, seed=0).stats()["budget_use"]
    assert use < 0.6 < 0.95 <= ours


def test_registry_build():
    s = build({"type": "token_budget", "lengths": [3, 4, 5], "budget": 10, "seed": 1}, SAMPLERS)
    assert isinstance(s, TokenBudgetSampler)
    assert sorted(flat(s)) == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[], budget=10), "lengths is empty"),
        (dict(lengths=[1, -2], budget=10), r"lengths\[1\] = -2"),
        (dict(lengths=[1, 2], budget=0), "budget"),
        (dict(text_lengths=[1, 2], budget=10), "both text_lengths and region_lengths"),
        (dict(text_lengths=[1, 2], region_lengths=[1], budget=10), "region_lengths has 1"),
        (dict(lengths=[2, 9], text_lengths=[1, 2], region_lengths=[1, 2], budget=10), "first mismatch at index 1"),
        (dict(lengths=[1, 2], budget=10, num_replicas=2, rank=2), "invalid rank"),
        (dict(budget=10), "lengths is required"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenBudgetSampler(**kwargs)


def test_bad_state_dict():
    s = TokenBudgetSampler(lengths=[1, 2], budget=10)
    with pytest.raises(KeyError, match="batches_done"):
        s.load_state_dict({"epoch": 0, "seed": 0})
