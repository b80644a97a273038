"""QLoRA fine-tuning with TRL's SFTTrainer: one function, ``run_training``, used by the train
stage and by every search trial.

Eval loss comes from a held-out slice of the *train* split (split by image, so no image is on
both sides); the test split is never seen here. Checkpoints live under a folder keyed by
everything that determines the result, so a killed run resumes from its last checkpoint and a
changed param starts afresh.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from ..config import ConfigError, as_dict, require
from ..provenance import peak_memory
from . import distributed
from .checkpoints import last_complete_checkpoint, run_key, save_adapter
from .config import TrainConfig

log = logging.getLogger(__name__)


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
    dequantized_layers: int      # nf4 layers dequantized once to bf16 (train.dequantize_base; 0 = off)
    # decoder layers that recompute their activations (train.gradient_checkpointing; None: all
    # or none as set, a number with auto)
    checkpointed_layers: Optional[int]
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


@dataclasses.dataclass
class _Setup:
    """What a run was asked for and where it happens: the arguments of ``run_training``, resolved."""

    cfg: TrainConfig
    model_dir: Path
    processed_dir: Path
    output_dir: Optional[Path]
    checkpoint_dir: Path
    callbacks: Sequence
    max_train_rows: Optional[int]
    resume: bool
    trust_remote_code: bool
    device: str
    compute_dtype: str
    precision: str
    checkpointing: Union[bool, str]  # train.gradient_checkpointing resolved: True, False or "auto" (CUDA)


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

    from ..models.loading import resolve_device
    from . import checkpointing
    from .trainer import resolved_precision

    device = distributed.process_device(resolve_device(device))
    if distributed.in_launch():
        distributed.start(cpu=not device.startswith("cuda"))
    compute_dtype, precision = resolved_precision(train_cfg, device)
    setup = _Setup(cfg=train_cfg, model_dir=Path(model_dir), processed_dir=Path(processed_dir),
                   output_dir=None if output_dir is None else Path(output_dir),
                   checkpoint_dir=Path(checkpoint_dir), callbacks=callbacks,
                   max_train_rows=max_train_rows, resume=resume, trust_remote_code=trust_remote_code,
                   device=device, compute_dtype=compute_dtype, precision=precision,
                   checkpointing=checkpointing.resolve(train_cfg.gradient_checkpointing, device))
    threads = torch.get_num_threads()
    if not device.startswith("cuda") and train_cfg.cpu_threads:
        torch.set_num_threads(train_cfg.cpu_threads)
    try:
        return _run(setup)
    finally:
        torch.set_num_threads(threads)


def _load_splits(s: _Setup):
    """(train rows, eval rows): the eval rows are held-out images of the train split."""
    from ..data.processed import load_prepared

    data = load_prepared(s.processed_dir)
    if "train" not in data:
        raise ConfigError(f"{s.processed_dir} has no 'train' split; run the prepare stage first")
    train_ds, eval_ds = split_train_eval(data["train"], s.cfg.eval_fraction, s.cfg.seed, s.cfg.max_eval_rows)
    if s.max_train_rows is not None and len(train_ds) > s.max_train_rows:
        train_ds = train_ds.shuffle(seed=s.cfg.seed).select(range(s.max_train_rows))
    log.info("train %d rows, eval %d rows (held-out train images), prompt mode %s",
             len(train_ds), len(eval_ds), s.cfg.prompt_mode)
    return train_ds, eval_ds


def mode_lengths(ds, processor, cfg: TrainConfig) -> list[int]:
    """Each row's prompt mode's mean length (collate.prompt_mode_lengths) for
    train.group_by_prompt_mode (trainer.PromptModeSampler)."""
    from .collate import prompt_mode_lengths

    text_rows = ds.select_columns([c for c in ds.column_names
                                   if c.startswith("messages_") or c in ("row_id", "img_id", "question")])
    return prompt_mode_lengths(processor, text_rows, cfg.prompt_mode, mix_seed=cfg.seed)


def _run_dir(s: _Setup) -> tuple[Path, Optional[Path]]:
    """(this run's checkpoint folder, the checkpoint to resume from or None)."""
    run_dir = s.checkpoint_dir / run_key(s.cfg, s.model_dir, s.processed_dir, s.max_train_rows)
    if distributed.is_main_process():
        if not s.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(
            {"train": as_dict(s.cfg), "model_dir": str(s.model_dir), "processed_dir": str(s.processed_dir),
             "max_train_rows": s.max_train_rows, "processes": distributed.world_size()},
            indent=2, default=str) + "\n")
        if s.resume:
            # Corrupt newer checkpoints (a kill mid-save, a bad disk) are logged and removed here.
            last_complete_checkpoint(run_dir, discard=True)
    distributed.barrier()
    checkpoint = last_complete_checkpoint(run_dir) if s.resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    return run_dir, checkpoint


def _build_model(s: _Setup, images: int = 0):
    """(model with LoRA, processor, image-feature cache or None, compiled layers, fp32 residual,
    dequantized layers). ``images``: the distinct images of the train and eval rows (whether the
    vision tower's outputs may be cached)."""
    from ..models.compile import compile_layers, compile_wanted
    from ..models.loading import load_base_model, load_processor
    from ..models.lora import attach_lora
    from ..models.precision import dequantize_4bit_layers, dequantize_wanted, prepare_for_kbit_training
    from ..vision.feature_cache import maybe_install_image_feature_cache

    cfg = s.cfg
    processor = load_processor(s.model_dir, trust_remote_code=s.trust_remote_code)
    model = load_base_model(s.model_dir, quantization=cfg.quantization, compute_dtype=s.compute_dtype,
                            dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                            trust_remote_code=s.trust_remote_code, device=s.device)
    dequantized = 0
    wanted, why = dequantize_wanted(cfg.dequantize_base, model)
    if wanted:
        # Before peft: its LoRA layers then wrap plain linear layers holding the nf4-rounded weights.
        dequantized = dequantize_4bit_layers(model)
    log.info("train.dequantize_base=%s: %d 4-bit layers dequantized once (%s)", cfg.dequantize_base,
             dequantized, why)
    # An fp32 stream needs autocast (mixed precision) to feed the bf16 weights' matmuls.
    fp32_residual = cfg.fp32_residual and s.precision in ("bf16", "fp16")
    model = prepare_for_kbit_training(model, bool(s.checkpointing), fp32_residual=fp32_residual)
    model = attach_lora(model, cfg.lora)
    # A projector that trains over a frozen tower (the tiny model's): the tower's outputs are
    # cached instead, when they are precomputed and fit in host memory.
    feature_cache = maybe_install_image_feature_cache(
        model, training=True, enabled=cfg.cache_image_features,
        tower_images=images if cfg.precompute_image_features else 0)
    compiled_layers = 0
    if compile_wanted(cfg.compile, s.device):
        # With cached features the vision tower runs only before the first step (no_grad): its
        # layers are left eager there, and compile time goes to the language model.
        towers = ("DecoderLayer",) if feature_cache is not None else ("DecoderLayer", "EncoderLayer")
        compiled_layers = compile_layers(model, towers=towers)
        log.info("torch.compile: %d layers (the first steps compile)", compiled_layers)
    return model, processor, feature_cache, compiled_layers, fp32_residual, dequantized


def _run(s: _Setup) -> TrainResult:
    import torch
    from transformers import EarlyStoppingCallback, set_seed

    from ..models.compile import freeze_gc_after_warmup
    from ..models.loading import free_model
    from ..models.lora import trainable_parameters
    from .checkpointing import apply_auto, longest_row_tokens
    from .collate import AnswerOnlyCollator
    from .features import precompute_image_features
    from .trainer import LeanSFTTrainer, build_sft_config

    cfg = s.cfg
    set_seed(cfg.seed)
    train_ds, eval_ds = _load_splits(s)
    run_dir, checkpoint = _run_dir(s)
    resumed_from = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
    model, processor, feature_cache, compiled_layers, fp32_residual, dequantized = _build_model(
        s, images=len(set(train_ds["img_id"]) | set(eval_ds["img_id"])))
    trainable, total = trainable_parameters(model)

    # Training
    # Precomputed features are stored under each img_id's key, so the steps' batches carry only
    # keys and their rows no image column: the workers neither decode nor resize an image during
    # the steps (at 896 px ~1.6 s of CPU per batch of 32, benchmarks/collate_bench.py).
    precompute = feature_cache is not None and cfg.precompute_image_features
    collator = AnswerOnlyCollator(processor, cfg.prompt_mode, cfg.padding_side, cfg.max_length,
                                  image_keys=precompute, mix_seed=cfg.seed)
    step_train_ds, step_eval_ds = ((train_ds.remove_columns("image"), eval_ds.remove_columns("image"))
                                   if precompute else (train_ds, eval_ds))
    # Passed to the trainer, not added as a column: add_column flattens the split's index mapping
    # into a cache file inside data/processed, a dependency of the later stages.
    lengths = mode_lengths(step_train_ds, processor, cfg) if cfg.group_by_prompt_mode else None
    all_callbacks = [*s.callbacks, freeze_gc_after_warmup()]
    if cfg.early_stopping_patience:
        all_callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    trainer = LeanSFTTrainer(
        model=model,
        args=build_sft_config(cfg, run_dir, s.precision, eval_on_start=checkpoint is None, device=s.device,
                              checkpointing=s.checkpointing),
        train_dataset=step_train_ds,
        eval_dataset=step_eval_ds,
        data_collator=collator,
        processing_class=processor,
        callbacks=all_callbacks,
        prompt_mode_lengths=lengths,
    )
    if s.compute_dtype == "float32":
        # TRL casts the adapters of a quantized model to bf16 (the QLoRA paper's GPU choice); with
        # fp32 compute (CPU) that only loses small updates and slows every LoRA matmul.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    interrupted = False
    checkpointed = None
    try:
        if precompute:
            precompute_image_features(trainer, feature_cache, collator, (train_ds, eval_ds),
                                      cfg.batch_size, cfg.dataloader_num_workers)
        if s.checkpointing == "auto":
            # Planned now: the model, the adapters and the feature table take their memory first.
            per_device, _ = distributed.split_global_batch(cfg.batch_size, cfg.gradient_accumulation_steps,
                                                           distributed.world_size())
            longest = longest_row_tokens(collator, step_train_ds if precompute else train_ds,
                                         sample=256 if precompute else 32)
            checkpointed = apply_auto(model, tokens_per_step=per_device * longest,
                                      fp32_residual=fp32_residual)["checkpointed_layers"]
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
    examples = steps_run * cfg.batch_size * cfg.gradient_accumulation_steps
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
        peak_memory_gib=round(peak_memory(s.device)[0], 3),
        trainable_params=trainable,
        total_params=total,
        trainable_share=round(trainable / max(total, 1), 6),
        device=_device_label(s.device),
        quantization=cfg.quantization,
        compute_dtype=s.compute_dtype,
        precision=s.precision,
        fp32_residual=fp32_residual,
        compiled_layers=compiled_layers,
        dequantized_layers=dequantized,
        checkpointed_layers=checkpointed,
        resumed=checkpoint is not None,
        resumed_from_step=resumed_from,
        partial=interrupted,
        checkpoint_dir=str(run_dir),
        log_history=history,
    )
    if s.output_dir is not None and distributed.is_main_process():
        save_adapter(trainer.model, processor, s.output_dir, partial=interrupted)
    if not interrupted:
        # After an interrupt the processes may have stopped at different points (one inside an
        # all-reduce): no collective then, each leaves on its own.
        distributed.barrier()
    free_model(trainer, model)
    del trainer, model
    if interrupted:
        raise TrainingInterrupted(result)
    return result


def _device_label(device: str) -> str:
    import torch

    from ..provenance import device_name

    label = device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    processes = distributed.world_size()
    return f"{processes} x {label} (DDP)" if processes > 1 else label
