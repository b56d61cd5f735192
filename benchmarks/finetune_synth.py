#!/usr/bin/env python
"""Finetune the tiny model on the synthetic world's task sets and print each metric beside its
chance level and its oracle ceiling; with ``--inits scratch`` also from no pretraining, per seed
("pretraining helps": mean and spread over seeds at the same finetuning budget). Runs already in
results.json are kept (several invocations, e.g. in parallel with different --out, add up).

    .venv/bin/python benchmarks/finetune_synth.py --pretrained work_dirs/pretrain_tiny_synth/checkpoints/ckpt_0005000.pt \
        --tasks vqa refcoco itr --seeds 0 1 2 --inits pretrained scratch --steps 100

Each run is configs/uniter/finetune_<task>_tiny_synth.yaml with ``train.max_steps``, the seed and
``train.init_from`` overridden (plus ``--set key=value`` for every run). Results go to
``--out``/results.json and a Markdown table on stdout.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlframe.config import load_and_validate  # noqa: E402
from vlframe.data.synthetic import ensure_world  # noqa: E402
from vlframe.data.synthetic_tasks import ensure_task_sets, load_oracle  # noqa: E402
from vlframe.engine.trainer import Trainer  # noqa: E402

# config name -> (task key in the config, oracle.json entry, metrics reported)
TASKS = {
    "vqa": ("vqa", "vqa", ["vqa_score"]),
    "refcoco": ("refcoco", "refcoco", ["acc_gt", "acc_det"]),
    "itr": ("itr", "retrieval", ["ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10"]),
    "nlvr2": ("nlvr2", "nlvr2", ["acc", "consistency"]),
    "nlvr2_pair": ("nlvr2", "nlvr2", ["acc", "consistency"]),
    "nlvr2_triplet": ("nlvr2", "nlvr2", ["acc", "consistency"]),
    "snli_ve": ("snli_ve", "snli_ve", ["acc"]),
    "vcr": ("vcr", "vcr", ["q2a", "qa2r", "q2ar"]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=None, help="checkpoint of the pretrained runs")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--inits", nargs="+", default=["pretrained"], choices=["pretrained", "scratch"],
                   help="start from --pretrained and/or from no pretraining")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--task-set", nargs="*", default=[], help="TASK:key=value overrides for one task's runs")
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "finetune_synth"))
    args = p.parse_args()
    if "pretrained" in args.inits and not args.pretrained:
        p.error("--pretrained CHECKPOINT is needed for the pretrained runs")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    # every task set is a view of the same world (configs/_base_/datasets/synth_task.yaml): one oracle
    d = load_and_validate(_config_path(args.tasks[0]), list(args.set)).data.train
    world = ensure_world(d.cache_dir, seed=d.seed, num_images=d.num_images, feat_dim=d.feat_dim)
    ensure_task_sets(world)
    oracle = load_oracle(world)
    for task in args.tasks:
        key, oracle_key, names = TASKS[task]
        for init in args.inits:
            for seed in args.seeds:
                run = f"{task}/{init}/seed{seed}"
                if run in results:  # kept from an earlier invocation
                    continue
                ov = [f"train.max_steps={args.steps}", f"seed={seed}", "train.progress=false",
                      f"train.val_interval={args.steps}", f"train.ckpt_interval={args.steps}",
                      f"train.init_from={args.pretrained if init == 'pretrained' else 'null'}", *args.set,
                      *[s.split(":", 1)[1] for s in args.task_set if s.split(":", 1)[0] == task]]
                cfg = load_and_validate(_config_path(task), ov)
                t0 = time.time()
                metrics = Trainer(cfg, work_dir=os.path.join(args.out, task, init, f"seed{seed}")).train()
                results[run] = {n: metrics[f"val/{key}/{n}"] for n in names} | {"wall_s": time.time() - t0}
                print(run, results[run], flush=True)
                with open(results_path, "w") as f:
                    json.dump(results, f, indent=1)
        _table(task, names, oracle[oracle_key], results)
    return 0


def _config_path(task: str) -> str:
    return os.path.join(ROOT, "configs", "uniter", f"finetune_{task}_tiny_synth.yaml")


def _table(task, names, ref, results):
    print(f"\n{task}  (chance: {ref['chance'].get('chance_rule', '')})")
    print("| metric | chance | oracle | pretrained | scratch |")
    print("|---|---|---|---|---|")
    for n in names:
        cells = []
        for init in ("pretrained", "scratch"):
            vals = [r[n] for k, r in results.items() if k.startswith(f"{task}/{init}/")]
            cells.append("" if not vals else f"{statistics.mean(vals):.3f}" if len(vals) == 1 else
                         f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} (n={len(vals)})")
        ch = ref["chance"].get(n)
        print(f"| {n} | {'' if ch is None else f'{ch:.3f}'} | {ref['oracle'].get(n, float('nan')):.3f} | "
              f"{cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    sys.exit(main())
