"""Typed training configuration and the DeepSpeed config built from it.

`TrainConfig` is the job-file section of the `stage1` / `stage2` steps (parsed by
`owl.configs.build_dataclass`), in sections, one per concern:

    stage1:
      stage: 1                     # and seed, trainable, train_abstractor_in_stage2,
                                   # init_model, log_every: the stage itself
      optimizer:  {lr, abstractor_lr, vit_layer_decay, betas, eps, weight_decay, grad_clip}
      schedule:   {warmup_steps, warmup_ratio, min_lr_ratio, max_steps, epochs}
      batch:      {micro_batch_size, grad_accum, max_length, packing, max_images_per_row,
                   packing_window}
      data:       {loader, shuffle_buffer, mix, data_weight}
      memory:     {zero_stage, activation_checkpointing, gpu_memory_gib}
      lora:       {r, alpha, dropout, targets, merge}
      checkpoint: {every, keep}
      resources:  {num_workers, fewer_workers, min_workers, cpus_per_worker, gpus_per_worker,
                   max_failures}     (the `resources:` every step section has, with more fields)
      evaluate:   {every, benchmarks, limit, ...}   (evaluation during training)

A key of the earlier flat layout (`stage1.lr`) is refused with its new place (`MOVED`). The
papers' recipes are the job files jobs/owl1-llama-7b.yaml and jobs/owl2-llama2-7b.yaml. Plain
data: importing this module needs neither DeepSpeed nor Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

# DeepSpeed prints every `steps_per_print` steps; our own metrics replace that.
_NEVER = 1 << 30


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW; weight decay on matrices only (not on norms, biases, embeddings' scales)."""

    lr: float = 1e-4
    abstractor_lr: float = 0.0  # 0 = same as `lr`
    vit_layer_decay: float = 1.0  # lr of ViT block i = lr * decay ** (num_layers - i); 1 = off
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check([
            (self.lr > 0, "lr must be > 0"),
            (self.abstractor_lr >= 0, "abstractor_lr must be >= 0 (0 = same as lr)"),
            (0 < self.vit_layer_decay <= 1, "vit_layer_decay must be in (0, 1]"),
            (len(self.betas) == 2, "betas must be two numbers"),
        ])  # fmt: skip


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up then cosine to `min_lr_ratio * lr` (`warmup_steps` wins when > 0); the
    stage's length: `max_steps` optimizer steps when > 0, else `epochs` passes over the data."""

    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_steps: int = 0
    epochs: int = 1

    def __post_init__(self) -> None:
        _check([
            (self.max_steps > 0 or self.epochs > 0, "set max_steps > 0 or epochs > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        ])  # fmt: skip


@dataclass(frozen=True)
class BatchConfig:
    """Rows per micro-batch per worker; global batch = micro_batch_size x grad_accum x
    resources.num_workers rows. Packing fills each row of `max_length` tokens with samples."""

    micro_batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    packing: bool = True
    max_images_per_row: int = 8
    packing_window: int = 16  # open rows the packer tries before starting a new one

    def __post_init__(self) -> None:
        _check([
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.max_images_per_row >= 1, "max_images_per_row must be >= 1"),
        ])  # fmt: skip


@dataclass(frozen=True)
class DataConfig:
    """How the stage reads its data. `loader: streaming` deals shards to workers and reads each
    worker's shards in shuffle buffers of `shuffle_buffer` samples (owl.data.streaming
    .StreamingLoader); `global` plans the whole dataset on every worker (ShardLoader). See
    docs/pipeline.md. Mixing (streaming only): more tokenized datasets drawn together with the
    stage's `data` input, {folder: weight}; a folder is a tokenize step's output (with its
    manifest.json), possibly `@role/...`, or a tokenize step of the job by name. The `data` input
    has weight `data_weight`; every shuffle buffer takes samples from each dataset in proportion
    to its weight."""

    loader: str = "streaming"
    shuffle_buffer: int = 16384
    mix: dict[str, float] = dataclasses.field(default_factory=dict)
    data_weight: float = 1.0

    def __post_init__(self) -> None:
        _check([
            (self.loader in ("streaming", "global"), "loader must be 'streaming' or 'global'"),
            (self.shuffle_buffer >= 1, "shuffle_buffer must be >= 1"),
            (not self.mix or self.loader == "streaming", "mix needs loader: streaming"),
            (all(w > 0 for w in [self.data_weight, *self.mix.values()]), "mix weights must be > 0"),
        ])  # fmt: skip


@dataclass(frozen=True)
class MemoryConfig:
    """ZeRO stage (0 to 3), activation checkpointing of decoder/ViT layers, and the memory of one
    GPU in GiB: `owl run` (and --dry-run) refuses a stage whose memory plan (owl.train.memory:
    model states + activations per worker) exceeds it; 0 = no check."""

    zero_stage: int = 2
    activation_checkpointing: bool = False
    gpu_memory_gib: float = 0.0

    def __post_init__(self) -> None:
        _check([
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (self.gpu_memory_gib >= 0, "gpu_memory_gib must be >= 0 (0 = no check)"),
        ])  # fmt: skip


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the decoder (Owl1 stage 2 with `trainable: paper`; owl.train.stages); `merge`:
    export merged weights, or false to keep the adapter apart."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    merge: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint every `every` optimizer steps (and at the last); Ray Train keeps `keep`."""

    every: int = 100
    keep: int = 2

    def __post_init__(self) -> None:
        _check([(self.every >= 1, "every must be >= 1")])


@dataclass(frozen=True)
class ResourcesConfig:
    """One Ray Train worker per `num_workers`. `num_workers` x `batch.grad_accum` also defines
    the sample stream and the global batch (owl.data.step_stream), whatever the number of workers
    that actually run: when the cluster offers fewer, `fewer_workers: wait` waits for
    `num_workers`; `continue` runs with what is there (at least `min_workers`), each worker
    accumulating more micro-batches, and resumes a checkpoint saved by another number of workers
    through DeepSpeed's universal checkpoint (docs/pipeline.md). `max_failures`: worker failures
    Ray Train restarts the stage after."""

    num_workers: int = 1
    fewer_workers: str = "wait"
    min_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        _check([
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.fewer_workers in ("wait", "continue"),
             "fewer_workers must be 'wait' or 'continue'"),
            (1 <= self.min_workers <= self.num_workers, "min_workers must be in [1, num_workers]"),
        ])  # fmt: skip


@dataclass(frozen=True)
class EvaluateDuringTraining:
    """Evaluation during training (docs/pipeline.md): every `every` steps (a multiple of
    checkpoint.every; 0: never) the model of that step is scored on `benchmarks` (files or import
    specs, `@role/...` paths) by Ray actors beside the training workers, while training goes on;
    the metrics are curves of the stage (MLflow metrics at that step). Scoring as the `evaluate`
    step does (owl.eval.evaluate), without the blank-image pass and METEOR."""

    every: int = 0
    benchmarks: tuple[str, ...] = ()
    limit: int = 0  # first N items of each benchmark (0: all)
    num_workers: int = 1  # Ray actors; each loads the checkpoint's model once
    cpus_per_worker: float = 1.0  # 0: the actors take no CPU of the cluster's (share the cores)
    gpus_per_worker: float = 0.0
    batch_size: int = 16
    vqa_rule: str = "vqav2"
    caption_tokenizer: str = "ptb"

    def __post_init__(self) -> None:
        from owl.eval.importers import parse_spec
        from owl.eval.metrics import CAPTION_TOKENIZERS, VQA_RULES

        _check([
            (self.every >= 0, "every must be >= 0 (0: no evaluation)"),
            (not self.every or bool(self.benchmarks),
             "every needs benchmarks (benchmark files to score)"),
            (self.limit >= 0, "limit must be >= 0 (0: every item)"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.cpus_per_worker >= 0 and self.gpus_per_worker >= 0,
             "cpus_per_worker and gpus_per_worker must be >= 0"),
            (self.vqa_rule in VQA_RULES, f"vqa_rule: {self.vqa_rule!r} is not one of {VQA_RULES}"),
            (self.caption_tokenizer in CAPTION_TOKENIZERS,
             f"caption_tokenizer: {self.caption_tokenizer!r} is not one of {CAPTION_TOKENIZERS}"),
        ])  # fmt: skip
        for entry in self.benchmarks:
            parse_spec(entry)  # a malformed import spec fails when the job file is read


# Where each key of the earlier flat TrainConfig lives now (build_dataclass refuses an old key
# with its new place: "stage1.lr moved to stage1.optimizer.lr").
MOVED = {
    **{k: f"optimizer.{k}" for k in ("lr", "abstractor_lr", "vit_layer_decay", "betas", "eps")},
    **{k: f"optimizer.{k}" for k in ("weight_decay", "grad_clip")},
    **{k: f"schedule.{k}" for k in ("warmup_steps", "warmup_ratio", "min_lr_ratio")},
    **{k: f"schedule.{k}" for k in ("max_steps", "epochs")},
    **{k: f"batch.{k}" for k in ("micro_batch_size", "grad_accum", "max_length", "packing")},
    **{k: f"batch.{k}" for k in ("max_images_per_row", "packing_window")},
    **{k: f"data.{k}" for k in ("loader", "shuffle_buffer", "mix", "data_weight")},
    **{k: f"memory.{k}" for k in ("zero_stage", "activation_checkpointing", "gpu_memory_gib")},
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "merge_lora": "lora.merge",
    "checkpoint_every": "checkpoint.every",
    "keep_checkpoints": "checkpoint.keep",
    **{k: f"resources.{k}" for k in ("num_workers", "fewer_workers", "min_workers")},
    **{k: f"resources.{k}" for k in ("cpus_per_worker", "gpus_per_worker", "max_failures")},
    "evaluate_every": "evaluate.every",
}


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Steps are optimizer steps (after gradient accumulation)."""

    MOVED: ClassVar[dict[str, str]] = MOVED

    stage: int = 1
    seed: int = 0
    # Which parameters train: "paper" = the recipe of the paper for this variant and stage (see
    # owl.train.stages); "all" = every parameter, no LoRA. A model whose language model starts
    # from random weights (the demo) has no language to keep frozen, so it trains "all".
    trainable: str = "paper"
    # Owl1 stage 2 only: whether the abstractor trains beside the LoRA decoder (the paper says
    # it does; the authors' release froze it).
    train_abstractor_in_stage2: bool = False
    # Stage 1 only: a model folder to start from (e.g. converted CLIP + LLaMA weights); empty =
    # random init from the model config. May be `@role/path`.
    init_model: str = ""
    log_every: int = 10  # optimizer steps per logged metrics window
    optimizer: OptimizerConfig = _section(OptimizerConfig)
    schedule: ScheduleConfig = _section(ScheduleConfig)
    batch: BatchConfig = _section(BatchConfig)
    data: DataConfig = _section(DataConfig)
    memory: MemoryConfig = _section(MemoryConfig)
    lora: LoraConfig = _section(LoraConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    resources: ResourcesConfig = _section(ResourcesConfig)
    evaluate: EvaluateDuringTraining = _section(EvaluateDuringTraining)

    def __post_init__(self) -> None:
        every, checkpoint_every = self.evaluate.every, self.checkpoint.every
        _check([
            (self.stage in (1, 2), "stage must be 1 or 2"),
            (self.trainable in ("paper", "all"), "trainable must be 'paper' or 'all'"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (every % checkpoint_every == 0,
             f"evaluate.every ({every}) must be a multiple of checkpoint.every "
             f"({checkpoint_every}): each evaluated model is a checkpoint's"),
        ])  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`; a section given as a dict changes only the fields it names
        (`cfg.replace(schedule={"max_steps": 2}, stage=2)`)."""
        for name, value in changes.items():
            if isinstance(value, dict) and dataclasses.is_dataclass(getattr(self, name)):
                changes[name] = dataclasses.replace(getattr(self, name), **value)
        return dataclasses.replace(self, **changes)


def mixture_weights(mix: dict[str, float], data_weight: float) -> dict[str, float]:
    """A stage's datasets and weights, its `data` input first; {} when it does not mix."""
    return {"data": data_weight, **mix} if mix else {}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    schedule = cfg.schedule
    if schedule.warmup_steps > 0:
        return min(schedule.warmup_steps, total_steps)
    return int(schedule.warmup_ratio * total_steps)


def lr_multiplier(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to `min_ratio` at `total`.

    `step` counts optimizer steps already taken (LambdaLR calls it with 0 before the first one),
    so the first update uses lr / warmup.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def worker_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches each of `world_size` workers runs per optimizer step: the stage's
    num_workers x grad_accum micro-batches shared out (owl.data.step_stream), rounded up."""
    return -(-cfg.resources.num_workers * cfg.batch.grad_accum // world_size)


def deepspeed_config(
    cfg: TrainConfig, *, world_size: int, on_gpu: bool, hidden: int = 0
) -> dict[str, Any]:
    """The DeepSpeed config dict for this stage: ZeRO, precision, clipping, accumulation, AdamW.

    Per-group learning rates and weight decay come from the parameter groups handed to
    `deepspeed.initialize`; the schedule is a LambdaLR over `lr_multiplier` (exact on resume).
    Under ZeRO-3, `hidden` (the decoder width) sizes the gradient-reduction and prefetch buckets,
    the threshold below which a parameter stays whole (hidden^2, 0.9 hidden^2, 10 hidden) and
    how many gathered parameters stay live (24 hidden^2): DeepSpeed's defaults (5e8-element
    buckets, 1e9 live parameters) let a model below a billion parameters be gathered whole.
    """
    zero_stage = cfg.memory.zero_stage
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True)
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
        if hidden > 0:
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                stage3_param_persistence_threshold=10 * hidden,
                # Gathered parameters kept live / reused without a re-gather: about two decoder
                # layers' worth (DeepSpeed's 1e9 default keeps a whole model below 1B gathered).
                stage3_max_live_parameters=24 * hidden * hidden,
                stage3_max_reuse_distance=24 * hidden * hidden,
            )
    accum = worker_grad_accum(cfg, world_size)
    micro, optimizer = cfg.batch.micro_batch_size, cfg.optimizer
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                # torch's AdamW: on GPU its fused CUDA kernel (`fused`). DeepSpeed's own
                # FusedAdam is compiled at first use (JIT: nvcc and the CUDA toolkit, which a
                # machine with torch's CUDA wheel need not have, and a minute of start-up).
                "torch_adam": True,
                "adam_w_mode": True,
                **({"fused": True} if on_gpu else {}),
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
