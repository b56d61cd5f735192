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
Launcher = Literal["local", "slurm"]
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
    # a step whose loss is NaN/inf (on any rank) is skipped; this many in a row stop the run with
    # an error naming the step and the task (fp16 overflow of the gradients alone only lowers the scale)
    max_bad_steps: int = ge(1, 10)
    # auto = bf16 on GPUs with native bf16 (A100, H100), else fp16 with a GradScaler (V100); fp32 on CPU
    amp: AmpMode = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    val_interval: int = ge(1, 500)  # validate every this many steps (and at the end)
    val_batches: int = ge(0, 0)  # validation batches per task; 0 = the whole split
    ckpt_interval: int = ge(1, 500)  # checkpoint every this many steps (and at the end)
    log_interval: int = ge(1, 10)  # log metrics every this many steps
    keep_ckpts: int = ge(1, 2)  # newest readable step checkpoints kept (older readable ones are deleted)
    # validation metric whose best value keeps its state as checkpoints/best.pt, e.g. "val/itm/itm_acc"
    keep_best: str | None = None
    keep_best_mode: Literal["max", "min"] = "max"  # whether a higher or a lower keep_best value is better
    resume: str = "auto"  # auto = latest checkpoint in work_dir if any | never | <checkpoint path>
    # resume=auto even where the checkpoint's config differs in keys not safe to change on resume
    # (vlframe/engine/resume.py SAFE_ON_RESUME); otherwise such a resume is refused naming the keys
    resume_changed_config: bool = False
    init_from: str | None = None  # weights to start from (checkpoint path); None = fresh init
    # learning-rate factor per parameter-name prefix, e.g. {tasks.vqa.head: 10} (the original's head lr x10)
    lr_mult: dict[str, float] = field(default_factory=dict)
    progress: bool = True  # console progress bar
    # task-mix phases before the tasks' own mix applies, e.g. [{until_step: 600, mix: {itm: 1}}]:
    # a curriculum (the tiny from-scratch demo warms ITM+WRA up before the paper's mix)
    phases: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SlurmConfig:
    """``slurm:`` the job ``launcher: slurm`` submits through submitit (vlframe.launch.slurm)."""

    nodes: int = ge(1, 1)  # nodes of the job
    tasks_per_node: int = ge(1, 1)  # processes per node: one per GPU (DDP ranks = nodes x tasks_per_node)
    gpus_per_node: int = ge(0, 0)  # GPUs per node; 0 = no GPU request at all (CPU nodes)
    cpus_per_task: int = ge(1, 1)  # CPU cores per process (data workers + 1)
    mem_gb: float | None = None  # memory per node in GB; None = the partition's default
    partition: str | None = None  # None = the cluster's default partition
    account: str | None = None  # account charged; None = your default
    qos: str | None = None  # quality of service; None = default
    time_min: int = ge(1, 60)  # time limit of one run of the job, minutes (requeues start it afresh)
    constraint: str | None = None  # node features, e.g. volta32gb
    job_name: str | None = None  # None = the run folder's name
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)
    additional: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {dependency: afterok:123}
    signal_delay_s: int = ge(0, 120)  # USR2 this many seconds before the time limit (checkpoint + requeue)
    max_num_timeout: int = ge(0, 3)  # requeues after time-outs (preemptions requeue without limit)
    array_parallelism: int = ge(1, 256)  # sweeps: array tasks running at once


@dataclass
class Config:
    """The whole config file (after ``_base_`` merging and overrides)."""

    custom_imports: list[str] = field(default_factory=list)  # user modules imported before building
    vars: dict[str, Any] = field(default_factory=dict)  # free values for interpolation: ${vars.hidden}
    seed: int = 0  # global seed: data order and masks; python, numpy, torch get seed + rank (own stream per rank)
    work_dir: str | None = None  # run folder; None = work_dirs/<config file stem>
    model: Component = MISSING  # the model (MODELS)
    tasks: dict[str, Component] = field(default_factory=dict)  # name -> task node (TASKS), + mix: float = 1
    data: DataConfig = field(default_factory=DataConfig)  # datasets, sampler and loader settings
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation loop
    hooks: list[Component] = field(default_factory=list)  # trainer hooks (HOOKS), run in order
    launcher: Launcher = "local"  # local = train in this process | slurm = submit a job as slurm: says
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # the SLURM job (read when launcher=slurm, and by sweeps)
