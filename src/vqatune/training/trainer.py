"""TRL's SFTTrainer without a synchronisation point in every micro-batch.

TRL (1.16) computes its training metrics (entropy, mean token accuracy, token count) inside every
``compute_loss``: four ``accelerator.gather_for_metrics(...)`` calls, each followed by ``.item()``.
Each ``.item()`` waits for the GPU to finish the forward; under DDP each gather also waits for
every other process. A data-parallel step then has five rendezvous per micro-batch instead of
one (DDP's gradient all-reduce), and the process that happens to be slower at each one sets the
pace (benchmarks/results/ddp_bench_h100x2_profile.md: 25 all-gathers in 4 steps, rank 1 waiting
0.11 s per step for rank 0).

``LeanSFTTrainer`` keeps the same metrics as device-side sums over the micro-batches and reduces
them once, when the trainer logs (all processes log at the same steps). The loss is TRL's own
plain case, written out here because TRL offers no hook between the loss and its metrics: the
fused LM head's per-token log-probabilities summed and divided by the tokens of the whole global
batch (``num_items_in_batch``), scaled by the number of processes as ``Trainer.compute_loss``
does. Every other case (a custom loss function, label smoothing, DFT, MoE auxiliary loss,
sequence parallelism, ``return_outputs``, which evaluation uses) goes to TRL unchanged.

The logged entropy and accuracy are token-weighted over the logging window (sum over tokens /
tokens), where TRL averages the per-micro-batch ratios: the same on equal micro-batches.

Logits on answer positions only are TRL's already: SFTTrainer (>= 1.x) scores only positions with
a label, in tiles (``add_fused_lm_head``); benchmarks/proto_levers.py measured its effect (Gemma 3's
262,208-row head, ~3 answer tokens per ~290-token example).

``build_sft_config`` turns `train:` into the trainer's arguments.
"""
from __future__ import annotations

from pathlib import Path

import torch
from trl import SFTTrainer

from ..faults import fault_armed, kill_mid_write
from . import distributed
from .config import TrainConfig


def score_answer_positions_only_on_cpu() -> None:
    """Make TRL's fused LM head score only the labelled (answer) positions on the CPU too.

    TRL 1.16 projects only the positions with a label through the LM head where Triton runs
    (CUDA, XPU); elsewhere it scores every position, so that compiled tiles keep one shape
    (trl.trainer.utils.add_fused_lm_head: ``compact = _use_triton(...)``). Nothing is compiled
    on our CPU path (train.compile: null is off on CPU), and a row has ~3 answer tokens in
    ~130: the embedded run spent ~12% of each step on a [tokens x vocab] head and its backward
    for positions whose loss is zero. The log-probabilities of the labelled positions are the
    same either way (tests/test_training.py compares both). Only that decision is changed; the
    kernels keep their own check.
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if getattr(original, "vqatune_compact_on_cpu", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact.vqatune_compact_on_cpu = True
    trl_utils._use_triton = compact


class PromptModeSampler(torch.utils.data.Sampler):
    """``train.group_by_prompt_mode``'s order: transformers' length grouping
    (``get_length_grouped_indices``: shuffle, then sort groups of 50 batches by length, here one
    value per prompt mode) from a generator seeded with ``seed + epoch``.

    Why not transformers' ``LengthGroupedSampler``: it shuffles with the global RNG at the start
    of each epoch, and a run resumed mid-epoch reaches that point in another RNG state, so its
    batches (and adapter) differed from the uninterrupted run's. Here every epoch's order follows
    from the seed and the epoch, which the trainer sets (``set_epoch``) on a fresh and a resumed
    run alike."""

    def __init__(self, batch_size: int, lengths, seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, list(lengths), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose per-micro-batch metrics cost no host or cross-process synchronisation."""

    def __init__(self, *args, prompt_mode_lengths=None, **kwargs):
        score_answer_positions_only_on_cpu()
        # train.group_by_prompt_mode: each train row's mode length (collate.prompt_mode_lengths);
        # given, the train batches come from PromptModeSampler
        self._prompt_mode_lengths = prompt_mode_lengths
        super().__init__(*args, **kwargs)
        self._metric_sums: dict[str, torch.Tensor] = {}

    def _get_train_sampler(self, train_dataset=None):
        if self._prompt_mode_lengths is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if len(self._prompt_mode_lengths) != len(dataset):
            raise ValueError(f"{len(self._prompt_mode_lengths)} prompt-mode lengths for {len(dataset)} train rows")
        return PromptModeSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                 self._prompt_mode_lengths, self.args.data_seed if self.args.data_seed is not None
                                 else self.args.seed)

    def _save_checkpoint(self, model, trial):
        if fault_armed("checkpoint-write", self.state.global_step):
            # Fault test: die while the checkpoint's last file (trainer_state.json) is written,
            # before the old checkpoints are rotated away.
            save_state = self.state.save_to_json

            def torn(json_path):
                save_state(json_path)
                kill_mid_write(json_path)

            self.state.save_to_json = torn
        super()._save_checkpoint(model, trial)

    def _lean_loss_applies(self, inputs) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (self.compute_loss_func is None and self.label_smoother is None
                and self.args.loss_type == "nll" and not self.aux_loss_enabled
                and not (parallelism is not None and getattr(parallelism, "sp_enabled", False))
                and "attention_mask" in inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._lean_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        # -log_probs is zero on ignored positions; clamped so a batch without answer tokens is 0, not 0/0.
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # Answer tokens, their entropy and correct top-1 predictions, all tokens (log counts them in training).
        sums = torch.stack([outputs.label_mask.sum().double(), outputs.entropy.detach().sum().double(),
                            outputs.is_top1.sum().double(), inputs["attention_mask"].sum().double()])
        previous = self._metric_sums.get(mode)
        self._metric_sums[mode] = sums if previous is None else previous + sums
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._metric_sums.pop(mode, None)
        if sums is not None:
            # One collective and one host copy per logging step, on every process alike.
            valid, entropy, correct, tokens = self.accelerator.reduce(sums, reduction="sum").tolist()
            self._metrics[mode]["entropy"] = [entropy / valid if valid > 0 else 0.0]
            self._metrics[mode]["mean_token_accuracy"] = [correct / valid if valid > 0 else 0.0]
            if mode == "train":
                self._total_train_tokens += int(tokens) // self._tp_size
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def resolved_precision(cfg: TrainConfig, device: str) -> tuple[str, str]:
    import torch

    compute = cfg.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.startswith("cuda") else "float32"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return compute, precision


def build_sft_config(cfg: TrainConfig, run_dir: Path, precision: str, eval_on_start: bool, device: str,
                     checkpointing=None):
    """TRL's SFTConfig for ``cfg``. ``checkpointing``: the resolved train.gradient_checkpointing
    (default: as set); with "auto" the trainer must not turn it on for every layer (its train()
    would): prepare_for_kbit_training turned it on and checkpointing.apply_auto chose the layers."""
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
        gradient_checkpointing=(cfg.gradient_checkpointing if checkpointing is None else checkpointing) is True,
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
