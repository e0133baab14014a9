"""Typed training configuration and the DeepSpeed config built from it.

`TrainConfig` is the job-file section of the `stage1` / `stage2` steps (parsed by
`owl.configs.build_dataclass`); the papers' recipes are the job files jobs/owl1-llama-7b.yaml and
jobs/owl2-llama2-7b.yaml. Plain data: importing this module needs neither DeepSpeed nor Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# DeepSpeed prints every `steps_per_print` steps; our own metrics replace that.
_NEVER = 1 << 30


@dataclass(frozen=True)
class EvaluateDuringTraining:
    """What a stage with `evaluate_every` scores at each of those steps (docs/pipeline.md): the
    benchmark files (or import specs, `@role/...` paths) and the Ray actors that score them,
    beside the training workers. Scoring as the `evaluate` step does (owl.eval.evaluate), without
    the blank-image pass and METEOR."""

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

        if self.vqa_rule not in VQA_RULES:
            raise ValueError(f"evaluate.vqa_rule: {self.vqa_rule!r} is not one of {VQA_RULES}")
        if self.caption_tokenizer not in CAPTION_TOKENIZERS:
            raise ValueError(
                f"evaluate.caption_tokenizer: {self.caption_tokenizer!r} is not one of "
                f"{CAPTION_TOKENIZERS}"
            )
        for entry in self.benchmarks:
            parse_spec(entry)  # a malformed import spec fails when the job file is read


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Steps are optimizer steps (after gradient accumulation)."""

    stage: int = 1
    # Optimizer: AdamW; weight decay on matrices only (not on norms, biases, embeddings' scales).
    lr: float = 1e-4
    abstractor_lr: float = 0.0  # 0 = same as `lr`
    vit_layer_decay: float = 1.0  # lr of ViT block i = lr * decay ** (num_layers - i); 1 = off
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Schedule: linear warm-up then cosine to `min_lr_ratio * lr`. `warmup_steps` wins when > 0.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    # Length: `max_steps` wins when > 0, else `epochs` passes over the data.
    max_steps: int = 0
    epochs: int = 1
    # Batching: rows per micro-batch per worker; global batch = micro * accum * workers rows.
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    packing: bool = True
    max_images_per_row: int = 8
    packing_window: int = 16  # open rows the packer tries before starting a new one
    # Data loading: "streaming" deals shards to workers and reads each worker's shards in
    # shuffle buffers of `shuffle_buffer` samples (owl.data.loader.StreamingLoader); "global"
    # plans the whole dataset on every worker (the earlier ShardLoader). See docs/pipeline.md.
    loader: str = "streaming"
    shuffle_buffer: int = 16384
    # Data mixing (loader=streaming): more tokenized datasets drawn together with the stage's
    # `data` input, {folder: weight}; a folder is a tokenize step's output (with its
    # manifest.json), possibly `@role/...`. The `data` input has weight `data_weight`; every
    # shuffle buffer takes samples from each dataset in proportion to its weight.
    mix: dict[str, float] = dataclasses.field(default_factory=dict)
    data_weight: float = 1.0
    # Memory: ZeRO stage (0, 2 or 3) and activation checkpointing of decoder/ViT layers.
    zero_stage: int = 2
    activation_checkpointing: bool = False
    # Bookkeeping.
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    # Owl1 stage 2 only: LoRA on the decoder, and whether the abstractor trains too (the paper
    # says it does; the authors' release froze it).
    train_abstractor_in_stage2: bool = False
    # Which parameters train: "paper" = the recipe of the paper for this variant and stage (see
    # owl.train.stages); "all" = every parameter, no LoRA. A model whose language model starts
    # from random weights (the demo) has no language to keep frozen, so it trains "all".
    trainable: str = "paper"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    merge_lora: bool = True  # export merged weights; False keeps the adapter apart
    # Stage 1 only: a model folder to start from (e.g. converted CLIP + LLaMA weights); empty =
    # random init from the model config. May be `@role/path`.
    init_model: str = ""
    # Cluster: one Ray Train worker per `num_workers`. `num_workers` x `grad_accum` also defines
    # the sample stream and the global batch (owl.data.step_stream), whatever the number of
    # workers that actually run: when the cluster offers fewer, `fewer_workers: wait` waits for
    # `num_workers`; `continue` runs with what is there (at least `min_workers`), each worker
    # accumulating more micro-batches, and resumes a checkpoint saved by another number of
    # workers through DeepSpeed's universal checkpoint (docs/pipeline.md).
    num_workers: int = 1
    fewer_workers: str = "wait"
    min_workers: int = 1
    # Memory of one GPU, GiB: `owl run` (and --dry-run) refuses a stage whose memory plan
    # (owl.train.memory: model states + activations per worker) exceeds it. 0 = no check.
    gpu_memory_gib: float = 0.0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    # Evaluation during training: every `evaluate_every` steps (a multiple of checkpoint_every;
    # 0: never) the model of that step is scored on `evaluate.benchmarks` by Ray actors while
    # training goes on; the metrics are curves of the stage (MLflow metrics at that step).
    evaluate_every: int = 0
    evaluate: EvaluateDuringTraining = dataclasses.field(default_factory=EvaluateDuringTraining)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides)


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.stage in (1, 2), "stage must be 1 or 2"),
        (cfg.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.abstractor_lr >= 0, "abstractor_lr must be >= 0 (0 = same as lr)"),
        (0 < cfg.vit_layer_decay <= 1, "vit_layer_decay must be in (0, 1]"),
        (cfg.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
        (cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (cfg.max_length >= 2, "max_length must be >= 2"),
        (cfg.max_images_per_row >= 1, "max_images_per_row must be >= 1"),
        (cfg.max_steps > 0 or cfg.epochs > 0, "set max_steps > 0 or epochs > 0"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (cfg.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
        (cfg.log_every >= 1, "log_every must be >= 1"),
        (cfg.num_workers >= 1, "num_workers must be >= 1"),
        (cfg.fewer_workers in ("wait", "continue"), "fewer_workers must be 'wait' or 'continue'"),
        (1 <= cfg.min_workers <= cfg.num_workers, "min_workers must be in [1, num_workers]"),
        (cfg.gpu_memory_gib >= 0, "gpu_memory_gib must be >= 0 (0 = no check)"),
        (cfg.trainable in ("paper", "all"), "trainable must be 'paper' or 'all'"),
        (cfg.loader in ("streaming", "global"), "loader must be 'streaming' or 'global'"),
        (cfg.shuffle_buffer >= 1, "shuffle_buffer must be >= 1"),
        (not cfg.mix or cfg.loader == "streaming", "mix needs loader: streaming"),
        (all(w > 0 for w in [cfg.data_weight, *cfg.mix.values()]), "mix weights must be > 0"),
        (len(cfg.betas) == 2, "betas must be two numbers"),
        (cfg.evaluate_every >= 0, "evaluate_every must be >= 0 (0: no evaluation)"),
        (
            cfg.evaluate_every % cfg.checkpoint_every == 0,
            f"evaluate_every ({cfg.evaluate_every}) must be a multiple of checkpoint_every "
            f"({cfg.checkpoint_every}): each evaluated model is a checkpoint's",
        ),
        (
            not cfg.evaluate_every or bool(cfg.evaluate.benchmarks),
            "evaluate_every needs evaluate.benchmarks (benchmark files to score)",
        ),
        (cfg.evaluate.limit >= 0, "evaluate.limit must be >= 0 (0: every item)"),
        (cfg.evaluate.num_workers >= 1, "evaluate.num_workers must be >= 1"),
        (cfg.evaluate.batch_size >= 1, "evaluate.batch_size must be >= 1"),
        (
            cfg.evaluate.cpus_per_worker >= 0 and cfg.evaluate.gpus_per_worker >= 0,
            "evaluate.cpus_per_worker and gpus_per_worker must be >= 0",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"train: {message}")


def mixture_weights(mix: dict[str, float], data_weight: float) -> dict[str, float]:
    """A stage's datasets and weights, its `data` input first; {} when it does not mix."""
    return {"data": data_weight, **mix} if mix else {}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


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
    return -(-cfg.num_workers * cfg.grad_accum // world_size)


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
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True)
    if cfg.zero_stage == 3:
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
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch_size * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
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
