"""`train:` of params.yaml (``TrainConfig``), the search's overrides of it, and where they come from."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..config import ConfigError, as_dict, build, require
from ..models.lora import LoraSettings

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
    # sdpa: ~4x the guide's eager throughput on an H100.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Recompute activations in the backward pass: ~1.5x the step time, a fraction of the memory.
    # auto: on CUDA, only as many decoder layers as the free memory needs (the others keep their
    # activations; vqatune.training.checkpointing), off on CPU.
    gradient_checkpointing: Union[bool, Literal["auto"]] = True
    # Vision features once per distinct image, reused by all its QA and every epoch (~9 QA per
    # Kvasir image, ~5.5 TFLOP per 896 px image on MedGemma): identical features while the vision
    # tower and projector are frozen; skipped (logged) when they train. vqatune.vision.
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
    # torch.compile each transformer layer (vqatune.models.compile.compile_layers): fewer, fused kernels
    # for a step that is otherwise CPU-bound on a fast GPU. null = on with CUDA, off on CPU.
    # H100, MedGemma-4B shapes, batch 32, checkpointing, precomputed features (benchmarks/
    # results/ddp_bench_h100x2_*.json, train_levers_h100*.json): ~1.6x in steady state; the first
    # steps pay 1-1.5 min of compilation, and a new shape can still recompile once (one stall of
    # 32 s in 40 steps was seen). Where compiling fails, the layers run eagerly.
    compile: Optional[bool] = None
    # The language model's residual stream in fp32 while its weights stay bf16 (or nf4). In a
    # bf16 stream an adapter's early updates are smaller than half a bf16 step of the layer
    # output they are added to and round away: on MedGemma-4B shapes the first AdamW step bought
    # 0.68 of the loss drop the guide's fp32 recipe got (benchmarks/results/gpu_bench_h100_guide.json),
    # and at lr 5e-5 none of it (CPU, nf4, scaled tiny model). No effect on fp32 models.
    fp32_residual: bool = True
    # QLoRA numerics at bf16 speed: each nf4 layer's weights dequantized once after loading
    # (vqatune.models.precision.dequantize_4bit_layers), exactly the values bitsandbytes
    # multiplies with at every call, so the GEMMs skip the per-call dequantization. Costs the
    # bf16 size of the quantized weights (~6 GiB more on MedGemma-4B). auto: on with CUDA when
    # 12 GiB stay free after it, off on CPU; false for a 16 GB card. Only with quantization 4bit.
    dequantize_base: Union[bool, Literal["auto"]] = "auto"
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)

    # Data. The prompt mode trained on (evaluation still tries all three); mix: each row under a
    # mode drawn per row from its row_id and `seed` (training.collate.mixed_prompt_mode).
    prompt_mode: Literal["none", "static", "adaptive", "mix"] = "none"
    # Share of the train split's images held out for the eval loss (never the test split).
    eval_fraction: float = 0.1
    max_eval_rows: Optional[int] = None
    padding_side: Literal["left", "right"] = "right"
    # Longest sequence; longer answers are cut (prompts never: Gemma 3 needs every image token).
    max_length: Optional[int] = None
    # Batches of one prompt mode (transformers' length grouping on each mode's mean length:
    # shuffled, then the modes sorted apart within groups of 50 batches; seeded per epoch, so a
    # resumed run trains the same batches: trainer.PromptModeSampler). With prompt_mode mix a
    # shuffled batch holds all three modes and is padded to its adaptive rows (~180 tokens of the
    # tiny model against ~60 with no system prompt). Only mix has anything to group.
    group_by_prompt_mode: bool = False

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
    # Data-parallel processes (one per GPU, DDP through `accelerate launch`; vqatune.training.distributed).
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
