"""The encoder's packed (no padding) path against the padded one, activation checkpointing,
torch.compile with bucketed lengths, and the sampler's real-unit budget.

torch 2.13 runs SDPA on jagged nested tensors on the CPU (math kernel), so the packed path itself
is compared here, forward and backward, with the padded path on the same weights."""
import warnings

import numpy as np
import pytest
import torch

from projects.uniter.uniter.model import UniterModel
from vlframe.data.sampler import TokenBudgetSampler
from vlframe.modules.transformer import TransformerEncoder

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, img_dim=24,
            hidden_dropout=0.0, attention_dropout=0.0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    text_len, reg_len = torch.tensor([9, 3, 6, 1, 5]), torch.tensor([2, 7, 5, 4, 0])
    b, t, k = len(text_len), 9, 7
    text_mask = torch.arange(t)[None] < text_len[:, None]
    img_mask = torch.arange(k)[None] < reg_len[:, None]
    ids = torch.randint(1, 50, (b, t), generator=g) * text_mask
    # padding holds garbage on purpose: neither path may read it
    feat = torch.rand(b, k, 24, generator=g) + 5 * ~img_mask[..., None]
    pos = torch.rand(b, k, 7, generator=g)
    return ids, text_mask, feat, pos, img_mask


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model.encode(*inputs)
    tm, im = inputs[1], inputs[4]
    # a loss over real positions only, touching text, regions and the pooled output
    loss = (out.text[tm] ** 2).sum() + out.regions[im].sin().sum() + out.pooled.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_padded_forward_and_backward(checkpointing):
    torch.manual_seed(0)
    padded = UniterModel(**TINY, varlen="never", gradient_checkpointing=checkpointing).train()
    packed = UniterModel(**TINY, varlen="always", gradient_checkpointing=checkpointing).train()
    packed.load_state_dict(padded.state_dict())
    assert not padded.runs_real_units("cpu") and packed.runs_real_units("cpu")
    assert UniterModel(**TINY).runs_real_units("cuda") and not UniterModel(**TINY).runs_real_units("cpu")
    inputs = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU nested-tensor kernel warns about its fallback
        a, ga = _run(padded, inputs)
        b, gb = _run(packed, inputs)
    tm, im = inputs[1], inputs[4]
    assert (a.text - b.text)[tm].abs().max() < 1e-5
    assert (a.regions - b.regions)[im].abs().max() < 1e-5
    assert (a.pooled - b.pooled).abs().max() < 1e-5
    assert (a.sequence - b.sequence)[a.sequence_mask].abs().max() < 1e-5
    assert torch.equal(a.sequence_mask, b.sequence_mask)
    assert not b.sequence[~b.sequence_mask].any()  # the packed path writes zeros on padding
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:  # gradients sum over many positions: 1e-5 relative to their scale
        scale = max(1.0, float(ga[name].abs().max()))
        assert (ga[name] - gb[name]).abs().max() < 1e-5 * scale, name


def test_gradient_checkpointing_same_gradients_and_recomputes():
    torch.manual_seed(0)
    plain = UniterModel(**TINY).train()
    ckpt = UniterModel(**TINY, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.encoder.layers[0].ffn_in.register_forward_hook(lambda *a: calls.append(1))
    inputs = _inputs(1)
    _, g0 = _run(plain, inputs)
    calls.clear()
    _, g1 = _run(ckpt, inputs)
    assert len(calls) == 2  # forward, then the recomputation in backward
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=0), name


def test_compile_buckets_bound_recompiles():
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, hidden_dropout=0.0,
              attention_dropout=0.0)
    eager = TransformerEncoder(**kw)
    comp = TransformerEncoder(**kw, compile=True, compile_backend="aot_eager", length_multiple=8)
    comp.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 7), (4, 7), (5, 6), (2, 12), (6, 13), (3, 5), (7, 16)]  # lengths in buckets 8 and 16
    for b, n in shapes:
        x = torch.randn(b, n, 32, generator=g)
        mask = torch.arange(n)[None] < torch.randint(1, n + 1, (b,), generator=g)[:, None]
        y = comp(x, mask)
        assert y.shape == (b, n, 32)
        assert (y - eager(x, mask))[mask].abs().max() < 1e-5
    # one graph per length bucket; the batch size is symbolic (7 shapes, 2 buckets)
    assert comp.compiled_graphs == 2


def test_eager_encoder_does_not_pad_to_length_multiple():
    # length_multiple buckets lengths for torch.compile only; eager runs the sequence as given
    enc = TransformerEncoder(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, varlen="never",
                             length_multiple=8)
    seen = []
    enc.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    enc(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    assert seen == [5]


def test_encoder_rejects_bad_options():
    with pytest.raises(ValueError, match="varlen must be one of"):
        TransformerEncoder(varlen="yes")
    with pytest.raises(ValueError, match="length_multiple must be an integer >= 1"):
        TransformerEncoder(length_multiple=0)


def test_real_unit_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 140, 3000)
    budget = 2048
    real = TokenBudgetSampler(lengths=lengths, budget=budget, bucket_size=500, seed=0, cost="real")
    padded = TokenBudgetSampler(lengths=lengths, budget=budget, bucket_size=500, seed=0)
    rb = real.batches()
    assert sorted(i for b in rb for i in b) == list(range(len(lengths)))
    sums = [int(lengths[b].sum()) for b in rb]
    assert max(sums) <= budget
    # greedy on real units: no batch could take the next example of its bucket order
    assert np.mean(sums) > 0.95 * budget and real.stats()["budget_use"] > padded.stats()["budget_use"]
    # a padded-cost batch of the same examples would be over budget for some batches
    assert max(len(b) * int(lengths[b].max()) for b in rb) > budget
    with pytest.raises(ValueError, match="cost must be 'padded' or 'real'"):
        TokenBudgetSampler(lengths=lengths, budget=budget, cost="tokens")


def test_task_stream_counts_real_units_for_a_packed_model():
    from vlframe.engine.data import TaskStream
    from vlframe.tasks.base import Task

    class Lengths:
        def __init__(self):
            self.items = list(np.random.default_rng(0).integers(5, 40, 200))

        def lengths(self):
            return self.items

        def __len__(self):
            return len(self.items)

    cfg = {"type": "token_budget", "budget": 256, "bucket_size": 64}
    ds = Lengths()
    real = TaskStream(dataset=ds, task=Task(), sampler_cfg=cfg, seed=0, shuffle=True, num_workers=0,
                      pin_memory=False, real_units=True)
    plain = TaskStream(dataset=ds, task=Task(), sampler_cfg=cfg, seed=0, shuffle=True, num_workers=0,
                       pin_memory=False)
    assert real.sampler.cost == "real" and plain.sampler.cost == "padded"
    assert len(real) < len(plain)  # fewer, fuller batches
    explicit = TaskStream(dataset=ds, task=Task(), sampler_cfg={**cfg, "cost": "padded"}, seed=0, shuffle=True,
                          num_workers=0, pin_memory=False, real_units=True)
    assert explicit.sampler.cost == "padded"  # the config's explicit choice wins
