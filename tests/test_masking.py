"""Masking: rates over many draws, at-least-one, specials and padding never masked,
conditional masks one modality, joint masks both, BERT's 80/10/10 corruption."""
import torch

from vlframe.masking import IGNORE_INDEX, ConditionalMasker, JointMasker, replace_masked_tokens
from vlframe.registry import MASKERS, build

CLS, SEP, MASK = 101, 102, 103


def _batch(b=64, t=30, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tl = torch.randint(3, t + 1, (b,), generator=g)
    rl = torch.randint(1, k + 1, (b,), generator=g)
    text_mask = torch.arange(t)[None] < tl[:, None]
    ids = torch.randint(1000, 30000, (b, t), generator=g) * text_mask
    ids[:, 0] = CLS
    ids[torch.arange(b), tl - 1] = SEP
    maskable = text_mask & (ids != CLS) & (ids != SEP)
    img_mask = torch.arange(k)[None] < rl[:, None]
    return ids, text_mask, maskable, img_mask


def test_registry_builds_both():
    assert isinstance(build({"type": "conditional", "text_prob": 0.2}, MASKERS), ConditionalMasker)
    assert isinstance(build({"type": "joint"}, MASKERS), JointMasker)


def test_rates_at_least_one_and_never_padding_or_specials():
    masker = ConditionalMasker(text_prob=0.15, region_prob=0.15)
    g = torch.Generator().manual_seed(1)
    text_hits = text_total = reg_hits = reg_total = 0
    for s in range(200):
        ids, text_mask, maskable, img_mask = _batch(seed=s)
        d = masker(target="text", text_maskable=maskable, region_maskable=img_mask, generator=g)
        assert not (d.text & ~maskable).any(), "masked padding or [CLS]/[SEP]"
        assert d.text.any(1)[maskable.any(1)].all(), "an example with no masked word"
        assert not d.regions.any(), "conditional text masking touched regions"
        text_hits += int(d.text.sum())
        text_total += int(maskable.sum())
        d = masker(target="regions", text_maskable=maskable, region_maskable=img_mask, generator=g)
        assert not (d.regions & ~img_mask).any(), "masked a padded region"
        assert d.regions.any(1).all(), "an example with no masked region"
        assert not d.text.any(), "conditional region masking touched words"
        reg_hits += int(d.regions.sum())
        reg_total += int(img_mask.sum())
    # The at-least-one rule adds a little mass on short examples: expected rate slightly above 0.15.
    assert 0.15 <= text_hits / text_total < 0.17, text_hits / text_total
    assert 0.15 <= reg_hits / reg_total < 0.17, reg_hits / reg_total


def test_joint_masks_both_modalities_in_one_batch():
    masker = JointMasker(text_prob=0.15, region_prob=0.15)
    g = torch.Generator().manual_seed(2)
    ids, text_mask, maskable, img_mask = _batch()
    for target in ("text", "regions"):
        d = masker(target=target, text_maskable=maskable, region_maskable=img_mask, generator=g)
        assert d.text.any(1)[maskable.any(1)].all() and d.regions.any(1).all()
        assert not (d.text & ~maskable).any() and not (d.regions & ~img_mask).any()


def test_80_10_10_corruption():
    g = torch.Generator().manual_seed(3)
    n_mask = n_rand = n_keep = 0
    for s in range(50):
        ids, text_mask, maskable, img_mask = _batch(seed=100 + s)
        chosen = ConditionalMasker()(target="text", text_maskable=maskable, region_maskable=img_mask, generator=g).text
        new, labels = replace_masked_tokens(ids, chosen, mask_id=MASK, random_range=(999, 30522), generator=g)
        assert torch.equal(labels[chosen], ids[chosen])
        assert (labels[~chosen] == IGNORE_INDEX).all()
        assert torch.equal(new[~chosen], ids[~chosen]), "an unmasked word changed"
        n_mask += int((new[chosen] == MASK).sum())
        same = new[chosen] == ids[chosen]
        n_keep += int(same.sum())
        n_rand += int(((new[chosen] != MASK) & ~same).sum())
        assert ((new[chosen] >= 999) | (new[chosen] == MASK) | same).all()
    total = n_mask + n_rand + n_keep
    assert abs(n_mask / total - 0.8) < 0.02
    assert abs(n_rand / total - 0.1) < 0.015
    assert abs(n_keep / total - 0.1) < 0.015
