"""The training loop: build from config, then per step sample a task, forward, backward with
gradient accumulation, unscale, clip, step, schedule, hooks. Read it top to bottom.

Features
- One task per step (per gradient-accumulation group), drawn by ``mix`` ratio; under DDP rank 0
  draws and broadcasts, so every rank trains the same task.
- DDP (torchrun, SLURM): the process group comes from the environment (``distributed``); each
  rank draws its own share of every task's batches and runs the same steps.
- Accumulation: ``no_sync`` on all micro-steps but the last; each micro-loss is weighted by its
  ``Task.loss_count`` over the step's total count on all ranks (see ``_loss_weights``), so K
  micro-batches on R ranks give the gradient of one batch of all their elements, exactly, for a
  loss that is a mean over ``loss_count`` elements (examples for ITM, masked words for MLM, ...).
  WRA's loss (mean over matched pairs minus mean over mismatched ones) is no single mean: it is
  weighted by examples, which is not exact.
- AMP through ``torch.autocast``: bf16 (no scaler) or fp16 with a GradScaler on CUDA; fp32 on CPU
  unless asked for. Gradients are unscaled before clipping. A step whose loss is not finite on
  any rank is skipped; ``train.max_bad_steps`` of them in a row stop the run.
- Checkpoints (model, optimizer, scheduler, scaler, step, every rank's RNG states and data
  positions, the task sampler, the resolved config) are written atomically by rank 0;
  ``resume=auto`` continues from the newest good one, exactly where it stopped, each rank with
  its own streams. What a start may resume (and every weights file it reads) is decided before
  data and model are built (``vlframe.engine.resume``).
- Validation every ``val_interval`` steps; progress bar, ``metrics.jsonl`` and TensorBoard.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlframe import io as vio
from vlframe.config import ConfigError
from vlframe.engine import checkpoint as ckpt
from vlframe.engine import distributed as D
from vlframe.engine.data import TaskStream
from vlframe.engine.hooks import KeepBestCheckpoint
from vlframe.engine.optim import build_optimizer, linear_warmup_decay
from vlframe.engine.resume import StartPlan, check_text_positions, plan_start, save_run_config, truncate_metrics
from vlframe.metrics.base import DatasetMetric
from vlframe.models import VLEncoder
from vlframe.registry import DATASETS, HOOKS, MODELS, TASKS, build, import_custom
from vlframe.tasks.base import DataInfo

log = logging.getLogger("vlframe")


class VLModule(nn.Module):
    """The encoder plus every task's heads, so one DDP wrapper and one optimizer cover both.
    State-dict keys: ``model.*`` (the encoder, as the config's ``model:``), ``tasks.<name>.*``."""

    def __init__(self, model: nn.Module, tasks: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.tasks = nn.ModuleDict(tasks)

    @property
    def encoder(self) -> nn.Module:
        return self.model

    def forward(self, task: str, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.tasks[task](self.model, batch)
        return out.loss, out.logs


def _mix_weights(names: list[str], mix: dict[str, float], where: str) -> torch.Tensor:
    unknown = sorted(set(mix) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {unknown}; the config's tasks are {names}")
    w = torch.tensor([float(mix.get(n, 0.0)) for n in names], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{where}: mix ratios must be >= 0 with a positive total, got {dict(mix)}")
    return w


class TaskChooser:
    """Draws the task of each step with probability proportional to its ``mix``; optional
    ``phases`` ([{until_step, mix}], in order) replace the mix before their ``until_step``."""

    def __init__(self, mix: dict[str, float], seed: int, phases: list[dict] | None = None):
        self.names = list(mix)
        self.weights = _mix_weights(self.names, mix, "tasks.*.mix")
        self.phases = []
        last = 0
        for i, ph in enumerate(phases or []):
            where = f"train.phases[{i}]"
            if set(ph) != {"until_step", "mix"}:
                raise ValueError(f"{where}: expected keys until_step and mix, got {sorted(ph)}")
            if int(ph["until_step"]) <= last:
                raise ValueError(f"{where}.until_step must increase, got {ph['until_step']} after {last}")
            last = int(ph["until_step"])
            self.phases.append((last, _mix_weights(self.names, dict(ph["mix"]), f"{where}.mix")))
        self.generator = torch.Generator().manual_seed(seed)

    def weights_at(self, step: int) -> torch.Tensor:
        for until, w in self.phases:
            if step < until:
                return w
        return self.weights

    def choose(self, step: int = 0) -> str:
        # Rank 0 decides; the others receive its choice (their own draw is discarded).
        w = self.weights_at(step)
        idx = int(torch.multinomial(w, 1, generator=self.generator)) if D.is_main() else -1
        return self.names[D.broadcast_int(idx)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class RunningLogs:
    """Per-task running means of the step logs over the log interval, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.steps: dict[str, int] = {}

    def add(self, task: str, logs: dict[str, torch.Tensor]) -> None:
        sums = self.sums.setdefault(task, {})
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            sums[k] = sums[k] + v if k in sums else v
        self.steps[task] = self.steps.get(task, 0) + 1

    def read(self) -> dict[str, float]:
        """``train/<task>/<key>``: mean over the steps of that task since the last read."""
        keys = [(t, k) for t, sums in self.sums.items() for k in sums]
        if not keys:
            return {}
        first = self.sums[keys[0][0]][keys[0][1]]
        values = torch.stack([self.sums[t][k].reshape(()).to(first.device) for t, k in keys]).tolist()
        out = {f"train/{t}/{k}": v / self.steps[t] for (t, k), v in zip(keys, values)}
        out |= {f"train/{t}/steps": float(n) for t, n in self.steps.items()}
        self.sums, self.steps = {}, {}
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device={name}: not a device ({e}); use auto, cpu, cuda or cuda:<i>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"train.device={name}: CUDA is not available ({why}); use train.device=cpu or auto")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """autocast dtype, or None for fp32. ``auto``: bf16 on CUDA where supported, else fp16 on CUDA,
    fp32 on CPU (bf16 matmul is far slower than fp32 on most CPUs)."""
    if amp == "fp32":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            # Native bf16 only: V100s "support" it by slow emulation (the default check says yes).
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return None
    raise ValueError(f"train.amp must be auto, fp32, bf16 or fp16, got {amp!r}")


class Trainer:
    def __init__(self, cfg: DictConfig, *, work_dir: str):
        self.cfg = cfg
        self.work_dir = work_dir
        tc = cfg.train
        import_custom(list(cfg.get("custom_imports") or []))
        self.device = resolve_device(tc.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        D.init_from_env(self.device)
        ckpt.seed_all(int(cfg.seed) + D.rank())  # each rank its own dropout (and other) streams
        # Decided before data and model are built: a refused resume or a bad weights path costs seconds.
        self.ckpt_dir = os.path.join(work_dir, "checkpoints")
        self._start = plan_start(cfg, ckpt_dir=self.ckpt_dir, is_main=D.is_main())

        # Data and tasks.
        self.train_set = build(cfg.data.train, DATASETS, where="data.train")
        self.val_set = build(cfg.data.val, DATASETS, where="data.val") if cfg.data.get("val") else None
        info = DataInfo.from_dataset(self.train_set)
        encoder = build(cfg.model, MODELS, where="model")
        if not isinstance(encoder, VLEncoder):
            raise TypeError(f"model: {type(encoder).__name__} does not implement vlframe.models.VLEncoder")
        check_text_positions(encoder, {"data.train": self.train_set, "data.val": self.val_set})
        if encoder.init_report is not None:  # the model read model.pretrained
            self._report_init(encoder.init_report)
        if encoder.spec.feat_dim != info.feat_dim:
            raise ValueError(
                f"model: reads region features of size {encoder.spec.feat_dim}, but the region store of "
                f"data.train has feat_dim={info.feat_dim}"
            )
        tasks, mix = {}, {}
        for name, node in cfg.tasks.items():
            node = OmegaConf.to_container(node, resolve=True)
            mix[name] = node.pop("mix", 1.0)
            tasks[name] = build(node, TASKS, where=f"tasks.{name}")
            tasks[name].setup(model=encoder, info=info, where=f"tasks.{name}")
        self.model = VLModule(encoder, tasks).to(self.device)
        if int(tc.grad_accum) > 1 or D.world_size() > 1:
            inexact = [f"tasks.{t}.{n}" for t, task in tasks.items() for n, m in task.named_modules()
                       if getattr(m, "exact_over_micro_batches", True) is False]
            if inexact:  # said once at start: the step's loss is then not the whole batch's
                warnings.warn(f"{', '.join(inexact)}: normalised per micro-batch, so with grad_accum="
                              f"{int(tc.grad_accum)} x {D.world_size()} rank(s) the step averages the "
                              f"micro-batches' losses instead of computing the whole batch's", stacklevel=2)
        phases = OmegaConf.to_container(tc.phases, resolve=True) if tc.get("phases") else []
        self.chooser = TaskChooser(mix, seed=int(cfg.seed), phases=phases)
        sampler_cfg = OmegaConf.to_container(cfg.data.sampler, resolve=True)
        real_units = encoder.runs_real_units(self.device)  # a packed encoder: budget real units
        self.streams = {
            name: TaskStream(
                dataset=self.train_set,
                task=task,
                sampler_cfg=sampler_cfg,
                seed=int(cfg.seed) * 1000 + i,
                shuffle=True,
                num_workers=int(cfg.data.num_workers),
                pin_memory=cfg.data.get("pin_memory"),
                device=self.device,
                real_units=real_units,
            )
            for i, (name, task) in enumerate(tasks.items())
        }
        self.val_streams = {}
        if self.val_set is not None:
            val_sampler = dict(sampler_cfg, budget=int(cfg.data.val_batch_units))
            self.val_streams = {
                name: TaskStream(
                    dataset=self.val_set, task=task, sampler_cfg=val_sampler, seed=int(cfg.seed) + 7,
                    shuffle=False, num_workers=int(cfg.data.num_workers), pin_memory=cfg.data.get("pin_memory"),
                    device=self.device, real_units=real_units,
                    # every batch once over all ranks (ranks may differ by one batch: validation
                    # runs the bare model, no collective per batch; Average all-reduces once)
                    even_ranks=False,
                )
                for name, task in tasks.items()
            }

        # Optimisation.
        self.optimizer = build_optimizer(
            self.model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas), eps=tc.eps,
            lr_mult=dict(tc.get("lr_mult") or {}),
        )
        self.scheduler = linear_warmup_decay(self.optimizer, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps)
        self.amp_dtype = resolve_amp(tc.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._wrapped = self.model  # what train_step calls: the model itself, or its DDP wrapper
        if D.is_dist():
            self._wrapped = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # each step trains one task: other heads get no grad
            )
        self.hooks = [build(h, HOOKS, where=f"hooks.{i}") for i, h in enumerate(cfg.get("hooks") or [])]
        if tc.get("keep_best"):
            if self.val_set is None:
                raise ValueError(f"train.keep_best={tc.keep_best}: needs validation, but data.val is null")
            self.hooks.append(KeepBestCheckpoint(metric=str(tc.keep_best), mode=str(tc.keep_best_mode)))
        self.step = 0
        self._bad_steps: list[int] = []  # the current run of consecutive non-finite-loss steps
        self._tb = None

    # ----------------------------------------------------------------------------- one step
    def train_step(self, task: str, micro_batches: list[Any]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``micro_batches`` of ``task``; returns the logs as device
        tensors (read on the host only at the log interval: no sync per step)."""
        self._wrapped.train()
        k = len(micro_batches)
        logs: dict[str, torch.Tensor] = {}
        weights = self._loss_weights(task, micro_batches)
        finite = []
        for i, batch in enumerate(micro_batches):
            last = i == k - 1
            # Skip the gradient all-reduce on all but the last micro-step.
            sync = contextlib.nullcontext() if last or not D.is_dist() else self._wrapped.no_sync()
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss, micro_logs = self._wrapped(task, batch.to(self.device, non_blocking=True))
                self.scaler.scale(loss * weights[i]).backward()
            finite.append(torch.isfinite(loss.detach()))
            for key, v in micro_logs.items():
                logs[key] = logs[key] + v.detach() / k if key in logs else v.detach() / k
        # All ranks agree (one all-reduce), so they skip or stop together. This is the one host
        # sync of a step: skipping needs the answer before the optimizer steps.
        bad = D.any_rank(~torch.stack(finite).all())
        self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_grad:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        if bad:
            self._bad_step(task)  # no optimizer step; under fp16 the scaler's update lowers the scale
        else:
            self._bad_steps.clear()
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) if fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return logs

    def _loss_weights(self, task: str, micro_batches: list[Any]) -> torch.Tensor:
        """The weight of each micro-batch's loss: ``world_size * n_i / N``, where ``n_i`` is its
        ``loss_count`` and ``N`` the sum over the step's micro-batches on all ranks (one
        all-reduce, before the forward). DDP averages gradients over ranks, which the
        ``world_size`` factor undoes, so the optimizer sees ``sum_i n_i / N * grad(mean_i)``
        = the gradient of ``sum of all N elements' losses / N``: one batch holding everything.
        With equal counts this is the plain ``1 / K``."""
        t = self.model.tasks[task]
        counts = torch.stack([
            torch.as_tensor(t.loss_count(b), dtype=torch.float64, device=self.device) for b in micro_batches
        ])
        total = D.all_reduce_sum(counts.sum())
        return (counts * (D.world_size() / total)).float()

    def _bad_step(self, task: str) -> None:
        """Count a skipped step with a non-finite loss; too many in a row stop the run."""
        step = self.step + 1  # the number this step gets in the log
        self._bad_steps.append(step)
        limit = int(self.cfg.train.max_bad_steps)
        log.warning("step %d (task %s): non-finite loss, optimizer step skipped (%d in a row, train.max_bad_steps=%d)",
                    step, task, len(self._bad_steps), limit)
        if len(self._bad_steps) >= limit:
            raise RuntimeError(
                f"step {step}, task {task!r}: the loss was NaN or inf in {len(self._bad_steps)} consecutive steps "
                f"(steps {self._bad_steps[0]}-{step}; train.max_bad_steps={limit}); stopping. Lower train.lr, "
                f"check the data of task {task!r}, or train with train.amp=bf16/fp32"
            )

    # ----------------------------------------------------------------------------- the loop
    def train(self) -> dict[str, float]:
        tc = self.cfg.train
        if D.is_main():
            os.makedirs(self.work_dir, exist_ok=True)
            save_run_config(self.cfg, self.work_dir)
        self._resume(str(tc.resume))
        for h in self.hooks:
            h.before_train(self)
        bar = None
        if D.is_main() and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last_val: dict[str, float] = {}
        t0 = time.time()
        window = RunningLogs()
        while self.step < tc.max_steps:
            task = self.chooser.choose(self.step)
            micro = [self.streams[task].next() for _ in range(int(tc.grad_accum))]
            logs = self.train_step(task, micro)
            self.step += 1
            window.add(task, logs)
            for h in self.hooks:
                h.after_step(self, task, logs)
            if bar is not None:
                bar.update(1)
            if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                record = window.read()  # the one host sync of the interval
                record["lr"] = self.scheduler.get_last_lr()[0]
                if self.scaler.is_enabled():
                    record["loss_scale"] = float(self.scaler.get_scale())
                self._log(record | {"time": time.time() - t0})
                if bar is not None:
                    bar.set_postfix({k.split("/", 1)[1]: f"{v:.3f}" for k, v in record.items() if k.endswith("/loss")})
            if self.val_streams and (self.step % tc.val_interval == 0 or self.step == tc.max_steps):
                last_val = self.validate()
                self._log(last_val)
                if bar is not None:
                    bar.write(" ".join(f"{k}={v:.4f}" for k, v in last_val.items()))
            if self.step % tc.ckpt_interval == 0 or self.step == tc.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        # e.g. max_steps=0 (the no-pretraining baseline); rank 0 looks: save() is collective
        if not D.broadcast_int(int(D.is_main() and os.path.isfile(self._ckpt_path()))):
            self.save()
        if self.val_streams and not last_val:  # nothing trained in this call: still report
            last_val = self.validate()
            self._log(last_val)
        for h in self.hooks:
            h.after_train(self)
        if self._tb is not None:
            self._tb.close()
        return last_val

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Every task's metrics (``tasks.<name>.metrics``) over the validation split, reduced
        across ranks: batch metrics see every batch's ``task.evaluate`` outputs; dataset metrics
        (e.g. retrieval) score the split themselves on rank 0."""
        self.model.eval()
        out: dict[str, float] = {}
        limit = int(self.cfg.train.get("val_batches", 0) or 0)
        for name, stream in self.val_streams.items():
            task = self.model.tasks[name]
            batch_metrics = [m for m in task.metrics if not isinstance(m, DatasetMetric)]
            for m in batch_metrics:
                m.reset()
            for i, batch in enumerate(stream.epoch_batches()):
                if limit and i >= limit:
                    break
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    outputs = task.evaluate(self.model.encoder, batch.to(self.device))
                for m in batch_metrics:
                    m.update(outputs)
            for m in batch_metrics:
                out.update({f"val/{name}/{k}": v for k, v in m.compute().items()})
            if D.is_main():
                for m in task.metrics:
                    if isinstance(m, DatasetMetric):
                        res = m.evaluate(task=task, model=self.model.encoder, dataset=self.val_set, device=self.device)
                        out.update({f"val/{name}/{k}": v for k, v in res.items()})
        for h in self.hooks:
            h.after_validation(self, out)
        self.model.train()
        return out

    # ----------------------------------------------------------------------------- state
    def _rank_state(self) -> dict:
        """What differs between ranks: RNG streams and data positions."""
        return {"rng": ckpt.rng_state(), "data": {name: s.state_dict() for name, s in self.streams.items()}}

    def state_dict(self) -> dict:
        """The whole run. Under DDP a collective (every rank calls it) that is complete on rank 0:
        ``rng`` and ``data`` are lists indexed by rank."""
        ranks = D.gather_to_main(self._rank_state())
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "chooser": self.chooser.state_dict(),
            "world_size": D.world_size(),
            "data": [r["data"] for r in ranks] if ranks else None,
            "rng": [r["rng"] for r in ranks] if ranks else None,
            "hooks": [h.state_dict() for h in self.hooks],
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict, *, source: str = "checkpoint") -> None:
        """Restore the run; each rank takes its own RNG streams and data positions. A checkpoint
        of another world size is refused: its ranks' streams cannot be dealt to this run's."""
        saved = state.get("world_size")
        if saved is None:
            raise ValueError(f"{source}: no per-rank RNG and data state (written before vlframe saved them); "
                             f"start a new run from its weights with train.init_from={source}")
        if int(saved) != D.world_size():
            raise ValueError(
                f"{source}: written by a run of world size {saved}, this run has world size {D.world_size()}; "
                f"resume with {saved} processes, or start a new run from its weights with train.init_from={source}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.chooser.load_state_dict(state["chooser"])
        for name, s in state["data"][D.rank()].items():
            if name in self.streams:
                self.streams[name].load_state_dict(s)
        ckpt.set_rng_state(state["rng"][D.rank()])
        for h, hs in zip(self.hooks, state.get("hooks", [])):
            h.load_state_dict(hs)
        self.step = int(state["step"])

    def save(self) -> str | None:
        """Every rank calls it (the per-rank states are gathered); rank 0 writes."""
        state = self.state_dict()
        if not D.is_main():
            return None
        path = self._ckpt_path()
        ckpt.atomic_save(state, path)
        ckpt.prune(self.ckpt_dir, int(self.cfg.train.keep_ckpts), current=path)
        for h in self.hooks:
            h.after_checkpoint(self, path)
        return path

    def _ckpt_path(self) -> str:
        return os.path.join(self.ckpt_dir, f"ckpt_{self.step:07d}.pt")

    def _init_weights(self, path: str) -> None:
        """Start from other weights (``train.init_from``): a vlframe checkpoint or exported
        ``.safetensors`` (model and any task heads whose names match), else any file the model's
        own ``load_pretrained`` reads (e.g. a BERT checkpoint); the rest keep their fresh init."""
        state = None if vio.isdir(path) else ckpt.load(path)
        weights = state["model"] if isinstance(state, dict) and "model" in state else state
        if isinstance(weights, dict) and any(k.startswith(("model.", "tasks.")) for k in weights):
            for name, task in self.model.tasks.items():  # heads made from other heads' weights
                weights = {**weights, **task.init_from_pretrained(weights, prefix=f"tasks.{name}.")}
            report = ckpt.load_weights(self.model, weights, source=path)
        else:  # e.g. a BERT checkpoint: the model knows its layout (VLEncoder.load_pretrained)
            report = self.model.encoder.load_pretrained(path)
        if not report.copied:
            raise ValueError(f"train.init_from: {path}: no key matches the model ({len(report.unused)} unused keys)")
        self._report_init(report)

    def _report_init(self, report: ckpt.WeightsReport) -> None:
        """Print the initialisation report, log its summary and keep it in the run folder."""
        if not D.is_main():
            return
        text = report.format()
        print(text, flush=True)
        log.info(text.splitlines()[0])
        os.makedirs(self.work_dir, exist_ok=True)
        with open(os.path.join(self.work_dir, "init_report.txt"), "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def _resume(self, resume: str) -> None:
        """Carry out the start decided in __init__ (``resume.plan_start``): resume or init."""
        start, self._start = self._start, StartPlan()  # drop the read state once loaded
        if start.path is None:
            init_from = self.cfg.train.get("init_from")
            if init_from:
                self._init_weights(init_from)
        else:
            self.load_state_dict(start.state, source=start.path)
            log.info("resumed from %s at step %d", start.path, self.step)
        # What an earlier (killed) run logged after this step is logged again: one line and one
        # TensorBoard point per step.
        self._purge_step = self.step + 1
        if D.is_main():
            truncate_metrics(os.path.join(self.work_dir, "metrics.jsonl"), self.step)

    def _log(self, values: dict[str, float]) -> None:
        if not D.is_main():
            return
        record = {"step": self.step, **values}
        with open(os.path.join(self.work_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.work_dir, "tb"), purge_step=getattr(self, "_purge_step", None))
        for k, v in values.items():
            self._tb.add_scalar(k, v, self.step)
