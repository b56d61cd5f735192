"""Downstream tasks: metrics on hand-checkable cases, the synthetic task sets and their oracles,
the task dataset's bad-input handling, token-type extension, heads, sharded and resumed
retrieval evaluation, every finetune config for 2 steps, and tools/test.py's official formats."""
import csv
import glob
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import ROOT, tiny_overrides
from vlframe.config import load_and_validate
from vlframe.data.downstream import SyntheticTaskDataset, TaskDataset
from vlframe.data.stores import DataQualityError, RegionStoreWriter, TextStoreWriter
from vlframe.data.synthetic import ensure_world
from vlframe.data.synthetic_tasks import ensure_task_sets, load_oracle
from vlframe.data.vqa_vocab import answer_scores
from vlframe.engine.evaluate import evaluate_checkpoint, format_csv, format_markdown, results_table
from vlframe.engine.trainer import Trainer
from vlframe.metrics.downstream import NLVR2Consistency, RefExpAccuracy, VCRAccuracy, VQAScore
from vlframe.metrics.retrieval import retrieval_recall, score_all_pairs

FINETUNE = sorted(glob.glob(os.path.join(ROOT, "configs", "uniter", "finetune_*_tiny_synth.yaml"))) + [
    os.path.join(ROOT, "configs", "uniter", "pretrain_vcr_tiny_synth.yaml")]
WORLD = {"num_images": 120, "feat_dim": 32}


@pytest.fixture(scope="module")
def world(synth_cache):
    w = ensure_world(synth_cache, **WORLD)
    ensure_task_sets(w)
    return w


# ------------------------------------------------------------------------------ metrics by hand


def test_vqa_soft_score_with_ten_answers():
    humans = ["2"] * 4 + ["3"] * 2 + ["4"] + ["5"] * 3
    s = answer_scores(humans)
    assert s == pytest.approx({"2": 1.0, "3": 0.6, "4": 0.3, "5": 0.9})  # 4+ -> 1, 3 -> 0.9, 2 -> 0.6, 1 -> 0.3
    vocab = ["2", "3", "4", "5", "6"]
    target = torch.tensor([[s.get(a, 0.0) for a in vocab]] * 5)
    logits = torch.full((5, 5), -1.0)
    for row, pick in enumerate([1, 0, 2, 4, 3]):  # answers "3", "2", "4", "6", "5"
        logits[row, pick] = 1.0
    m = VQAScore()
    m.update({"logits": logits[:2], "target": target[:2]})
    m.update({"logits": logits[2:], "target": target[2:]})
    assert m.compute()["vqa_score"] == pytest.approx((0.6 + 1.0 + 0.3 + 0.0 + 0.9) / 5)


def test_recall_at_k_with_ties():
    # 3 texts (images 0, 1, 1) x 3 images. A tie with the right image counts for it (strictly
    # higher scores make the rank), text 2's image is only third.
    scores = torch.tensor([[0.5, 0.5, 0.1],
                           [0.2, 0.7, 0.9],
                           [0.9, 0.3, 0.8]])
    r = retrieval_recall(scores, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert r["ir_r1"] == pytest.approx(1 / 3)  # text 0 (tie at the top) ; text 1 rank 2 ; text 2 rank 3
    assert r["ir_r2"] == pytest.approx(2 / 3)
    # image 0's column: its text 0 (0.5) below text 2 (0.9) -> rank 2; image 1: text 1 (0.7) first.
    assert r["tr_r1"] == pytest.approx(1 / 3)  # image 2 has no text: counted as a miss
    assert r["tr_r2"] == pytest.approx(2 / 3)


def test_nlvr2_consistency_and_vcr_holistic_and_refexp_iou():
    m = NLVR2Consistency()
    m.update({"correct": torch.tensor([True, False]), "identifier": ["dev-1-0-0", "dev-1-1-0"]})
    m.update({"correct": torch.tensor([True, True, True]), "identifier": ["dev-2-0-0", "dev-2-1-0", "dev-1-0-1"]})
    assert m.compute()["consistency"] == pytest.approx(2 / 3)  # sentences dev-1-0 (no), dev-2-0, dev-1-1

    v = VCRAccuracy()
    eye = torch.eye(4)
    v.update({"q2a_scores": eye[[0, 1, 2, 3]], "qa2r_scores": eye[[0, 0, 1, 1]],
              "answer_label": torch.tensor([0, 1, 0, 0]), "rationale_label": torch.tensor([0, 1, 1, 0])})
    got = v.compute()  # answers right: 0, 1 ; rationales right: 0, 2 ; both: 0
    assert got == pytest.approx({"q2a": 0.5, "qa2r": 0.5, "q2ar": 0.25})

    r = RefExpAccuracy()
    r.update({"pred_gt": torch.tensor([1, 2, 0]), "target_region": torch.tensor([1, 1, 0]),
              "has_gt": torch.tensor([True, True, False]),
              "pred_box": torch.tensor([[0, 0, 0.5, 1], [0, 0, 0.4, 1], [0.5, 0.5, 1, 1]]),
              "target_box": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0.5, 0.5]]), "pred_det": None})
    got = r.compute()
    assert got["acc_gt"] == pytest.approx(0.5)  # the third has no ground-truth candidates
    assert got["acc_det"] == pytest.approx(1 / 3)  # IoU 0.5 counts, 0.4 and 0 do not


# ------------------------------------------------------------------------ synthetic task sets


def test_task_sets_oracle_above_chance_and_fields(world):
    oracle = load_oracle(world)
    for task, key in [("vqa", "vqa_score"), ("refcoco", "acc_det"), ("refcoco", "acc_gt"), ("nlvr2", "acc"),
                      ("snli_ve", "acc"), ("vcr", "q2ar"), ("retrieval", "ir_r1"),
                      ("itm", "itm_acc")]:
        assert oracle[task]["oracle"][key] > oracle[task]["chance"][key] + 0.2, (task, key)
    ds = SyntheticTaskDataset(task="vqa", cache_dir=os.path.dirname(world), split="val", **WORLD)
    e = ds[0]
    assert len(ds.answer_vocab) == 23 and e.extra["scores"] and max(e.extra["scores"]) <= 1.0
    # several annotators disagree somewhere: soft scores below 1 exist
    assert any(min(ds[i].extra["scores"]) < 1.0 for i in range(len(ds)))
    ref = SyntheticTaskDataset(task="refcoco", cache_dir=os.path.dirname(world), split="val", **WORLD)
    e = ref[0]
    assert e.extra["target_region"] in e.extra["gt_regions"] and e.extra["target_region"] < e.img_feat.shape[0]


def _tiny_store(tmp_path, records, images, task="vqa"):
    from vlframe.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rs = str(tmp_path / "regions")
    with RegionStoreWriter(rs, feat_dim=8, num_labels=None) as w:
        for img in images:
            w.add(img, features=np.ones((3, 8)), boxes=np.array([[0, 0, .5, .5], [.1, .2, .9, .8], [0, 0, 1, 1]]))
    ts = str(tmp_path / task)
    special = {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
    with TextStoreWriter(ts, tokenizer_name="bert-base-uncased", special_ids=special, vocab_size=tok.vocab_size) as tw:
        for tid, img, extra in records:
            tw.add(tid, token_ids=tok("is it red?", add_special_tokens=False)["input_ids"], img_id=img, raw="", extra=extra)
    with open(os.path.join(ts, "answer_vocab.json"), "w") as f:
        json.dump(["yes", "no"], f)
    return rs, ts


def test_task_dataset_bad_input(tmp_path):
    recs = [("q1", "a", {"question_id": 1, "answers": [0], "scores": [1.0]}),
            ("q2", "ghost", {"question_id": 2, "answers": [1], "scores": [1.0]}),
            ("q3", "a", {"question_id": 3, "answers": [], "scores": []})]  # no answer in the vocabulary
    rs, ts = _tiny_store(tmp_path, recs, ["a"])
    with pytest.raises(DataQualityError, match=r"record 'q2' needs image 'ghost'"):
        TaskDataset(task="vqa", region_store=rs, text_store=ts, min_regions=0, conf_threshold=None)
    ds = TaskDataset(task="vqa", region_store=rs, text_store=ts, min_regions=0, conf_threshold=None, skip_bad=True)
    assert len(ds) == 2 and ds.skipped["missing_image"] == 1
    assert ds.noted == {"no_answer_in_vocab": 1}
    with pytest.raises(ValueError, match=r"record 'q1' has no field\(s\) \['img_ids', 'label', 'identifier'\]"):
        TaskDataset(task="nlvr2", region_store=rs, text_store=ts, min_regions=0, conf_threshold=None)


# ------------------------------------------------------------------------- model side, heads


def _tiny_model():
    from projects.uniter.uniter.model import UniterModel

    return UniterModel(vocab_size=200, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, img_dim=8,
                       hidden_dropout=0.0, attention_dropout=0.0)


def test_token_types_grow_through_the_contract_and_load_old_checkpoints():
    m = _tiny_model()
    old = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.add_token_type("second_image", like="image") == 2
    assert m.add_token_type("second_image", like="image") == 2  # asked again: the same row
    assert m.add_token_type("answer", like="text") == 3
    w = m.type_embed.weight
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[0])
    fresh = _tiny_model()
    fresh.add_token_type("second_image", like="image")
    fresh.add_token_type("answer", like="text")
    old["type_embed.weight"] = old["type_embed.weight"] + 1.0  # a "pretrained" table of two rows
    fresh.load_state_dict(old)
    w = fresh.type_embed.weight
    assert torch.equal(w[2], old["type_embed.weight"][1]) and torch.equal(w[3], old["type_embed.weight"][0])


def test_pair_head_fusions_and_candidate_scorer():
    from vlframe.models import VLEncoderOutput
    from vlframe.modules.heads import CandidateScorerHead, PairScorerHead

    torch.manual_seed(0)
    seq = torch.randn(4, 5, 16)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = VLEncoderOutput(seq, mask, seq, mask, seq[:, 0], sequence=seq, sequence_mask=mask)
    pair = PairScorerHead(hidden_size=16, fusion="pair")
    got = pair(out)
    assert got.shape == (2, 2)
    assert torch.allclose(got[1], pair.out(torch.cat([seq[2, 0], seq[3, 0]])))
    bi = PairScorerHead(hidden_size=16, fusion="biattn", num_heads=2, dropout=0.0).eval()
    a = bi(out)
    seq2 = seq.clone()
    seq2[1, 3:] = 100.0  # padding of a right sequence: masked, so no effect
    b = bi(VLEncoderOutput(seq2, mask, seq2, mask, seq2[:, 0], sequence=seq2, sequence_mask=mask))
    assert a.shape == (2, 2) and torch.allclose(a, b, atol=1e-5)
    c = CandidateScorerHead(hidden_size=16, num_candidates=2)
    assert c(out).shape == (2, 2, 2)


# ---------------------------------------------------------------------- retrieval evaluation


def _score(model, batch):
    # deterministic, image- and text-dependent, with ties between equal texts
    # (padding-invariant: a pair scores the same in any batch)
    feat = batch.img_feat.float().sum((1, 2)) / batch.img_mask.sum(1)
    return (batch.input_ids.float().sum(1) % 7) * feat + batch.img_mask.sum(1) * 0.01


def _dataset(world):
    from vlframe.data.dataset import SyntheticPairs

    return SyntheticPairs(cache_dir=os.path.dirname(world), split="val", **WORLD)


def _shard_worker(rank, world_size, port, world, block_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        scores, _ = score_all_pairs(_score, None, _dataset(world), device=torch.device("cpu"), pairs_per_batch=37,
                                    block_texts=5, block_dir=block_dir, fingerprint="f", rank=rank,
                                    world_size=world_size)
        torch.save(scores, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_retrieval_sharded_and_resumed_equals_one_process(world, tmp_path):
    ds = _dataset(world)
    kw = dict(device=torch.device("cpu"), pairs_per_batch=37, block_texts=5)
    ref, txt2img = score_all_pairs(_score, None, ds, **kw)
    # the same scores as scoring pair by pair
    assert torch.allclose(ref[3, 2], _score(None, _one(ds, 3, 2)), atol=1e-6)

    calls = {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return _score(model, batch)

    blocks = str(tmp_path / "blocks")
    with pytest.raises(KeyboardInterrupt):
        score_all_pairs(dying, None, ds, block_dir=blocks, fingerprint="f", **kw)
    saved = len(glob.glob(os.path.join(blocks, "block_*.pt")))
    assert 0 < saved < -(-len(txt2img) // 5)
    resumed, _ = score_all_pairs(_score, None, ds, block_dir=blocks, fingerprint="f", **kw)
    assert torch.equal(resumed, ref)
    with pytest.raises(ValueError, match="blocks are of another evaluation"):
        score_all_pairs(_score, None, ds, block_dir=blocks, fingerprint="other", **kw)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_shard_worker, args=(2, port, world, str(tmp_path / "b2"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt", weights_only=True), ref)
    assert retrieval_recall(ref, txt2img) == retrieval_recall(resumed, txt2img)


def _one(ds, t, j):
    from vlframe.data.batch import Example, collate

    texts = [i for i, img in enumerate(ds.img_ids) if img in set(ds.image_ids())]
    img = ds.image_ids()[j]
    return collate([Example("t", img, ds.text_ids(texts[t]), *ds.image_example(img)[:2])])


# ---------------------------------------------------------------------- configs, tools/test.py


def _pretrained(synth_cache, tmp_path):
    cfg = load_and_validate(os.path.join(ROOT, "configs", "uniter", "pretrain_tiny_synth.yaml"),
                            tiny_overrides(synth_cache) + ["train.max_steps=0", "train.phases=[]", "data.val=null"])
    Trainer(cfg, work_dir=str(tmp_path / "pre")).train()
    return str(tmp_path / "pre" / "checkpoints" / "ckpt_0000000.pt")


@pytest.mark.slow
@pytest.mark.parametrize("path", FINETUNE, ids=os.path.basename)
def test_finetune_config_runs_two_steps_from_pretrained(path, synth_cache, tmp_path):
    ckpt = _pretrained(synth_cache, tmp_path)
    cfg = load_and_validate(path, tiny_overrides(synth_cache) + ["train.max_steps=2", "train.warmup_steps=1",
                                                                 f"train.init_from={ckpt}"])
    names = list(cfg.tasks)  # one finetuning task, or the second-stage VCR pretraining's several
    trainer = Trainer(cfg, work_dir=str(tmp_path / "ft"))
    if "itr" in names:  # the ranking head starts as the pretrained ITM head's positive row
        itm = torch.load(ckpt, weights_only=True)["model"]["tasks.itm.head.weight"][1]
        trainer._resume("never")
        assert torch.equal(trainer.model.tasks["itr"].head.weight[0], itm)
    metrics = trainer.train()
    assert trainer.step == 2 and metrics and all(v == v for v in metrics.values())
    for name in names:
        assert any(k.startswith(f"val/{name}/") for k in metrics), name


@pytest.mark.slow
def test_tools_test_writes_official_formats(synth_cache, tmp_path):
    ckpt = _pretrained(synth_cache, tmp_path)
    for cfg_name, name in [("finetune_vqa_tiny_synth", "vqa"), ("finetune_nlvr2_tiny_synth", "nlvr2"),
                           ("finetune_itr_tiny_synth", "itr"), ("finetune_vcr_tiny_synth", "vcr")]:
        ov = tiny_overrides(synth_cache) + ["train.max_steps=1", "train.warmup_steps=1", f"train.init_from={ckpt}"]
        if name == "itr":
            ov.append("tasks.itr.metrics=[{type: retrieval_full, num_images: 10}]")
        cfg = load_and_validate(os.path.join(ROOT, "configs", "uniter", cfg_name + ".yaml"), ov)
        run = tmp_path / name
        Trainer(cfg, work_dir=str(run)).train()
        out = str(tmp_path / f"test_{name}")
        if name == "itr":  # zero-shot, straight from the pretrained checkpoint
            res = evaluate_checkpoint(cfg, ckpt, out_dir=out + "_zero_shot")
            assert res["protocol"]["zero_shot"] and res["protocol"]["zero_shot_heads"]["itr"]
            assert set(res["metrics"]) >= {"itr/ir_r1", "itr/tr_r10"}
        res = evaluate_checkpoint(cfg, str(run / "checkpoints" / "ckpt_0000001.pt"), out_dir=out)
        with open(os.path.join(out, "metrics.json")) as f:
            saved = json.load(f)
        assert saved["metrics"] == pytest.approx(res["metrics"]) and saved["protocol"]["split"] == "val"
        assert not saved["protocol"]["zero_shot"]
        if name == "vqa":
            with open(os.path.join(out, "predictions_vqa.json")) as f:
                preds = json.load(f)
            assert preds and all(set(p) == {"question_id", "answer"} and isinstance(p["question_id"], int)
                                 and isinstance(p["answer"], str) for p in preds)
        if name == "nlvr2":
            with open(os.path.join(out, "predictions_nlvr2.csv")) as f:
                rows = list(csv.reader(f))
            assert rows and all(len(r) == 2 and r[1] in ("True", "False") and r[0].count("-") == 3 for r in rows)
        if name == "vcr":  # the leaderboard CSV needs the rationales after every answer
            each = load_and_validate(os.path.join(ROOT, "configs", "uniter", cfg_name + ".yaml"),
                                     ov + ["tasks.vcr.rationales=each"])
            res_each = evaluate_checkpoint(each, str(run / "checkpoints" / "ckpt_0000001.pt"), out_dir=out + "_each")
            assert res_each["metrics"] == pytest.approx(res["metrics"])  # same gold-answer scoring
            with open(os.path.join(out + "_each", "predictions_vcr.csv")) as f:
                rows = list(csv.reader(f))
            assert rows[0][:2] == ["annot_id", "answer_0"] and rows[0][-1] == "rationale_conditioned_on_a3_3"
            assert len(rows) > 1 and all(len(r) == 1 + 4 + 16 for r in rows)
            for r in rows[1:]:
                probs = [float(v) for v in r[1:]]
                assert sum(probs[:4]) == pytest.approx(1.0, abs=1e-5)
                assert all(sum(probs[4 + 4 * i: 8 + 4 * i]) == pytest.approx(1.0, abs=1e-5) for i in range(4))
            with open(os.path.join(out, "predictions_vcr.json")) as f:
                gold = {p["annot_id"]: p for p in json.load(f)}
            r = rows[1]  # the gold-conditioned rationale probabilities are one of the four rows
            rat = [float(v) for v in r[5:]]
            assert any(rat[4 * i: 4 * i + 4] == pytest.approx(gold[r[0]]["rationale_probs"], abs=1e-5) for i in range(4))
    with pytest.raises(ValueError, match=r"no weights for head\(s\) tasks.vqa.head"):
        evaluate_checkpoint(load_and_validate(os.path.join(ROOT, "configs", "uniter", "finetune_vqa_tiny_synth.yaml"),
                                              tiny_overrides(synth_cache)), ckpt, out_dir=str(tmp_path / "x"))
    header, rows = results_table([str(tmp_path / "test_vqa"), str(tmp_path / "test_nlvr2"), str(tmp_path / "test_itr")])
    assert header[0] == "run" and header[-1] == "Meta-Sum" and "VQA" in header and "NLVR2" in header
    for r in rows:
        assert r[-1] == pytest.approx(sum(v for v in r[1:-1] if v is not None))
    assert format_markdown(header, rows).count("\n") == 2 + len(rows)
    assert format_csv(header, rows).splitlines()[0] == ",".join(header)


def _real_stores(task, tmp_path):
    """Stores written by the importers from the small format-faithful files of test_import_tasks."""
    from tests import test_import_tasks as T
    from vlframe.data.importers.tasks import import_nlvr2, import_refcoco, import_snli_ve, import_vcr, import_vqa

    out = str(tmp_path / task)
    if task == "vqa":
        q, a = T.vqa_files(tmp_path)
        import_vqa(q, a, out=out, min_answer_count=1)
        images = ["42", "7"]
    elif task == "nlvr2":
        import_nlvr2(T.write_jsonl(tmp_path / "dev.json", T.nlvr2_rows()), out=out)
        images = [f"dev-850-0-img{i}" for i in (0, 1)] + [f"dev-12-3-img{i}" for i in (0, 1)]
    elif task == "snli_ve":
        import_snli_ve(T.write_jsonl(tmp_path / "ve.jsonl", T.snli_rows()), out=out)
        images = ["3416050480", "2267923837"]
    elif task == "refcoco":
        refs, inst = T.refcoco_files(tmp_path)
        import_refcoco(refs, inst, out=out, img_id_format="{file_stem}")
        images = ["COCO_train2014_000000000581", "COCO_train2014_000000000900"]
    else:  # vcr: the record with four answers and four rationales
        import_vcr(T.write_jsonl(tmp_path / "vcr.jsonl", T.vcr_rows()[:1]), out=out)
        images = ["lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935-00.24.00.783@0"]
    return T.region_store(tmp_path / "regions", images), out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "refcoco", "vcr"])
def test_real_format_config_runs_two_steps(task, tmp_path):
    regions, store = _real_stores(task, tmp_path)
    ov = [f"vars.region_store={regions}", f"vars.train_store={store}", f"vars.val_store={store}",
          "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
          "model.img_dim=8", "train.init_from=null", "train.max_steps=2", "train.warmup_steps=1",
          "train.progress=false", "train.amp=fp32", "data.num_workers=0", "data.sampler.budget=512",
          "data.val_batch_units=1024", "train.log_interval=1"]
    if task == "nlvr2":
        ov.append("tasks.nlvr2.head.num_heads=2")
    cfg = load_and_validate(os.path.join(ROOT, "configs", "uniter", f"finetune_{task}_base.yaml"), ov)
    trainer = Trainer(cfg, work_dir=str(tmp_path / "run"))
    metrics = trainer.train()
    assert trainer.step == 2 and metrics and all(v == v for v in metrics.values()), metrics


def _consistency_worker(rank, world_size, port, records, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        m = NLVR2Consistency()
        mine = records[rank::world_size]  # a sentence's pairs land on both ranks
        m.update({"correct": torch.tensor([ok for _, ok in mine]), "identifier": [i for i, _ in mine]})
        torch.save(torch.tensor(m.compute()["consistency"]), os.path.join(out_dir, f"cons{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_nlvr2_consistency_under_ddp_equals_one_process(tmp_path):
    """A sentence whose pairs are split over two ranks is consistent only if right on both."""
    # identifier split-set-pair-sentence: a sentence is (set, sentence), seen with several pairs
    records = [("dev-1-0-0", True), ("dev-1-1-0", False), ("dev-2-0-0", True), ("dev-2-1-0", True),
               ("dev-3-0-1", True), ("dev-3-1-1", True), ("dev-3-2-1", False), ("dev-4-0-0", True)]
    one = NLVR2Consistency()
    one.update({"correct": torch.tensor([ok for _, ok in records]), "identifier": [i for i, _ in records]})
    ref = one.compute()["consistency"]
    assert ref == pytest.approx(2 / 4)  # dev-2-0 and dev-4-0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_consistency_worker, args=(2, port, records, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in (0, 1):
        assert float(torch.load(tmp_path / f"cons{r}.pt", weights_only=True)) == pytest.approx(ref)
