"""The two-stream encoder (projects/twostream): cross-attention against torch's own
MultiheadAttention, padding invariance in both streams, masked regions hidden from the encoder,
tie targets, its shipped config (the UNITER demo but for the model), and every pretraining task,
both maskers and every OT solver training on it through the trainer, unchanged."""
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from projects.twostream.twostream.model import TwoStreamModel
from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.engine.trainer import Trainer
from vlframe.modules.cross_attention import CrossAttention

CONFIG = os.path.join(ROOT, "configs", "twostream", "pretrain_tiny_synth.yaml")
UNITER_CONFIG = os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml")


def _model(**kw) -> TwoStreamModel:
    torch.manual_seed(0)
    sizes = dict(vocab_size=50, hidden_size=32, num_text_layers=1, num_region_layers=1, num_cross_layers=2,
                 num_heads=4, intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0, img_dim=24)
    return TwoStreamModel(**(sizes | kw)).eval()


def _inputs(seed=0, t=9, k=7, d=24):
    g = torch.Generator().manual_seed(seed)
    text_len, reg_len = torch.tensor([9, 3, 6, 1]), torch.tensor([2, 7, 5, 4])
    text_mask = torch.arange(t)[None] < text_len[:, None]
    img_mask = torch.arange(k)[None] < reg_len[:, None]
    ids = torch.randint(1, 50, (4, t), generator=g) * text_mask
    feat = torch.rand(4, k, d, generator=g) * img_mask[..., None]
    pos = torch.rand(4, k, 7, generator=g) * img_mask[..., None]
    return ids, text_mask, feat, pos, img_mask


def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = CrossAttention(hidden_size=32, num_heads=4, dropout=0.0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    x, ctx = torch.randn(3, 5, 32), torch.randn(3, 6, 32)
    ctx_mask = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    expected, _ = ref(x, ctx, ctx, key_padding_mask=~ctx_mask, need_weights=False)
    assert (ours(x, ctx, ctx_mask) - expected).abs().max() < 1e-5
    # No real context (states of an empty stream are NaN after its self-attention): the block
    # adds nothing there (the stream keeps its residual) and the other examples are untouched.
    ctx_mask[1] = False
    ctx[1] = float("nan")
    got = ours(x, ctx, ctx_mask)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert (got[[0, 2]] - expected[[0, 2]]).abs().max() < 1e-5


def test_shared_cross_attention_serves_both_directions():
    # LXMERT's layout: one cross-attention sublayer for text->regions and regions->text. It must
    # compute what two separate sublayers holding the same weights compute, with one copy of them.
    shared, separate = _model(shared_cross=True), _model(shared_cross=False)
    with torch.no_grad():
        for name, p in separate.named_parameters():
            p.copy_(shared.get_parameter(name.replace(".b_cross.", ".a_cross.")))
    for layer in shared.cross_layers:
        assert layer.a_cross is layer.b_cross
    one = sum(p.numel() for p in separate.cross_layers[0].a_cross.parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(separate) - n(shared) == one * len(shared.cross_layers)
    ids, tm, feat, pos, im = _inputs()
    with torch.no_grad():
        a, b = shared.encode(ids, tm, feat, pos, im), separate.encode(ids, tm, feat, pos, im)
    for field in ("text", "regions", "pooled"):
        assert (getattr(a, field) - getattr(b, field)).abs().max() < 1e-6, field
    # Different weights per direction do change the outputs (the comparison can fail).
    with torch.no_grad():
        separate.cross_layers[0].b_cross.attn.value.weight.add_(torch.randn(32, 32) * 0.1)
        c = separate.encode(ids, tm, feat, pos, im)
    assert (c.regions - a.regions)[im].abs().max() > 1e-3


def test_padding_invariance_in_both_streams():
    m = _model()
    ids, tm, feat, pos, im = _inputs()
    with torch.no_grad():
        ref = m.encode(ids, tm, feat, pos, im)
        # 3 more text positions and 4 more regions of padding, holding junk: nothing may change.
        g = torch.Generator().manual_seed(1)
        pad_ids = torch.cat([ids, torch.randint(1, 50, (4, 3), generator=g)], 1)
        pad_feat = torch.cat([feat, torch.randn(4, 4, 24, generator=g)], 1)
        pad_pos = torch.cat([pos, torch.rand(4, 4, 7, generator=g)], 1)
        pad_tm = torch.cat([tm, torch.zeros(4, 3, dtype=torch.bool)], 1)
        pad_im = torch.cat([im, torch.zeros(4, 4, dtype=torch.bool)], 1)
        out = m.encode(pad_ids, pad_tm, pad_feat, pad_pos, pad_im)
    assert (out.text[:, :9] - ref.text)[tm].abs().max() < 1e-5
    assert (out.regions[:, :7] - ref.regions)[im].abs().max() < 1e-5
    assert (out.pooled - ref.pooled).abs().max() < 1e-5
    assert out.sequence is None and torch.equal(out.text_mask, pad_tm) and torch.equal(out.region_mask, pad_im)


def test_streams_meet_only_in_cross_layers():
    ids, tm, feat, pos, im = _inputs()
    other = feat.clone()
    other[:, 0] += 1.0  # every example's first region changes
    for cross, text_moves in ((2, True), (0, False)):
        m = _model(num_cross_layers=cross)
        with torch.no_grad():
            a, b = m.encode(ids, tm, feat, pos, im), m.encode(ids, tm, other, pos, im)
        moved = (a.text - b.text)[tm].abs().max().item()
        assert (moved > 1e-3) == text_moves, (cross, moved)
        assert (a.regions - b.regions)[im].abs().max() > 1e-3


def test_masked_regions_do_not_reach_the_output():
    m = _model()
    ids, tm, feat, pos, im = _inputs()
    masked = torch.zeros_like(im)
    masked[0, 1] = masked[1, 3] = masked[2, 0] = True
    changed = feat.clone()
    changed[masked] = torch.randn(int(masked.sum()), 24) * 5
    with torch.no_grad():
        a = m.encode(ids, tm, feat, pos, im, img_masked=masked)
        b = m.encode(ids, tm, changed, pos, im, img_masked=masked)
        # The same change without the mask flags does move the outputs (the test can fail).
        c = m.encode(ids, tm, changed, pos, im, img_masked=torch.zeros_like(im))
    for field in ("text", "regions", "pooled"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.pooled - c.pooled).abs().max() > 1e-4
    # The learned mask vector stands in for the feature: training it moves masked regions' states.
    with torch.no_grad():
        m.region_embed.mask_embedding.add_(1.0)
        d = m.encode(ids, tm, feat, pos, im, img_masked=masked)
    assert (d.regions[0, 1] - a.regions[0, 1]).abs().max() > 1e-3


def test_spec_and_tie_targets():
    m = _model(vocab_size=60, hidden_size=48, img_dim=20)
    assert (m.spec.text_dim, m.spec.region_dim, m.spec.pooled_dim, m.spec.vocab_size, m.spec.feat_dim) == (48, 48, 48, 60, 20)
    t = m.tie_targets()
    assert set(t) == {"word_embeddings", "region_projection"}
    assert isinstance(t["word_embeddings"], torch.nn.Embedding) and t["word_embeddings"].weight.shape == (60, 48)
    assert isinstance(t["region_projection"], torch.nn.Linear) and t["region_projection"].weight.shape == (48, 20)
    # They are the modules the model reads its inputs with, not copies.
    ids, tm, feat, pos, im = _inputs(d=20)
    ids = ids % 60
    out = m.encode(ids, tm, feat, pos, im)
    out.pooled.sum().backward()
    assert t["word_embeddings"].weight.grad is not None and t["region_projection"].weight.grad is not None


def test_shipped_config_is_the_uniter_demo_but_for_the_model():
    ours = OmegaConf.to_container(load_and_validate(CONFIG), resolve=True)
    uniter = OmegaConf.to_container(load_and_validate(UNITER_CONFIG), resolve=True)
    differ = {k for k in set(ours) | set(uniter) if ours.get(k) != uniter.get(k)}
    assert differ == {"model", "custom_imports"}, differ
    assert ours["model"]["type"] == "TwoStreamModel" and ours["custom_imports"] == ["projects.twostream"]
    # Comparable in size with the UNITER tiny (both mostly the word embeddings).
    from vlframe.registry import MODELS, build

    counts = {}
    for name, cfg in (("twostream", ours), ("uniter", uniter)):
        counts[name] = sum(p.numel() for p in build(cfg["model"], MODELS, where="model").parameters())
    assert 1.0 < counts["twostream"] / counts["uniter"] < 1.2, counts


def _two_step_overrides(cache: str) -> list[str]:
    # tiny_overrides shrinks a UNITER; the two-stream model names its depth per stream.
    tiny = [o for o in tiny_overrides(cache) if not o.startswith("model.num_layers=")]
    return tiny + ["model.num_text_layers=1", "model.num_region_layers=1", "model.num_cross_layers=1",
                   "train.warmup_steps=1", "train.val_interval=100"]


# Two runs cover every pretraining task on the model, each with both maskers across the runs, and
# the three OT solvers in ITM's WRA and the WRA task. train.phases run each task 2 steps in turn.
CASES = {
    "conditional-ipot-sinkhorn": ("conditional", "joint", "{type: ipot, beta: 0.5, iterations: 20}",
                                  "{type: sinkhorn, epsilon: 0.05, iterations: 20}"),
    "joint-exact-ipot": ("joint", "conditional", "{type: exact}", "{type: ipot, beta: 0.5, iterations: 20}"),
}
TASKS = ("mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_pretraining_task_trains_two_steps(case, synth_cache, tmp_path):
    first, second, itm_solver, wra_solver = CASES[case]
    mask = lambda kind: f"{{type: {kind}, text_prob: 0.15, region_prob: 0.15}}"  # noqa: E731
    tasks = (
        "tasks={"
        f"mlm: {{type: mlm, masker: {mask(first)}}}, mrfr: {{type: mrfr, masker: {mask(first)}}}, "
        f"mrc: {{type: mrc, masker: {mask(second)}}}, mrc_kl: {{type: mrc_kl, masker: {mask(second)}}}, "
        f"itm: {{type: itm, wra_weight: 1.0, ot_solver: {itm_solver}, "
        "metrics: [{type: accuracy, name: itm_acc}, {type: ot_distance}]}, "
        f"wra: {{type: wra, ot_solver: {wra_solver}}}"
        "}"
    )
    phases = "train.phases=[" + ", ".join(f"{{until_step: {2 * i + 2}, mix: {{{t}: 1}}}}" for i, t in enumerate(TASKS)) + "]"
    cfg = load_and_validate(CONFIG, _two_step_overrides(synth_cache) + [tasks, phases, f"train.max_steps={2 * len(TASKS)}"])
    trainer = Trainer(cfg, work_dir=str(tmp_path))
    assert type(trainer.model.encoder).__name__ == "TwoStreamModel"
    metrics = trainer.train()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    for i, name in enumerate(TASKS):
        steps = [r for r in records if r["step"] in (2 * i + 1, 2 * i + 2) and any(k.startswith("train/") for k in r)]
        assert [r.get(f"train/{name}/steps") for r in steps] == [1.0, 1.0], (name, steps)
        losses = [r[f"train/{name}/loss"] for r in steps]
        assert all(abs(v) < 1e3 for v in losses), (name, losses)  # finite (WRA's contrast may be < 0)
        assert any(k.startswith(f"val/{name}/") for k in metrics), name
    assert all(v == v for v in metrics.values()), f"NaN metric: {metrics}"
