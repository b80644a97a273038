"""QLoRA fine-tuning with TRL's SFTTrainer: one function, ``run_training``, used by the train
stage and by every search trial.

Eval loss comes from a held-out slice of the *train* split (split by image, so no image is on
both sides); the test split is never seen here. Checkpoints live under a folder keyed by
everything that determines the result, so a killed run resumes from its last checkpoint and a
changed param starts afresh.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from . import distributed
from .config import ConfigError, as_dict, build, require
from .model import LoraSettings
from .provenance import code_signature, folder_signature

log = logging.getLogger(__name__)

PARTIAL_MARKER = "PARTIAL"
SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
              "polynomial", "inverse_sqrt")


@dataclasses.dataclass
class TrainConfig:
    """`train:` — model set-up, data and optimisation of the fine-tuning run."""

    # Model. none | 4bit (nf4 + double quant, the guide's QLoRA) | 8bit. bitsandbytes 0.50 runs
    # 4-bit on CPU too (slower than float32 at the tiny model's size, but the same recipe).
    quantization: Literal["none", "4bit", "8bit"] = "4bit"
    # Matmul dtype of the quantized layers. auto: bfloat16 on GPU, float32 on CPU (CPU bf16 is slow).
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Dtype of the non-quantized weights; auto keeps the checkpoint's (MedGemma: bfloat16).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Mixed precision of the step. auto: bf16 on a GPU that has it, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # sdpa: ~4x the guide's eager throughput on an H100 (gpu-anchor.md).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Recompute activations in the backward pass: ~30% slower, a fraction of the memory.
    gradient_checkpointing: bool = True
    # Vision features once per distinct image, reused by all its QA and every epoch (~9 QA per
    # Kvasir image, ~5.5 TFLOP per 896 px image on MedGemma): identical features while the vision
    # tower and projector are frozen; skipped (logged) when they train. vqatune.speed.
    cache_image_features: bool = True
    # With the cache: every distinct train and eval image's features computed before the first
    # step (one pass in batches), so no step runs the vision tower and all steps have the same
    # shapes (what a compiled step needs); the features are stored under each img_id, so the
    # training batches carry keys, not pixels (no image is decoded or processed during the
    # steps: ~1.6 s of CPU per batch of 32 at 896 px). Without it they are computed in the first
    # step that shows the image. The features are the same up to float rounding (the tower sees
    # other batch compositions). Tiny model, CPU: equal losses with LoRA dropout off, ~5e-4
    # apart with it (precomputing draws a DataLoader seed from torch's RNG: other dropout masks).
    precompute_image_features: bool = True
    # torch.compile each transformer layer (vqatune.speed.compile_layers): fewer, fused kernels
    # for a step that is otherwise CPU-bound on a fast GPU. null = on with CUDA, off on CPU.
    # H100, MedGemma-4B shapes, batch 32, checkpointing, precomputed features (benchmarks/
    # results/ddp_bench_h100x2_*.json, train_levers_h100*.json): ~1.6x in steady state; the first
    # steps pay 1-1.5 min of compilation, and a new shape can still recompile once (one stall of
    # 32 s in 40 steps was seen). Where compiling fails, the layers run eagerly.
    compile: Optional[bool] = None
    # The language model's residual stream in fp32 while its weights stay bf16 (or nf4). In a
    # bf16 stream an adapter's early updates are smaller than half a bf16 step of the layer
    # output they are added to and round away: on MedGemma-4B shapes the first AdamW step bought
    # 0.68 of the loss drop the guide's fp32 recipe got (benchmarks/results/gpu_bench_h100.json),
    # and at lr 5e-5 none of it (CPU, nf4, scaled tiny model). No effect on fp32 models.
    fp32_residual: bool = True
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)

    # Data. The prompt mode trained on (evaluation still tries all three).
    prompt_mode: Literal["none", "static", "adaptive"] = "none"
    # Share of the train split's images held out for the eval loss (never the test split).
    eval_fraction: float = 0.1
    max_eval_rows: Optional[int] = None
    padding_side: Literal["left", "right"] = "right"
    # Longest sequence; longer answers are cut (prompts never: Gemma 3 needs every image token).
    max_length: Optional[int] = None

    # Optimisation. max_steps > 0 overrides epochs.
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    # Warm-up: a share of the steps when < 1, else a step count.
    warmup: float = 0.03
    batch_size: int = 4
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    # QLoRA's 0.3: clipping keeps the small-batch adapter updates stable.
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    # adamw_torch runs everywhere; paged_adamw_8bit saves GPU memory on the real model.
    optimizer: str = "adamw_torch"
    seed: int = 0
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    save_total_limit: int = 2
    # Stop after this many evaluations without a better eval loss; 0 turns early stopping off.
    early_stopping_patience: int = 0
    load_best_model_at_end: bool = True
    dataloader_num_workers: int = 0
    # Torch threads on CPU. 1 suits the tiny model: its ops are too small to split, and idle
    # worker threads spin against other processes (2 threads on a busy 2-core box ran ~10x
    # slower). null = torch's default. No effect on GPU runs.
    cpu_threads: Optional[int] = 1
    # Data-parallel processes (one per GPU, DDP through `accelerate launch`; vqatune.distributed).
    # auto = every visible GPU. The environment's VQATUNE_NUM_PROCESSES wins. batch_size x
    # gradient_accumulation_steps stays the global batch: each process takes its share.
    num_processes: Union[int, str] = 1

    def validate(self, p: str) -> None:
        from transformers.training_args import OptimizerNames

        require(0.0 < self.eval_fraction < 1.0, f"{p}.eval_fraction", "must be between 0 and 1 (exclusive)")
        require(self.epochs > 0 or self.max_steps > 0, f"{p}.epochs", "must be positive (or set max_steps)")
        require(self.max_steps == -1 or self.max_steps > 0, f"{p}.max_steps", "must be -1 (use epochs) or positive")
        require(self.learning_rate > 0, f"{p}.learning_rate", "must be positive (the guide searches 1e-6 .. 1e-4)")
        require(self.lr_scheduler in SCHEDULERS, f"{p}.lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
        require(self.warmup >= 0, f"{p}.warmup", "must be >= 0 (a share of steps when < 1, else steps)")
        for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "eval_steps",
                    "save_steps", "logging_steps", "save_total_limit"):
            require(getattr(self, key) >= 1, f"{p}.{key}", "must be a positive integer")
        require(self.max_grad_norm > 0, f"{p}.max_grad_norm", "must be positive")
        require(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        require(self.early_stopping_patience >= 0, f"{p}.early_stopping_patience", "must be >= 0 (0 = off)")
        require(self.max_eval_rows is None or self.max_eval_rows >= 1, f"{p}.max_eval_rows",
                "must be null or a positive integer")
        require(self.max_length is None or self.max_length >= 16, f"{p}.max_length", "must be null or >= 16")
        require(self.dataloader_num_workers >= 0, f"{p}.dataloader_num_workers", "must be >= 0")
        require(self.cpu_threads is None or self.cpu_threads >= 1, f"{p}.cpu_threads",
                "must be null (torch's default) or a positive integer")
        require(self.num_processes == "auto" or (isinstance(self.num_processes, int) and self.num_processes >= 1),
                f"{p}.num_processes", "must be a positive integer or 'auto' (one process per GPU)")
        names = [o.value for o in OptimizerNames]
        require(self.optimizer in names, f"{p}.optimizer", "must be a transformers optimizer name "
                "(transformers.training_args.OptimizerNames), e.g. adamw_torch, paged_adamw_8bit, adafactor")
        require(not self.load_best_model_at_end or self.save_steps % self.eval_steps == 0, f"{p}.save_steps",
                "must be a multiple of eval_steps when load_best_model_at_end is true")
        require(self.early_stopping_patience == 0 or self.load_best_model_at_end,
                f"{p}.early_stopping_patience", "needs load_best_model_at_end: true")
        self.lora.validate(f"{p}.lora")


def apply_overrides(train_cfg: TrainConfig, params: dict[str, Any], prefix: str = "train") -> TrainConfig:
    """A copy of ``train_cfg`` with dotted keys (``lora.r``, ``learning_rate``) replaced.

    Unknown keys and bad values raise ConfigError naming the key, exactly as in params.yaml.
    """
    raw = as_dict(train_cfg)
    for dotted, value in params.items():
        node, *path = dotted.split(".")
        target = raw
        keys = [node] + path
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                raise ConfigError(f"{prefix}.{dotted}: unknown key; {prefix}.{key} is not a section")
            target = target[key]
        if keys[-1] not in target:
            raise ConfigError(f"{prefix}.{dotted}: unknown key; allowed here: {', '.join(sorted(target))}")
        target[keys[-1]] = value
    return build(TrainConfig, raw, prefix)


def load_hyperparameters(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(overrides, source) from the search stage's ``best_params.json``; none if it didn't search."""
    if path is None or not Path(path).exists():
        return {}, "params.yaml"
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
        raise ConfigError(f"{path}: expected {{\"searched\": bool, \"params\": {{...}}}}")
    if not data.get("searched", False) or not data.get("params"):
        return {}, "params.yaml"
    return dict(data["params"]), f"search ({path})"


@dataclasses.dataclass
class TrainResult:
    train_loss: Optional[float]
    eval_loss: Optional[float]
    eval_loss_start: Optional[float]
    best_eval_loss: Optional[float]
    steps: int
    epochs: float
    train_rows: int
    eval_rows: int
    examples_per_s: float
    seconds: float
    peak_memory_gib: float
    trainable_params: int
    total_params: int
    trainable_share: float
    device: str
    quantization: str
    compute_dtype: str
    precision: str
    fp32_residual: bool          # the residual stream ran in fp32 (train.fp32_residual with mixed precision)
    compiled_layers: int         # transformer layers compiled (train.compile; 0 = eager)
    resumed: bool
    resumed_from_step: int
    partial: bool
    checkpoint_dir: str
    log_history: list = dataclasses.field(default_factory=list, repr=False)

    def metrics(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("log_history")
        return out


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped training; the adapter so far was saved, marked partial."""

    def __init__(self, result: TrainResult):
        super().__init__(f"training interrupted at step {result.steps}; partial adapter saved")
        self.result = result


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def split_train_eval(train, eval_fraction: float, seed: int, max_eval_rows: Optional[int] = None):
    """Hold out ``eval_fraction`` of the train split's *images* (all their QA) for eval loss."""
    images = sorted(set(train["img_id"]))
    n_eval = max(1, round(len(images) * eval_fraction))
    require(len(images) > n_eval, "train.eval_fraction", f"leaves no training images ({len(images)} in train)")
    held_out = set(random.Random(seed).sample(images, n_eval))
    is_eval = [img in held_out for img in train["img_id"]]
    eval_rows = [i for i, e in enumerate(is_eval) if e]
    train_rows = [i for i, e in enumerate(is_eval) if not e]
    if max_eval_rows is not None and len(eval_rows) > max_eval_rows:
        eval_rows = sorted(random.Random(seed).sample(eval_rows, max_eval_rows))
    return train.select(train_rows), train.select(eval_rows)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def run_key(train_cfg: TrainConfig, model_dir, processed_dir, max_train_rows) -> str:
    """Everything that determines the trained weights: a checkpoint of another key is never resumed."""
    # The processes actually running, not the param: VQATUNE_NUM_PROCESSES can override it.
    ident = {
        "code": code_signature(),
        "train": {**as_dict(train_cfg), "num_processes": distributed.world_size()},
        "model": folder_signature(model_dir),
        "data": folder_signature(processed_dir),
        "max_train_rows": max_train_rows,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def last_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that was written to the end (trainer_state.json is saved last)."""
    candidates = []
    for ckpt in Path(run_dir).glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if step.isdigit() and (ckpt / "trainer_state.json").exists():
            candidates.append((int(step), ckpt))
    return max(candidates)[1] if candidates else None


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def _resolved_precision(cfg: TrainConfig, device: str) -> tuple[str, str]:
    import torch

    compute = cfg.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.startswith("cuda") else "float32"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return compute, precision


def build_sft_config(cfg: TrainConfig, run_dir: Path, precision: str, eval_on_start: bool, device: str):
    from trl import SFTConfig

    processes = distributed.world_size()
    batch, accumulation = distributed.split_global_batch(cfg.batch_size, cfg.gradient_accumulation_steps,
                                                         processes)
    return SFTConfig(
        output_dir=str(run_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=max(1, -(-cfg.eval_batch_size // processes)),
        gradient_accumulation_steps=accumulation,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        eval_on_start=eval_on_start,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        load_best_model_at_end=cfg.load_best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Our collator reads the image and messages columns and builds the labels itself.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=device.startswith("cuda"),
        # Workers live across epochs: a new epoch otherwise forks N new workers from a process
        # that holds the model, and every GPU waits for their first batches.
        dataloader_persistent_workers=cfg.dataloader_num_workers > 0,
        # Several CPU processes (tests, GPU-less machines) talk over gloo: accelerate's multi-CPU
        # mode needs use_cpu. Every trainable weight gets a gradient each step (the image-feature
        # cache refuses adapters on the vision tower), so DDP skips its search for unused ones.
        use_cpu=not device.startswith("cuda"),
        ddp_find_unused_parameters=False,
        # No buffer of the model changes in training (LoRA trains parameters only), so DDP need not
        # broadcast them from rank 0 before every forward.
        ddp_broadcast_buffers=False,
        # The filter tests every micro-batch's loss for NaN on the host (a GPU sync each time) to
        # hide it from the logged average; a NaN loss is logged as NaN instead.
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=False,
    )


def _peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux: the process's peak resident memory, model and data included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_training(train_cfg: TrainConfig, model_dir: str | Path, processed_dir: str | Path,
                 output_dir: Optional[str | Path], *, checkpoint_dir: str | Path,
                 callbacks: Sequence = (), max_train_rows: Optional[int] = None,
                 resume: bool = True, trust_remote_code: bool = False,
                 device: Optional[str] = None) -> TrainResult:
    """Build model + trainer, train (resuming a matching checkpoint), evaluate, save, free.

    ``output_dir``: where the adapter and processor go (None: save nothing, as search trials do).
    ``checkpoint_dir``: parent of the per-run checkpoint folders, kept across runs.
    ``callbacks``: extra ``TrainerCallback``s (the search stage's pruning reports eval loss).
    Ctrl-C saves the adapter so far to ``output_dir`` with a PARTIAL marker and raises
    ``TrainingInterrupted``.
    """
    import torch

    from .model import resolve_device

    device = distributed.process_device(resolve_device(device))
    if distributed.in_launch():
        distributed.start(cpu=not device.startswith("cuda"))
    compute_dtype, precision = _resolved_precision(train_cfg, device)
    threads = torch.get_num_threads()
    if not device.startswith("cuda") and train_cfg.cpu_threads:
        torch.set_num_threads(train_cfg.cpu_threads)
    try:
        return _run_training(train_cfg, model_dir, processed_dir, output_dir, checkpoint_dir, callbacks,
                             max_train_rows, resume, trust_remote_code, device, compute_dtype, precision)
    finally:
        torch.set_num_threads(threads)


def _run_training(train_cfg, model_dir, processed_dir, output_dir, checkpoint_dir, callbacks,
                  max_train_rows, resume, trust_remote_code, device, compute_dtype, precision):
    import torch
    from datasets import load_from_disk
    from transformers import EarlyStoppingCallback, set_seed

    from .collate import AnswerOnlyCollator
    from .model import (attach_lora, free_model, load_base_model, load_processor,
                        prepare_for_kbit_training, trainable_parameters)
    from .sft import LeanSFTTrainer
    from .speed import compile_layers, compile_wanted, freeze_gc_after_warmup, maybe_install_image_feature_cache

    set_seed(train_cfg.seed)

    # Data
    data = load_from_disk(str(processed_dir))
    if "train" not in data:
        raise ConfigError(f"{processed_dir} has no 'train' split; run the prepare stage first")
    train_ds, eval_ds = split_train_eval(data["train"], train_cfg.eval_fraction, train_cfg.seed,
                                         train_cfg.max_eval_rows)
    if max_train_rows is not None and len(train_ds) > max_train_rows:
        train_ds = train_ds.shuffle(seed=train_cfg.seed).select(range(max_train_rows))
    log.info("train %d rows, eval %d rows (held-out train images), prompt mode %s",
             len(train_ds), len(eval_ds), train_cfg.prompt_mode)

    # Checkpoints
    run_dir = Path(checkpoint_dir) / run_key(train_cfg, model_dir, processed_dir, max_train_rows)
    main = distributed.is_main_process()
    if main:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(
            {"train": as_dict(train_cfg), "model_dir": str(model_dir), "processed_dir": str(processed_dir),
             "max_train_rows": max_train_rows, "processes": distributed.world_size()},
            indent=2, default=str) + "\n")
    distributed.barrier()
    checkpoint = last_complete_checkpoint(run_dir) if resume else None
    resumed_from = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
    if checkpoint:
        log.info("resuming from %s", checkpoint)

    # Model
    processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    model = load_base_model(model_dir, quantization=train_cfg.quantization, compute_dtype=compute_dtype,
                            dtype=train_cfg.dtype, attn_implementation=train_cfg.attn_implementation,
                            trust_remote_code=trust_remote_code, device=device)
    # An fp32 stream needs autocast (mixed precision) to feed the bf16 weights' matmuls.
    fp32_residual = train_cfg.fp32_residual and precision in ("bf16", "fp16")
    model = prepare_for_kbit_training(model, train_cfg.gradient_checkpointing, fp32_residual=fp32_residual)
    model = attach_lora(model, train_cfg.lora)
    feature_cache = maybe_install_image_feature_cache(model, training=True,
                                                      enabled=train_cfg.cache_image_features)
    compiled_layers = 0
    if compile_wanted(train_cfg.compile, device):
        # With cached features the vision tower runs only before the first step (no_grad): its
        # layers are left eager there, and compile time goes to the language model.
        towers = ("DecoderLayer",) if feature_cache is not None else ("DecoderLayer", "EncoderLayer")
        compiled_layers = compile_layers(model, towers=towers)
        log.info("torch.compile: %d layers (the first steps compile)", compiled_layers)
    trainable, total = trainable_parameters(model)

    # Training
    # Precomputed features are stored under each img_id's key, so the steps' batches carry only
    # keys and their rows no image column: the workers neither decode nor resize an image during
    # the steps (at 896 px ~1.6 s of CPU per batch of 32, benchmarks/collate_bench.py).
    precompute = feature_cache is not None and train_cfg.precompute_image_features
    collator = AnswerOnlyCollator(processor, train_cfg.prompt_mode, train_cfg.padding_side,
                                  train_cfg.max_length, image_keys=precompute)
    step_train_ds, step_eval_ds = ((train_ds.remove_columns("image"), eval_ds.remove_columns("image"))
                                   if precompute else (train_ds, eval_ds))
    all_callbacks = [*callbacks, freeze_gc_after_warmup()]
    if train_cfg.early_stopping_patience:
        all_callbacks.append(EarlyStoppingCallback(train_cfg.early_stopping_patience))
    trainer = LeanSFTTrainer(
        model=model,
        args=build_sft_config(train_cfg, run_dir, precision, eval_on_start=checkpoint is None,
                              device=device),
        train_dataset=step_train_ds,
        eval_dataset=step_eval_ds,
        data_collator=collator,
        processing_class=processor,
        callbacks=all_callbacks,
    )
    if compute_dtype == "float32":
        # TRL casts the adapters of a quantized model to bf16 (the QLoRA paper's GPU choice); with
        # fp32 compute (CPU) that only loses small updates and slows every LoRA matmul.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    interrupted = False
    try:
        if precompute:
            precompute_image_features(trainer, feature_cache, collator, (train_ds, eval_ds),
                                      train_cfg.batch_size, train_cfg.dataloader_num_workers)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - start

    state = trainer.state
    history = list(state.log_history)
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    final_eval = None
    if not interrupted:
        final_eval = trainer.evaluate()["eval_loss"]
        history = list(trainer.state.log_history)
    steps_run = state.global_step - resumed_from
    examples = steps_run * train_cfg.batch_size * train_cfg.gradient_accumulation_steps
    result = TrainResult(
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=final_eval if final_eval is not None else (eval_losses[-1][1] if eval_losses else None),
        eval_loss_start=eval_losses[0][1] if eval_losses and eval_losses[0][0] == 0 else None,
        best_eval_loss=state.best_metric,
        steps=state.global_step,
        epochs=round(float(state.epoch or 0.0), 4),
        train_rows=len(train_ds),
        eval_rows=len(eval_ds),
        examples_per_s=round(examples / seconds, 3) if seconds > 0 else 0.0,
        seconds=round(seconds, 2),
        peak_memory_gib=round(_peak_memory_gib(device), 3),
        trainable_params=trainable,
        total_params=total,
        trainable_share=round(trainable / max(total, 1), 6),
        device=_device_label(device),
        quantization=train_cfg.quantization,
        compute_dtype=compute_dtype,
        precision=precision,
        fp32_residual=fp32_residual,
        compiled_layers=compiled_layers,
        resumed=checkpoint is not None,
        resumed_from_step=resumed_from,
        partial=interrupted,
        checkpoint_dir=str(run_dir),
        log_history=history,
    )
    if output_dir is not None and main:
        save_adapter(trainer.model, processor, output_dir, partial=interrupted)
    if not interrupted:
        # After an interrupt the processes may have stopped at different points (one inside an
        # all-reduce): no collective then, each leaves on its own.
        distributed.barrier()
    free_model(trainer, model)
    del trainer, model
    if interrupted:
        raise TrainingInterrupted(result)
    return result


class _KeyedPixels:
    """DataLoader collate: ``(image keys, pixel_values)`` of rows, the pixels exactly as a
    training collator without image keys makes them, so the features stored under the keys are
    the ones those batches would get."""

    def __init__(self, collator):
        self.collator = dataclasses.replace(collator, image_keys=False)

    def __call__(self, rows):
        from .speed import image_key_tensor

        return image_key_tensor([row["img_id"] for row in rows]), self.collator(rows)["pixel_values"]


# Share of the GPU's free memory (after the model is loaded) that precomputed image features may
# take there; the rest is left to the steps' activations.
FEATURE_TABLE_SHARE = 0.25


def precompute_image_features(trainer, cache, collator, datasets, batch_size: int, num_workers: int) -> int:
    """Fill ``cache`` with the features of every distinct image of ``datasets`` (one row per
    ``img_id``) under the img_id's ``image_key``, under the trainer's autocast, before the first
    step; ``collator`` (the training one, with ``image_keys``) then finds them. Returns how many
    were new."""
    import torch

    parts = []
    for ds in datasets:
        first: dict = {}
        for i, img_id in enumerate(ds["img_id"]):
            first.setdefault(img_id, i)
        parts.append(ds.select(sorted(first.values())))
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(parts), batch_size=batch_size,
                                         collate_fn=_KeyedPixels(collator), num_workers=num_workers)
    device = trainer.model.get_input_embeddings().weight.device
    start = time.perf_counter()
    with torch.no_grad(), trainer.accelerator.autocast():
        new = cache.prefill(loader, device, progress=distributed.is_main_process())
    # On the training device when they fit in a share of its free memory (the steps then look
    # them up there, ImageFeatureCache.move_to); in host memory otherwise (Kvasir-VQA's 6,500
    # images at 896 px: ~17 GB in fp32).
    budget = (int(torch.cuda.mem_get_info(device)[0] * FEATURE_TABLE_SHARE) if device.type == "cuda"
              else cache.memory_bytes())
    where = str(device) if cache.move_to(device, budget) else "host memory"
    log.info("image features precomputed: %d new images in %.1f s (%.2f GiB in %s)",
             new, time.perf_counter() - start, cache.memory_bytes() / 2**30, where)
    return new


def _device_label(device: str) -> str:
    import torch

    from .provenance import device_name

    label = device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    processes = distributed.world_size()
    return f"{processes} x {label} (DDP)" if processes > 1 else label


def save_adapter(model, processor, output_dir: str | Path, partial: bool = False) -> Path:
    """Adapter weights (safetensors) + adapter config + processor; PARTIAL marks an interrupted run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    processor.save_pretrained(str(output_dir))
    marker = output_dir / PARTIAL_MARKER
    if partial:
        marker.write_text("Training was interrupted: this adapter is not the finished result.\n")
    elif marker.exists():
        marker.unlink()
    return output_dir


def write_curves(log_history: list[dict], plots_dir: str | Path) -> Path:
    """Train loss, eval loss and learning rate against step, through dvclive.

    Written from the trainer's log_history at the end rather than live: the history is restored
    with a checkpoint, so a resumed run still gets every step exactly once.
    """
    from dvclive import Live

    plots_dir = Path(plots_dir)
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    series = {"train/loss": "loss", "eval/loss": "eval_loss", "train/learning_rate": "learning_rate"}
    points: dict[tuple[int, str], float] = {}  # the final evaluate repeats the last step's: keep one
    for entry in log_history:
        for name, key in series.items():
            value = entry.get(key)
            if value is not None and math.isfinite(float(value)):
                points[(int(entry.get("step", 0)), name)] = float(value)
    with Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for (step, name), value in sorted(points.items()):
            live.step = step
            live.log_metric(name, value)
    return plots_dir
