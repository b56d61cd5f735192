"""The config schema: every top-level key and section key vlframe knows, with its default.

This file is the self-documenting defaults file: one dataclass per section, one comment per
field. ``validate`` checks a loaded config against it (unknown keys, types, required keys).

Conventions:
- ``MISSING`` (omegaconf's ``"???"``) as default marks a required key.
- ``Literal[...]`` marks an enum; the error lists the allowed values.
- ``ge(minimum, default)`` marks a number with a lower bound.
- A field typed ``Component`` holds a component node ``{type: Name, **kwargs}``; which registry
  ``Name`` lives in is decided by the node's position (table in ``validate.py``), and its kwargs
  are checked against the registered class's signature, not against this file.
- To add a key: add a field here with its comment; nothing else is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NewType, get_args

from omegaconf import MISSING

# A component node: a mapping with a ``type`` key plus the class's keyword arguments.
Component = NewType("Component", dict[str, Any])

# Keys of a task node that the trainer consumes itself; they are not passed to the task class.
TASK_RESERVED_KEYS: dict[str, type] = {"mix": float}

AmpMode = Literal["auto", "fp32", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)


def ge(minimum: float, default: Any = MISSING) -> Any:
    """A field whose value must be >= ``minimum`` (checked by ``validate``)."""
    return field(default=default, metadata={"ge": minimum})


@dataclass
class DataConfig:
    """``data:``; besides these keys, any ``data.<split>: {type: ...}`` node is a dataset split."""

    train: Component = MISSING  # training dataset (DATASETS)
    val: Component | None = None  # validation dataset (DATASETS); None = no validation
    sampler: Component = MISSING  # training batch sampler (SAMPLERS), e.g. a unit-budget bucket sampler
    val_batch_units: int = ge(1, 4096)  # text tokens + regions per validation batch
    num_workers: int = ge(0, 0)  # DataLoader worker processes (0 = load in the main process)
    pin_memory: bool | None = None  # pin host memory; None = only when training on CUDA


@dataclass
class TrainConfig:
    """``train:`` the optimisation loop."""

    max_steps: int = ge(0)  # optimizer steps to run (one step = grad_accum micro-batches); 0 = save the init
    grad_accum: int = ge(1, 1)  # micro-batches accumulated per optimizer step
    lr: float = ge(0, 5e-5)  # peak learning rate (AdamW)
    weight_decay: float = ge(0, 0.01)  # AdamW weight decay (not applied to biases and LayerNorm)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = ge(0, 0)  # linear warmup steps, then linear decay to 0 at max_steps
    clip_grad: float = ge(0, 5.0)  # max global grad norm; 0 = no clipping
    amp: AmpMode = "auto"  # auto = bf16 on capable CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    val_interval: int = ge(1, 500)  # validate every this many steps (and at the end)
    val_batches: int = ge(0, 0)  # validation batches per task; 0 = the whole split
    ckpt_interval: int = ge(1, 500)  # checkpoint every this many steps (and at the end)
    log_interval: int = ge(1, 10)  # log metrics every this many steps
    keep_ckpts: int = ge(1, 2)  # step checkpoints kept in work_dir (older ones are deleted)
    resume: str = "auto"  # auto = latest checkpoint in work_dir if any | never | <checkpoint path>
    init_from: str | None = None  # weights to start from (checkpoint path); None = fresh init
    # learning-rate factor per parameter-name prefix, e.g. {tasks.vqa.head: 10} (the original's head lr x10)
    lr_mult: dict[str, float] = field(default_factory=dict)
    progress: bool = True  # console progress bar
    # task-mix phases before the tasks' own mix applies, e.g. [{until_step: 600, mix: {itm: 1}}]:
    # a curriculum (the tiny from-scratch demo warms ITM+WRA up before the paper's mix)
    phases: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Config:
    """The whole config file (after ``_base_`` merging and overrides)."""

    custom_imports: list[str] = field(default_factory=list)  # user modules imported before building
    vars: dict[str, Any] = field(default_factory=dict)  # free values for interpolation: ${vars.hidden}
    seed: int = 0  # global seed (python, numpy, torch; data order)
    work_dir: str | None = None  # run folder; None = work_dirs/<config file stem>
    model: Component = MISSING  # the model (MODELS)
    tasks: dict[str, Component] = field(default_factory=dict)  # name -> task node (TASKS), + mix: float = 1
    data: DataConfig = field(default_factory=DataConfig)  # datasets, sampler and loader settings
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation loop
    hooks: list[Component] = field(default_factory=list)  # trainer hooks (HOOKS), run in order
    launcher: Component | None = None  # how to launch (LAUNCHERS); None = in this process
