"""UNITER's backbone: parameter counts against the paper, the text path against transformers'
BertModel with real weights, and packing against a naive padded implementation."""
import pytest
import torch

from projects.uniter.uniter.model import UniterModel
from vlframe.data.tokenizer import build_tokenizer, minilm_dir


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fvcore_count(module: torch.nn.Module, *prefixes: str) -> int:
    from fvcore.nn import parameter_count

    counts = parameter_count(module)  # per module prefix; "" is the whole model
    return sum(counts[p] for p in prefixes)


@pytest.mark.parametrize(
    "size,kwargs,expected",
    [
        # Paper, Table 1/Sec. 4: UNITER-base 86M, UNITER-large 303M parameters. Counted here: the
        # transformer encoder (all layers) plus the pooler; word embeddings excluded (the paper's
        # figures exclude them), and so are the other embedders, which add ~1.2M/1.6M.
        ("base", dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072), 85_645_056),
        ("large", dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096), 303_358_976),
    ],
)
def test_parameter_count_matches_paper(size, kwargs, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        m = UniterModel(vocab_size=28996, img_dim=2048, **kwargs)
    counted = _fvcore_count(m, "encoder", "pooler")
    assert counted == expected == _count(m.encoder) + _count(m.pooler)
    assert round(counted / 1e6, 1) == {"base": 85.6, "large": 303.4}[size]
    if size == "base":
        # The whole backbone equals the original's UniterModel (109,898,752 with word embeddings,
        # reference notes) less one row: we keep the mask embedding as one vector, not a 2-row
        # table whose row 0 is forced to zero.
        assert _fvcore_count(m, "") == 109_898_752 - 2048


def _minilm_reference():
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_dir(), local_files_only=True, attn_implementation="eager").eval()


def _assert_text_path_equals_bert(ours: UniterModel, ref) -> None:
    tok = build_tokenizer()
    enc = tok(
        ["a small red dog to the left of a blue car.", "two cups.", "there is a large green bus above a yellow ball"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    d = ours.spec.feat_dim
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=enc["attention_mask"])
        empty = torch.zeros(ids.shape[0], 0, d)
        o = ours.eval().encode(ids, mask, empty, torch.zeros(ids.shape[0], 0, 7), torch.zeros(ids.shape[0], 0, dtype=torch.bool))
    diff = (o.text - r.last_hidden_state)[mask].abs().max().item()
    assert diff < 1e-5, diff
    assert (o.pooled - r.pooler_output).abs().max().item() < 1e-5
    # The weights really came from the checkpoint (not a coincidence of two random inits).
    assert torch.equal(ours.tie_targets()["word_embeddings"].weight, ref.embeddings.word_embeddings.weight)


def test_text_path_equals_bert():
    """MiniLM (a real 6-layer BERT) loaded into UNITER's text embedder + encoder + pooler."""
    from transformers import BertConfig

    torch.manual_seed(0)
    ref = _minilm_reference()
    cfg: BertConfig = ref.config
    ours = UniterModel(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        img_dim=16,
        pretrained=minilm_dir(),
    ).eval()
    _assert_text_path_equals_bert(ours, ref)
    # The report: the whole text side and encoder copied, exactly the image side fresh.
    report = ours.init_report
    assert len(report.copied) == len(ref.state_dict()) - sum(k.endswith("position_ids") for k in ref.state_dict())
    assert {"text_embed.word.weight", "type_embed.weight", "encoder.layers.5.ffn_norm.bias", "pooler.weight"} <= set(report.copied)
    assert report.initialised and all(k.startswith("img_embed.") for k in report.initialised)
    assert report.unused == []
    assert "newly initialised: img_embed.feat_proj.weight" in report.format()


def test_pretrained_of_another_hidden_size_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model: embeddings\.LayerNorm\.bias \(-> text_embed\.norm\.bias\): "
                       r"checkpoint shape \(384,\) != model shape \(128,\)$"):
        UniterModel(hidden_size=128, num_layers=6, num_heads=4, intermediate_size=512, img_dim=16, pretrained=minilm_dir())


MINILM_SIZE = ["model.hidden_size=384", "model.num_layers=6", "model.num_heads=12", "model.intermediate_size=1536"]


@pytest.mark.slow
def test_trainer_init_from_bert_checkpoint(synth_cache, tmp_path, capsys):
    """``train.init_from`` with a BERT checkpoint in transformers' layout (the L2 setting): the
    trainer reaches it through the model's load_pretrained, prints and keeps the report."""
    from tests.conftest import tiny_overrides
    from vlframe.config import load_and_validate
    from vlframe.engine.trainer import Trainer

    over = tiny_overrides(synth_cache) + MINILM_SIZE + [
        "train.max_steps=0", "data.val=null", f"train.init_from={minilm_dir()}"]
    trainer = Trainer(load_and_validate("configs/uniter/pretrain_tiny_synth.yaml", over), work_dir=str(tmp_path))
    trainer.train()
    _assert_text_path_equals_bert(trainer.model.encoder, _minilm_reference())
    printed = capsys.readouterr().out
    assert "newly initialised: img_embed.feat_proj.weight" in printed and " 0 unused" in printed
    assert printed.splitlines()[0] in (tmp_path / "init_report.txt").read_text()


def test_trainer_init_from_refuses_another_hidden_size(synth_cache, tmp_path):
    from tests.conftest import tiny_overrides
    from vlframe.config import load_and_validate
    from vlframe.engine.trainer import Trainer

    over = tiny_overrides(synth_cache) + ["train.max_steps=0", f"train.init_from={minilm_dir()}"]
    trainer = Trainer(load_and_validate("configs/uniter/pretrain_tiny_synth.yaml", over), work_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"embeddings\.LayerNorm\.bias \(-> text_embed\.norm\.bias\): "
                       r"checkpoint shape \(384,\) != model shape \(32,\)"):
        trainer.train()


def _random_inputs(seed=0, b=4, t=9, k=7, d=24):
    g = torch.Generator().manual_seed(seed)
    text_len = torch.tensor([9, 3, 6, 1])[:b]
    reg_len = torch.tensor([2, 7, 5, 4])[:b]
    text_mask = torch.arange(t)[None] < text_len[:, None]
    img_mask = torch.arange(k)[None] < reg_len[:, None]
    ids = torch.randint(1, 50, (b, t), generator=g) * text_mask
    feat = torch.rand(b, k, d, generator=g) * img_mask[..., None]
    pos = torch.rand(b, k, 7, generator=g) * img_mask[..., None]
    return ids, text_mask, feat, pos, img_mask


def test_packing_equals_naive_padded_attention():
    torch.manual_seed(0)
    m = UniterModel(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, img_dim=24).eval()
    ids, tm, feat, pos, im = _random_inputs()
    with torch.no_grad():
        packed = m.encode(ids, tm, feat, pos, im)
        # Naive: [text padded to T | regions padded to K] with an attention mask over both.
        text = m.text_embed(ids, m.type_embed(torch.zeros_like(ids)))
        reg = m.img_embed(feat, pos, None, m.type_embed(torch.ones(im.shape, dtype=torch.long)))
        seq = m.encoder(torch.cat([text, reg], 1), torch.cat([tm, im], 1))
        naive_text, naive_reg = seq[:, : ids.shape[1]], seq[:, ids.shape[1] :]
        naive_pooled = torch.tanh(m.pooler(seq[:, 0]))
    assert (packed.text - naive_text)[tm].abs().max() < 1e-5
    assert (packed.regions - naive_reg)[im].abs().max() < 1e-5
    assert (packed.pooled - naive_pooled).abs().max() < 1e-5
    # The packed sequence has no padding between text and regions and is as short as possible.
    assert packed.sequence.shape[1] == int((tm.sum(1) + im.sum(1)).max())
    b = 1  # 3 tokens then 7 regions
    assert torch.allclose(packed.sequence[b, 3:10], naive_reg[b, :7], atol=1e-5)


def test_analyze_model_table():
    from vlframe.engine.analysis import parameter_table

    table = parameter_table("configs/uniter/pretrain_tiny_synth.yaml", ["model.num_layers=12", "model.hidden_size=768",
                                                                         "model.num_heads=12", "model.intermediate_size=3072"])
    assert "encoder" in table and "85.1M" in table  # 12 layers of 7.09M; the pooler adds 0.59M
