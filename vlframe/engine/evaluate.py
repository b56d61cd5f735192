"""Evaluate a checkpoint on a config's tasks (tools/test.py) and tabulate runs (tools/results.py).

:func:`evaluate_checkpoint` builds the model and the tasks of a config, loads a finetuned or a
pretrained checkpoint (heads a task can make from pretrained ones - the ranking head from ITM -
are made so: that is zero-shot evaluation), runs every task's metrics over a split and writes
``metrics.json`` (the protocol: config, checkpoint, its step, split, which heads were zero-shot)
and each task's predictions in its benchmark's official format (``predictions_<task>.json``,
NLVR2 and VCR with ``rationales: each`` as ``predictions_<task>.csv``).

:func:`results_table` reads such ``metrics.json`` files (or a training run's last validation in
``metrics.jsonl``) and makes one table across tasks with the paper's Meta-Sum: the sum of the
benchmark scores (in %) a run has.
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import os
import shutil
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlframe.engine import checkpoint as ckpt
from vlframe.engine import distributed as D
from vlframe.engine.data import TaskStream
from vlframe.io import atomic_write
from vlframe.metrics.base import DatasetMetric
from vlframe.registry import DATASETS, MODELS, TASKS, build, import_custom
from vlframe.tasks.base import DataInfo, Task

log = logging.getLogger("vlframe")

#: (task type, metric name) -> column of the results table; their sum (in %) is the Meta-Sum.
BENCHMARK_COLUMNS: list[tuple[str, str, str]] = [
    ("vqa", "vqa_score", "VQA"),
    ("vcr", "q2a", "VCR Q>A"), ("vcr", "qa2r", "VCR QA>R"), ("vcr", "q2ar", "VCR Q>AR"),
    ("nlvr2", "acc", "NLVR2"),
    ("classification", "acc", "SNLI-VE"),
    ("refexp", "acc_gt", "RE gt"), ("refexp", "acc_det", "RE det"),
    ("itr", "ir_r1", "IR@1"), ("itr", "ir_r5", "IR@5"), ("itr", "ir_r10", "IR@10"),
    ("itr", "tr_r1", "TR@1"), ("itr", "tr_r5", "TR@5"), ("itr", "tr_r10", "TR@10"),
    ("itm", "ir_r1", "IR@1"), ("itm", "ir_r5", "IR@5"), ("itm", "ir_r10", "IR@10"),
    ("itm", "tr_r1", "TR@1"), ("itm", "tr_r5", "TR@5"), ("itm", "tr_r10", "TR@10"),
]


#: The paper's Table 2 columns: (column, task type, metrics averaged). IR and TR are the means of
#: R@1, R@5 and R@10; RefCOCO+ is reported on detected regions (val^d: ``acc_det``).
TABLE2_COLUMNS: list[tuple[str, str, tuple[str, ...]]] = [
    ("VQA", "vqa", ("vqa_score",)),
    ("IR", "itr", ("ir_r1", "ir_r5", "ir_r10")),
    ("TR", "itr", ("tr_r1", "tr_r5", "tr_r10")),
    ("NLVR2", "nlvr2", ("acc",)),
    ("RE", "refexp", ("acc_det",)),
]
META_SUM = "Meta-Sum"


def table2_scores(types: dict[str, str], metrics: dict[str, float]) -> dict[str, float]:
    """Table 2's columns (in %) that ``metrics`` (``<task>/<metric>``, tasks typed by ``types``)
    have, and the Meta-Sum (their sum) when it has all five."""
    out: dict[str, float] = {}
    for col, task_type, names in TABLE2_COLUMNS:
        for task, t in types.items():
            if t == task_type and all(f"{task}/{n}" in metrics for n in names):
                out[col] = 100.0 * sum(float(metrics[f"{task}/{n}"]) for n in names) / len(names)
                break
    if len(out) == len(TABLE2_COLUMNS):
        out[META_SUM] = sum(out.values())
    return out


def _load_weights(module: torch.nn.Module, tasks: dict[str, Any], path: str) -> dict[str, list[str]]:
    """Load ``path`` into ``module`` (model + task heads). Heads missing from it are made from
    pretrained heads where the task can (zero-shot) or fail naming them; heads of the wrong shape
    fail naming them."""
    state = ckpt.load(path)
    weights = dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    zero_shot: dict[str, list[str]] = {}
    for name, task in tasks.items():
        made = task.init_from_pretrained(weights, prefix=f"tasks.{name}.")
        if made:
            zero_shot[name] = sorted(made)
            weights.update(made)
    own = module.state_dict()
    wrong = [f"{k} (checkpoint {tuple(weights[k].shape)}, task {tuple(v.shape)})" for k, v in own.items()
             if k in weights and k.startswith("tasks.") and tuple(weights[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k.startswith("tasks.") and k not in weights]
    if wrong or missing:
        heads = sorted({".".join(k.split(".")[:3]) for k in missing})
        raise ValueError(f"checkpoint {path}: its heads do not fit the config's tasks: "
                         + "; ".join(filter(None, [f"wrong shape: {', '.join(wrong)}" if wrong else "",
                                                   f"no weights for head(s) {', '.join(heads)}" if heads else ""])))
    module.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    model_missing = [k for k in own if k.startswith("model.") and k not in weights]
    if model_missing:
        raise ValueError(f"checkpoint {path}: no weights for model parameters {model_missing[:5]} "
                         f"({len(model_missing)} in all)")
    return zero_shot


def _write_csv(path: str, rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue()), binary=False)
    return path


def _write_predictions(out_dir: str, name: str, task_type: str, records: list[dict[str, Any]]) -> str:
    csv_path = os.path.join(out_dir, f"predictions_{name}.csv")
    if task_type == "nlvr2":  # the official NLVR2 file: identifier,prediction
        return _write_csv(csv_path, [[r["identifier"], r["prediction"]] for r in records])
    if task_type == "vcr" and records and "rationale_probs_given" in records[0]:  # the VCR leaderboard CSV
        n = len(records[0]["answer_probs"])
        header = (["annot_id"] + [f"answer_{i}" for i in range(n)]
                  + [f"rationale_conditioned_on_a{i}_{j}" for i in range(n) for j in range(n)])
        return _write_csv(csv_path, [header] + [[r["annot_id"], *r["answer_probs"],
                                                 *(p for row in r["rationale_probs_given"] for p in row)]
                                                for r in records])
    path = os.path.join(out_dir, f"predictions_{name}.json")
    atomic_write(path, lambda f: json.dump(records, f), binary=False)
    return path


@torch.no_grad()
def evaluate_checkpoint(cfg: DictConfig, checkpoint: str, *, out_dir: str, split: str = "val",
                        device: str = "auto", resume_blocks: bool = True) -> dict[str, Any]:
    """Metrics (and official-format predictions) of ``checkpoint`` on ``cfg``'s tasks over
    ``data.<split>``; writes ``out_dir/metrics.json`` and returns its content. Dataset metrics
    (retrieval) shard their scoring over DDP ranks and keep score blocks in
    ``out_dir/blocks_<task>`` (resumed after an interruption when ``resume_blocks``)."""
    from vlframe.data.loader import keep_freed_memory
    from vlframe.engine.trainer import VLModule, resolve_device

    keep_freed_memory()  # as the training process (vlframe.launch.job.run_training): no page-fault churn
    import_custom(list(cfg.get("custom_imports") or []))
    dev = resolve_device(device)
    if not cfg.data.get(split):
        raise ValueError(f"config has no data.{split} to evaluate on")
    dataset = build(cfg.data[split], DATASETS, where=f"data.{split}")
    info = DataInfo.from_dataset(dataset)
    model = build(cfg.model, MODELS, where="model")
    tasks, types = {}, {}
    for name, node in cfg.tasks.items():
        node = OmegaConf.to_container(node, resolve=True)
        node.pop("mix", None)
        types[name] = node["type"]
        tasks[name] = build(node, TASKS, where=f"tasks.{name}")
        tasks[name].setup(model=model, info=info, where=f"tasks.{name}")
    module = VLModule(model, tasks)
    zero_shot = _load_weights(module, tasks, checkpoint)
    module.to(dev).eval()
    sampler = dict(OmegaConf.to_container(cfg.data.sampler, resolve=True), budget=int(cfg.data.val_batch_units))
    os.makedirs(out_dir, exist_ok=True)
    metrics: dict[str, float] = {}
    predictions: dict[str, str] = {}
    for name, task in tasks.items():
        batch_metrics = [m for m in task.metrics if not isinstance(m, DatasetMetric)]
        records: list[dict[str, Any]] = []
        if batch_metrics or type(task).predictions is not Task.predictions:
            for m in batch_metrics:
                m.reset()
            stream = TaskStream(dataset=dataset, task=task, sampler_cfg=sampler, seed=int(cfg.seed) + 7, shuffle=False,
                                num_workers=0, pin_memory=False, device=dev, where="data.sampler")
            for batch in stream.epoch_batches():
                outputs = task.evaluate(model, batch.to(dev))
                for m in batch_metrics:
                    m.update(outputs)
                records += task.predictions(outputs)
            for m in batch_metrics:
                metrics.update({f"{name}/{k}": v for k, v in m.compute().items()})
        for m in task.metrics:
            if isinstance(m, DatasetMetric):
                kwargs = {}
                if "block_dir" in inspect.signature(m.evaluate).parameters:  # resumable, sharded scoring
                    blocks = os.path.join(out_dir, f"blocks_{name}")
                    if not resume_blocks and D.is_main() and os.path.isdir(blocks):
                        shutil.rmtree(blocks)
                    D.barrier()
                    kwargs = {"block_dir": blocks, "fingerprint": f"{os.path.abspath(checkpoint)}|{split}|{name}",
                              "rank": D.rank(), "world_size": D.world_size()}
                res = m.evaluate(task=task, model=model, dataset=dataset, device=dev, **kwargs)
                metrics.update({f"{name}/{k}": v for k, v in res.items()})
        if records and D.is_main():
            predictions[name] = os.path.basename(_write_predictions(out_dir, name, types[name], records))
    state_step = None
    try:
        state_step = int(ckpt.load(checkpoint).get("step"))
    except (TypeError, ValueError, AttributeError):
        pass
    result = {
        "protocol": {"checkpoint": os.path.abspath(checkpoint), "checkpoint_step": state_step, "split": split,
                     "dataset": OmegaConf.to_container(cfg.data[split], resolve=True),
                     "tasks": {n: types[n] for n in tasks},
                     "zero_shot_heads": zero_shot,  # heads made from pretrained ones, not finetuned
                     "zero_shot": bool(zero_shot)},
        "metrics": metrics,
        "predictions": predictions,
    }
    if D.is_main():
        atomic_write(os.path.join(out_dir, "metrics.json"), lambda f: json.dump(result, f, indent=1), binary=False)
    return result


# ----------------------------------------------------------------------------------- the table


def read_run(run_dir: str) -> tuple[dict[str, str], dict[str, float]]:
    """(task name -> task type, metric -> value) of a run folder: tools/test.py's metrics.json, or
    the last validation record of a training run's metrics.jsonl (task types from its config.yaml)."""
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data["protocol"]["tasks"], data["metrics"]
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: neither metrics.json (tools/test.py) nor metrics.jsonl (a training run)")
    last: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            val = {k[4:]: v for k, v in rec.items() if k.startswith("val/")}
            if val:
                last = val
    cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    return {n: str(t.type) for n, t in cfg.tasks.items()}, last


def results_table(run_dirs: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (run, each benchmark column in %, Meta-Sum) over ``run_dirs``."""
    runs = [(d, *read_run(d)) for d in run_dirs]
    columns: list[str] = []
    cells: list[dict[str, float]] = []
    for _, types, metrics in runs:
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, metric = key.partition("/")
            for task_type, m, col in BENCHMARK_COLUMNS:
                if types.get(name) == task_type and metric == m:
                    row[col] = 100.0 * float(value)
                    if col not in columns:
                        columns.append(col)
        cells.append(row)
    order = [c for _, _, c in BENCHMARK_COLUMNS]
    columns.sort(key=order.index)
    header = ["run", *columns, "Meta-Sum"]
    rows = [[os.path.basename(os.path.normpath(d)), *[row.get(c) for c in columns], sum(row.values())]
            for (d, _, _), row in zip(runs, cells)]
    return header, rows


def format_markdown(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else f"{v:.4f}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()
