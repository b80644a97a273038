"""GPU throughput: the guide's recipe and the project's defaults on MedGemma-4B shapes, one card.

One run, side by side, on random weights of the real architecture (medgemma4b_config.json) and
the project's synthetic Kvasir-like data prepared at 896 px:

- training: the guide's recipe (nf4 + double quant, eager attention, batch 1, peft's
  prepare_model_for_kbit_training, LoRA r16/a32 on up/gate/down, full-vocabulary loss) in a plain
  loop, against ``vqatune.training.run_training`` (TRL SFTTrainer) with the project's levers and
  the same LoRA;
- loss parity: both recipes' loss curves over the same batches (project collator) from the same
  initial adapter, with a second project run (another dropout seed) as the noise yardstick;
- evaluation: the guide's one-at-a-time greedy generation (nf4, eager, 25 new tokens) against
  ``vqatune.generation.generate_answers`` over the six configurations ({base, tuned} x
  {none, static, adaptive}) as the evaluate stage runs them; parity = batched answers equal to
  one-at-a-time answers of the same model.

Writes ``gpu_bench.json`` and ``gpu_bench.md`` (the table) to ``--out``. On the GPU machine:

    source benchmarks/offline_gpu_setup.sh && python benchmarks/gpu_bench.py --out $OUT

Instead of the whole benchmark, one part of it on its own (same world, same ``--out``):

- ``--parity-only``: the training loss-parity runs (``gpu_bench_parity.json``);
- ``--profile-generation``: where the evaluate stage's generation time goes
  (``profile_generation.json``): prefill vs decoding, adapter on / off / merged, batch size, and
  ``torch.profiler`` over one batch (the training step's profile: ``ddp_bench.py --runs
  1:profile``);
- ``--collate``: the CPU cost of one training batch's collation, the processor on every image
  vs image keys (``collate.json``; CPU only, the builtin tiny model's processor).

Issue 25's device run, in one call of under ten minutes (``--skip-guide``: no guide recipe,
loss parity or one-at-a-time guide generation; ``--levers``: every training lever (checkpointing,
``train.dequantize_base``, the 16 GB mode) and generation lever (dynamic cache, length buckets)
beside the defaults, each generation lever with its answer parity; ``--train-levers`` /
``--gen-levers``: a chosen few; ``--unsloth``: Unsloth's FastVisionModel on the same model first, in its own process,
benchmarks/unsloth_peer.py, and ``unsloth_ratio`` in the results):

    source benchmarks/offline_gpu_setup.sh && python benchmarks/gpu_bench.py --out $OUT \
        --skip-guide --levers --unsloth --parity-rows 24

``--tiny`` runs the same code path on the builtin tiny model on CPU in about a minute (the CI
smoke test, tests/test_benchmark_smoke.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from medgemma import PEAK_BF16_FLOPS, build_random_medgemma, flop_model, lm_forward_flops  # noqa: E402

log = logging.getLogger("gpu_bench")


@dataclasses.dataclass
class Scale:
    images: int            # synthetic images (~9 QA each)
    test_size: float       # share of images in the test split
    image_size: int
    guide_steps: int       # guide training steps timed (batch 1), after 2 warm-up steps
    parity_steps: int
    parity_batch: int
    train_batch: int       # project training
    train_steps: int
    timed_from: int        # first timed project step (the ones before warm up and compile)
    workers: int           # project dataloader workers
    gen_rows: int          # test rows per configuration (x6 configurations)
    gen_batch: int
    guide_gen: int         # one-at-a-time generations timed for the guide
    parity_rows: int       # rows generated one at a time by the project for the parity check
    num_proc: int
    new_tokens: int = 25   # max new tokens per answer (the guide's 25)


FULL = Scale(images=200, test_size=0.4, image_size=896, guide_steps=10, parity_steps=10, parity_batch=4,
             train_batch=32, train_steps=30, timed_from=4, workers=8, gen_rows=384, gen_batch=384,
             guide_gen=6, parity_rows=48, num_proc=16, new_tokens=25)
TINY = Scale(images=12, test_size=0.4, image_size=64, guide_steps=2, parity_steps=3, parity_batch=2,
             train_batch=4, train_steps=4, timed_from=1, workers=0, gen_rows=4, gen_batch=4,
             guide_gen=2, parity_rows=4, num_proc=1, new_tokens=6)
GUIDE_TARGETS = ["up_proj", "down_proj", "gate_proj"]


# --------------------------------------------------------------------------- helpers

class Device:
    def __init__(self):
        self.type = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = torch.cuda.get_device_name(0) if self.type == "cuda" else "cpu"

    def sync(self):
        if self.type == "cuda":
            torch.cuda.synchronize()

    def reset(self):
        gc.collect()
        if self.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.type == "cuda" else None

    def autocast(self):
        # What SFTTrainer's bf16=True does on a GPU; the CPU smoke run stays in fp32.
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.type == "cuda" else contextlib.nullcontext()

    @property
    def compute_dtype(self):
        return torch.bfloat16 if self.type == "cuda" else torch.float32


DEV: Device
STATIC_CACHE = False  # --static-cache


def free(*objs):
    from vqatune.models.loading import free_model

    free_model(*objs)
    DEV.reset()


def to_device(batch):
    return {k: v.to(DEV.type) for k, v in batch.items()}


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def cast_adapters_like_sft_trainer(model):
    # SFTTrainer casts the adapters of a quantized model to bf16 (QLoRA paper); both recipes here
    # get the same, so the parity check compares the levers, not the adapter dtype.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(DEV.compute_dtype)


# --------------------------------------------------------------------------- the guide's recipe

def guide_model(model_dir):
    """The guide's modelInit(): nf4 + double quant, eager, k-bit preparation, LoRA on the MLP."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vqatune.cpu_numerics import use_portable_4bit_path

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=DEV.compute_dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, quantization_config=q, dtype=DEV.compute_dtype, attn_implementation="eager",
        device_map={"": DEV.type})
    # Only the --tiny smoke run is on a CPU: there bitsandbytes' AVX512-BF16 path would crash it.
    use_portable_4bit_path(model)
    model = prepare_model_for_kbit_training(model)  # upcasts every non-4-bit weight to fp32
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=GUIDE_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def guide_loss(model, batch):
    return model(**batch).loss  # logits over the whole vocabulary at every position


def project_parity_model(model_dir, upcast: bool = False, fp32_residual: bool = True):
    """The project's training set-up (vqatune.models + vqatune.vision + TRL's loss), guide's LoRA;
    ``upcast``: with peft's fp32 upcast of the frozen weights, as the guide has it;
    ``fp32_residual=False``: the bf16 residual stream the project trained with before
    2026-11-27's fifth session (to show what the fp32 stream changes in the curve)."""
    from trl.trainer.utils import add_fused_lm_head

    from vqatune.models.lora import LoraSettings, attach_lora
    from vqatune.models.loading import load_base_model
    from vqatune.models.precision import prepare_for_kbit_training
    from vqatune.vision.feature_cache import maybe_install_image_feature_cache

    model = load_base_model(model_dir, quantization="4bit", compute_dtype=str(DEV.compute_dtype)[6:],
                            attn_implementation="sdpa", device=DEV.type)
    if upcast:
        from vqatune.models.precision import freeze_for_kbit_training

        model = freeze_for_kbit_training(model, upcast_to_fp32=True, gradient_checkpointing=True)
    else:
        model = prepare_for_kbit_training(model, gradient_checkpointing=True,
                                          fp32_residual=fp32_residual)
    model = attach_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="mlp"))
    maybe_install_image_feature_cache(model, training=True)
    # What SFTTrainer does: log-probs of labelled positions only, in tiles (CUDA).
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    return model


def project_loss(model, batch):
    return model(**batch, fused_lm_head=True).loss


def train_loop(model, batches, loss_fn, *, warmup: int, seed: int = 0, lr: float = 2e-4):
    """AdamW steps; returns (examples/s over the steps after ``warmup``, losses, peak GiB)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=DEV.type == "cuda")
    model.train()
    DEV.reset()
    losses, t0, n = [], None, 0
    for i, batch in enumerate(batches):
        if i == warmup:
            DEV.sync()
            t0, n = time.perf_counter(), 0
        batch = to_device(batch)
        with DEV.autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        n += batch["input_ids"].shape[0]
    DEV.sync()
    seconds = time.perf_counter() - t0
    del opt
    return n / seconds, losses, DEV.peak_gib()


# --------------------------------------------------------------------------- the run

def build_world(work: Path, scale: Scale, tiny: bool):
    from vqatune.config import PrepareConfig
    from vqatune.data.prepare import prepare_dataset
    from vqatune.prompts import PromptsConfig

    t = time.perf_counter()
    model_dir = build_random_medgemma(work / "model", tiny=tiny)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    data_dir = work / "processed"
    prepare_dataset(PrepareConfig(synthetic_images=scale.images, image_size=scale.image_size, seed=1,
                                  test_size=scale.test_size, num_proc=scale.num_proc), PromptsConfig(), data_dir)
    return model_dir, data_dir, {"build_model_s": round(build_s, 1), "prepare_s": round(time.perf_counter() - t, 1)}


class StepTimer:
    """Trainer callback: wall time at the end of each optimizer step, to time a steady window.

    ``sync_steps``: the steps whose time waits for the device first (default: every step). A
    window timed between two synchronised steps is exact; the steps between them are not held
    up by the timer (the train stage itself waits for the device only when it logs)."""

    def __new__(cls, sync_steps=None):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times = {}

            def on_step_end(self, args, state, control, **kwargs):
                if sync_steps is None or state.global_step in sync_steps:
                    DEV.sync()
                self.times[state.global_step] = time.perf_counter()

        return _Timer()


def project_train_config(scale: Scale, *, lora_dropout: float | None = None, **overrides):
    """The project's training run in the benchmarks (this one and ddp_bench): nf4,
    sdpa, checkpointing, image cache, the guide's LoRA on the MLP, constant lr, no evaluation."""
    from vqatune.training.config import TrainConfig

    cfg = TrainConfig(
        quantization="4bit", attn_implementation="sdpa", gradient_checkpointing="auto",
        cache_image_features=True, prompt_mode="none",
        batch_size=scale.train_batch, gradient_accumulation_steps=1, eval_batch_size=scale.train_batch,
        max_steps=scale.train_steps, learning_rate=2e-4, lr_scheduler="constant", warmup=0,
        eval_steps=10_000, save_steps=10_000, logging_steps=1, load_best_model_at_end=False,
        max_eval_rows=scale.train_batch, dataloader_num_workers=scale.workers, optimizer="adamw_torch_fused"
        if DEV.type == "cuda" else "adamw_torch", seed=0,
    )
    cfg.lora.target_modules = "mlp"
    cfg.lora.vision_tower = False
    cfg.lora.modules_to_save = []
    if lora_dropout is not None:
        cfg.lora.dropout = lora_dropout
    return dataclasses.replace(cfg, **overrides)


def project_training(model_dir, data_dir, work: Path, scale: Scale, *, name: str, **overrides):
    from vqatune.training.run import run_training

    cfg = project_train_config(scale, **overrides)
    timer = StepTimer()
    DEV.reset()
    adapter_dir = work / f"adapter_{name}"
    result = run_training(cfg, model_dir, data_dir, adapter_dir, checkpoint_dir=work / f"ckpt_{name}",
                          callbacks=[timer], resume=False)
    steps = sorted(timer.times)
    first = scale.timed_from
    timed = [s for s in steps if s > first]
    seconds = timer.times[timed[-1]] - timer.times[first]
    examples = len(timed) * cfg.batch_size * cfg.gradient_accumulation_steps
    losses = [h["loss"] for h in result.log_history if "loss" in h and "eval_loss" not in h]
    out = {"examples_per_s": examples / seconds, "timed_steps": f"{first + 1}..{timed[-1]}",
           "run_examples_per_s": result.examples_per_s, "peak_gib": result.peak_memory_gib,
           "batch": cfg.batch_size, "gradient_checkpointing": cfg.gradient_checkpointing,
           "cache_image_features": cfg.cache_image_features, "losses": losses,
           "trainable_params": result.trainable_params, "fp32_residual": result.fp32_residual,
           "compiled_layers": result.compiled_layers, "dequantized_layers": result.dequantized_layers,
           "dequantize_base": cfg.dequantize_base, "checkpointed_layers": result.checkpointed_layers}
    return out, adapter_dir


def random_adapter(model_dir, work: Path, scale: Scale) -> Path:
    """The project's adapter (LoRA on the MLP, as project_train_config) with seeded random
    ``lora_B`` (std 1e-3, so it changes the answers), saved without training: ``--eval-only``
    times the evaluation alone on it."""
    from vqatune.models.loading import load_base_model
    from vqatune.models.lora import attach_lora

    base = load_base_model(model_dir, quantization="none", dtype="bfloat16", attn_implementation="sdpa",
                           device="cpu")
    model = attach_lora(base, project_train_config(scale).lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    adapter_dir = work / "adapter_random"
    model.save_pretrained(str(adapter_dir))
    free(model, base)
    return adapter_dir


def loss_parity(model_dir, data_dir, scale: Scale):
    """Guide recipe vs the project's levers over the same batches, from the same adapter."""
    from datasets import load_from_disk

    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.models.loading import load_processor

    processor = load_processor(model_dir)
    rows = load_from_disk(str(data_dir))["train"]
    collator = AnswerOnlyCollator(processor, "none", "right")
    bs = scale.parity_batch
    batches = [collator([rows[i] for i in range(s * bs, (s + 1) * bs)]) for s in range(scale.parity_steps)]
    timing_batches = [collator([rows[i]]) for i in range(scale.guide_steps + 2)]

    model = guide_model(model_dir)
    cast_adapters_like_sft_trainer(model)
    init = lora_state(model)
    guide_eps, _, guide_peak = train_loop(model, timing_batches, guide_loss, warmup=2)
    model.load_state_dict(init, strict=False)
    _, guide_losses, _ = train_loop(model, batches, guide_loss, warmup=0)
    free(model)
    del model

    curves = {}
    model = project_parity_model(model_dir)
    cast_adapters_like_sft_trainer(model)
    missing = set(init) - set(lora_state(model))
    if missing:
        raise RuntimeError(f"project adapter names differ from the guide's: {sorted(missing)[:3]}")
    for run in ("same_init", "dropout_seed_1", "seed_1"):
        model.load_state_dict(init, strict=False)
        if run == "seed_1":  # what rerunning with another seed changes: adapter init and dropout
            torch.manual_seed(1)
            for module in model.modules():
                if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters("default", True)
            cast_adapters_like_sft_trainer(model)
        _, curves[run], _ = train_loop(model, batches, project_loss, warmup=0, seed=0 if run == "same_init" else 1)
    free(model)
    del model
    # The project's levers with the guide's fp32 upcast of the weights, and with a bf16
    # residual stream (what the project did before): which one the guide's curve follows.
    for run, kwargs in (("upcast", {"upcast": True}), ("bf16_residual", {"fp32_residual": False})):
        model = project_parity_model(model_dir, **kwargs)
        cast_adapters_like_sft_trainer(model)
        model.load_state_dict(init, strict=False)
        _, curves[run], _ = train_loop(model, batches, project_loss, warmup=0)
        free(model)
        del model

    def mean_abs(a, b):
        return sum(abs(x - y) for x, y in zip(a, b)) / len(a)

    parity = {"batch": bs, "steps": scale.parity_steps, "guide": guide_losses, "project": curves["same_init"],
              "project_dropout_seed_1": curves["dropout_seed_1"], "project_seed_1": curves["seed_1"],
              "project_fp32_upcast": curves["upcast"],
              "mean_abs_gap_with_upcast": mean_abs(guide_losses, curves["upcast"]),
              "project_bf16_residual": curves["bf16_residual"],
              "mean_abs_gap_bf16_residual": mean_abs(guide_losses, curves["bf16_residual"]),
              "mean_abs_gap": mean_abs(guide_losses, curves["same_init"]),
              "max_abs_gap": max(abs(x - y) for x, y in zip(guide_losses, curves["same_init"])),
              "mean_abs_noise_dropout": mean_abs(curves["dropout_seed_1"], curves["same_init"]),
              "mean_abs_noise_seed": mean_abs(curves["seed_1"], curves["same_init"])}
    # Within noise: the two recipes differ less than one recipe differs from itself reseeded.
    parity["within_noise"] = parity["mean_abs_gap"] <= parity["mean_abs_noise_seed"]
    guide = {"examples_per_s": guide_eps, "peak_gib": guide_peak, "batch": 1}
    return guide, parity


def evaluation_inputs(data_dir, scale: Scale):
    from datasets import load_from_disk

    from vqatune.evaluation.run import _LazyImages, evaluation_rows, prompt_messages
    from vqatune.prompts import PROMPT_MODES

    test = load_from_disk(str(data_dir))["test"]
    test = test.select(evaluation_rows(test, min(scale.gen_rows, len(test)), 0))
    messages = {mode: [prompt_messages(m) for m in test[f"messages_{mode}"]] for mode in PROMPT_MODES}
    return test, messages, _LazyImages(test)


def guide_generation(model_dir, adapter_dir, data_dir, scale: Scale):
    """One at a time, greedy, 25 new tokens, nf4 + eager + unmerged adapter: the guide's loop,
    spread evenly over the six configurations."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vqatune.cpu_numerics import use_portable_4bit_path
    from vqatune.generation.generate import prompt_texts
    from vqatune.models.loading import load_processor
    from vqatune.prompts import PROMPT_MODES

    test, messages, images = evaluation_inputs(data_dir, scale)
    processor = load_processor(model_dir)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=DEV.compute_dtype)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=q, dtype=DEV.compute_dtype,
                                                       attn_implementation="eager", device_map={"": DEV.type})
    use_portable_4bit_path(base)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    jobs = [(mode, tuned, i) for i in range(scale.guide_gen // 6 + 1) for mode in PROMPT_MODES
            for tuned in (False, True)][:scale.guide_gen]
    seconds, tokens = 0.0, 0
    for n, (mode, tuned, i) in enumerate([jobs[0]] + jobs):  # the first is a warm-up
        text = prompt_texts(processor, [messages[mode][i]])
        inputs = processor(text=text, images=[[images[i]]], return_tensors="pt", add_special_tokens=False)
        inputs = to_device(inputs)
        ctx = contextlib.nullcontext() if tuned else model.disable_adapter()
        DEV.sync()
        t = time.perf_counter()
        with ctx, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=scale.new_tokens, do_sample=False)
        DEV.sync()
        if n:
            seconds += time.perf_counter() - t
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
    free(model, base)
    return {"examples_per_s": len(jobs) / seconds, "examples": len(jobs), "batch": 1,
            "mean_new_tokens": tokens / len(jobs)}


# Training levers beside the defaults: name -> (overrides of the defaults, results key, label);
# "dequantize_other" takes the dequantize_base setting the defaults did not get (train_lever).
TRAIN_LEVERS = {
    "dequantize_other": (None, None, None),
    "checkpointing_all": ({"gradient_checkpointing": True}, "project_checkpointing_all",
                          "the same, every layer recomputes (train.gradient_checkpointing: true)"),
    "checkpointing_none": ({"gradient_checkpointing": False}, "project_checkpointing_none",
                           "the same, no layer recomputes (train.gradient_checkpointing: false)"),
    # configs/profiles/medgemma-16gb.yaml's memory settings at the benchmark's batch
    "mode_16gb": ({"gradient_checkpointing": True, "dequantize_base": False}, "project_16gb",
                  "16 GB mode (every layer recomputes, nf4 dequantized per call)"),
}

# Generation levers beside the evaluate stage's path (static_graphs, as the MedGemma profile
# generates): name -> EvaluateConfig changes.
GENERATION_LEVERS = {
    "dynamic_cache": {"cache_implementation": "dynamic"},
    "shared_prefix": {"cache_implementation": "static_graphs", "share_image_prefix": True},
    "unmerged_adapter": {"merge_adapter": False},
    "static_graphs_bucket16": {"cache_implementation": "static_graphs", "bucket_tokens": 16},
    "grouped_attention": {"grouped_attention": True},
    # The MedGemma profile's two newest defaults, each turned off alone: what each one gives.
    "sdpa_attention": {"grouped_attention": False},
    "no_shared_prefix": {"share_image_prefix": False},
}


def medgemma_evaluate_config(scale: Scale):
    """configs/profiles/medgemma.yaml's ``evaluate:`` (read from it, so the benchmark follows the
    profile), at the benchmark's batch, answer length and device, on a bf16 base."""
    from vqatune.cli.profile import load_profile
    from vqatune.evaluation.config import EvaluateConfig

    profile = load_profile("medgemma", Path(__file__).resolve().parents[1])["evaluate"]
    return EvaluateConfig(**{**profile, "batch_size": scale.gen_batch, "max_new_tokens": scale.new_tokens,
                             "device": DEV.type, "quantization": "none", "cpu_threads": None})


def project_generation(model_dir, adapter_dir, data_dir, scale: Scale, *, plain_row: bool = False,
                       levers: tuple[str, ...] = (), profile_eval: bool = False):
    """The evaluate stage's generation: base loaded once (bf16), adapter on/off, image features
    cached, each image's pixels made once (img_id keys, one pixel cache for the six
    configurations), generate_answers over the six configurations; then batched vs one-at-a-time
    (without image keys: the parity check also compares the two encodings)."""
    from vqatune.evaluation.run import compiles_norms, generation_levers, load_for_evaluation as load_tuned_model
    from vqatune.evaluation.run import merges_adapter
    from vqatune.generation.generate import generate_answers
    from vqatune.models.compile import compile_norms

    cfg = medgemma_evaluate_config(scale)
    test, messages, images = evaluation_inputs(data_dir, scale)
    model, processor = load_tuned_model(model_dir, adapter_dir, cfg)
    compiled = compiles_norms(model, cfg)
    # First without compiled norms (the lever's yardstick), then as the evaluate stage runs.
    cache = generation_levers(model, dataclasses.replace(cfg, compile=False))
    uncompiled = None
    plain_row = plain_row and compiled
    if plain_row:
        plain = timed_six_configurations(model, processor, test, messages, images, cfg, cache)
        log.info("project generation without compiled norms %s", plain["examples_per_s"])
    if compiled:
        compile_norms(model)
    run = timed_six_configurations(model, processor, test, messages, images, cfg, cache)
    answers, per_config, timing, pixel_cache = run["answers"], run["per_config"], run["timing"], run["pixel_cache"]
    n = sum(len(a) for a in answers.values())
    if plain_row:
        uncompiled = {"examples_per_s": plain["examples_per_s"], "seconds_per_configuration": plain["per_config"],
                      "timing": plain["timing"],
                      "answers_equal_compiled": sum(a == b for key in answers
                                                    for a, b in zip(answers[key], plain["answers"][key])) / n}
    tok = processor.tokenizer
    gen = {"examples_per_s": run["examples_per_s"], "examples": n, "configurations": 6, "batch": cfg.batch_size,
           "peak_gib": DEV.peak_gib(),
           "vision_forwards": cache.misses if cache else None, "cache_hits": cache.hits if cache else None,
           "cache_implementation": cfg.cache_implementation, "warmup_s": run["warmup_s"],
           "compiled_norms": compiled, "merged_adapter": merges_adapter(cfg),
           "share_image_prefix": cfg.share_image_prefix,
           "seconds_per_configuration": per_config, "without_compiled_norms": uncompiled,
           # seconds over the six configurations: waiting for CPU-encoded inputs, host->device,
           # model.generate (synchronised), decoding; images processed once vs rows reusing them
           "timing": timing, "pixel_cache_gib": pixel_cache.memory_bytes() / 2**30}

    log.info("project generation (%s) %s", cfg.cache_implementation, gen)
    lever_answers = {}
    for n_lever, name in enumerate(levers):
        # A lever named twice runs twice (the second run warm: shapes and kernels seen before).
        label = name if name not in levers[:n_lever] else f"{name}#{levers[:n_lever].count(name) + 1}"
        lever_cfg = dataclasses.replace(cfg, **GENERATION_LEVERS[name])
        try:
            with lever_attention(model, lever_cfg):
                lever = timed_six_configurations(model, processor, test, messages, images, lever_cfg, cache)
        except Exception as err:  # a lever that fails is reported, not fatal to the benchmark
            log.exception("generation lever %s failed", label)
            gen.setdefault("levers", {})[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        lever_answers[label] = lever["answers"]
        timing_l = lever["timing"]
        capture = timing_l.get("graph_capture_s", 0.0)
        gen.setdefault("levers", {})[label] = {
            **GENERATION_LEVERS[name], "examples_per_s": lever["examples_per_s"],
            "examples_per_s_without_capture": n / max(sum(lever["per_config"]) - capture, 1e-9),
            "graph_capture_s": capture, "seconds_per_configuration": lever["per_config"], "timing": timing_l,
            "fallback": timing_l.get("graph_fallback"), "peak_gib": DEV.peak_gib(),
            "answers_equal_default": sum(a == b for key in answers
                                         for a, b in zip(answers[key], lever["answers"][key])) / n}
        log.info("generation lever %s %s", label, gen["levers"][label])
    # The caching allocator: retries (a cudaFree of every cached block, then the allocation again)
    # and reserved memory, which fragmentation would show.
    if DEV.type == "cuda":
        mem = torch.cuda.memory_stats()
        gen["allocator"] = {"alloc_retries": mem.get("num_alloc_retries"), "cuda_mallocs": mem.get("num_device_alloc"),
                            "reserved_peak_gib": mem.get("reserved_bytes.all.peak", 0) / 2**30}
    if profile_eval:
        gen["profile_tuned_static"] = profile_configuration(model, processor, test, messages, images, cfg,
                                                            pixel_cache, levers[-1] if levers else None)
    if STATIC_CACHE:
        # Opt-in: on an H100 the compilation of MedGemma-4B's decoding step did not finish within
        # ~6 minutes (2026-11-27), longer than the whole evaluation it would speed up here.
        gen["static_cache"] = static_cache_generation(model, processor, messages, images, test["img_id"],
                                                      pixel_cache, cfg)

    # Parity: the same model one row at a time (tuned and base, prompt mode none).
    k = min(scale.parity_rows // 2, len(test))
    match, total, examples, lever_match = 0, 0, [], {}
    for tuned in (True, False):
        ctx = tuned_weights(model, cfg) if tuned else model.disable_adapter()
        with ctx as merge:
            if tuned:
                merge()
            single = generate_answers(model, processor, messages["none"][:k], [images[i] for i in range(k)],
                                      batch_size=1, max_new_tokens=cfg.max_new_tokens)
        batched = answers[("none", tuned)][:k]
        same = [a == b for a, b in zip(single, batched)]
        match += sum(same)
        total += k
        for label, lever in lever_answers.items():
            hits = lever_match.setdefault(label, 0)
            lever_match[label] = hits + sum(a == b for a, b in zip(single, lever[("none", tuned)][:k]))
        examples += [{"tuned": tuned, "batched": b, "single": s, "identical": e}
                     for s, b, e in zip(single, batched, same) if not e or len(examples) < 2]
    parity = {"rows": total, "share_identical": match / total, "examples": examples,
              # each generation lever's batched answers against the same one-at-a-time answers
              "levers": {label: hits / total for label, hits in lever_match.items()}}
    prompt_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in
                        [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                         for m in messages["none"]]) / len(messages["none"])
    gen["mean_prompt_text_tokens"] = prompt_tokens
    free(model)
    return gen, parity


def profile_configuration(model, processor, test, messages, images, cfg, pixel_cache, lever: str | None) -> dict:
    """``torch.profiler`` over one tuned configuration (prompt mode static) as the timed runs make
    it, with ``lever``'s settings (None: the defaults): where its seconds go on the device and
    on the host, beside profile_eval_paths.py's model without the adapter."""
    from vqatune.generation.generate import generate_answers

    lever_cfg = dataclasses.replace(cfg, **GENERATION_LEVERS[lever]) if lever else cfg
    stats: dict = {}
    with lever_attention(model, lever_cfg), tuned_weights(model, lever_cfg) as merge:
        merge()
        result = profiled(lambda: generate_answers(
            model, processor, messages["static"], images, batch_size=lever_cfg.batch_size,
            max_new_tokens=lever_cfg.max_new_tokens, image_keys=test["img_id"], pixel_cache=pixel_cache,
            cache_implementation=lever_cfg.cache_implementation, stats=stats,
            bucket_tokens=lever_cfg.bucket_tokens, share_image_prefix=lever_cfg.share_image_prefix))
    result.update(lever=lever, timing=stats)
    log.info("profile of a tuned static configuration (%s)\n%s\n%s", lever or "defaults", result["top_cpu"],
             result["top_device"])
    return result


@contextlib.contextmanager
def lever_attention(model, cfg):
    """The model's attention as ``cfg.grouped_attention`` asks for one lever's run (the stage sets
    it once at load time, ``generation_levers``), and back as it was after it."""
    from vqatune.generation.attention import NAME, use_grouped_attention

    before = model.config._attn_implementation
    if cfg.grouped_attention:
        use_grouped_attention(model)
    elif before == NAME:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def timed_six_configurations(model, processor, test, messages, images, cfg, cache, warmup_rows: int = 16) -> dict:
    """One timed evaluation as a fresh stage runs it: an empty feature cache, a warm-up, then the
    six configurations with a new pixel cache.

    The warm-up pays what a stage pays once per process, not per batch, on ``warmup_rows`` rows
    of each prompt mode through the timed path (image keys, the static-graph loop, the shared
    image prefix where ``cfg`` has it): the CUDA context, compilation of the RMSNorms for the
    shapes' kinds (prompt, a group's prefix, the suffix over it, a decoding step), the encoder
    threads' processor copies (~0.4 s each). Its seconds are reported apart (``warmup_s``); the
    feature cache is emptied after it, so the timed run computes every image's features."""
    from vqatune.generation.generate import generate_answers
    from vqatune.prompts import PROMPT_MODES
    from vqatune.vision.pixel_cache import ImagePixelCache

    if cache is not None:
        cache.store.clear()
        cache.hits = cache.misses = 0
    DEV.reset()
    DEV.sync()
    t = time.perf_counter()
    rows = list(range(min(warmup_rows, len(images))))
    keys = [test["img_id"][i] for i in rows]
    for mode in PROMPT_MODES:
        generate_answers(model, processor, [messages[mode][i] for i in rows], [images[i] for i in rows],
                         batch_size=len(rows), max_new_tokens=2, image_keys=keys, pixel_cache=ImagePixelCache(),
                         cache_implementation=cfg.cache_implementation, bucket_tokens=cfg.bucket_tokens,
                         share_image_prefix=cfg.share_image_prefix)
    DEV.sync()
    warmup_s = time.perf_counter() - t
    if cache is not None:  # the six configurations' vision forwards only, none cached before
        cache.store.clear()
        cache.hits = cache.misses = 0
    pixel_cache, timing = ImagePixelCache(), {}
    answers, per_config = six_configurations(model, processor, messages, images, cfg, image_keys=test["img_id"],
                                             pixel_cache=pixel_cache, cache_implementation=cfg.cache_implementation,
                                             stats=timing)
    return {"answers": answers, "per_config": per_config, "timing": timing, "warmup_s": warmup_s,
            "pixel_cache": pixel_cache,
            "examples_per_s": sum(len(a) for a in answers.values()) / sum(per_config)}


def six_configurations(model, processor, messages, images, cfg, *, image_keys, pixel_cache,
                       cache_implementation, stats, seconds=None):
    """{base, tuned} x {none, static, adaptive} as the evaluate stage runs them: answers per
    (mode, tuned) and synchronised seconds per configuration (appended to ``seconds`` if given)."""
    from vqatune.generation.generate import add_stats, generate_answers
    from vqatune.prompts import PROMPT_MODES

    answers, seconds = {}, seconds if seconds is not None else []

    def configuration(mode, tuned, started=None):
        DEV.sync()
        t = time.perf_counter() if started is None else started
        own: dict = {}
        answers[(mode, tuned)] = generate_answers(
            model, processor, messages[mode], images, batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens, image_keys=image_keys, pixel_cache=pixel_cache,
            cache_implementation=cache_implementation, stats=own, bucket_tokens=cfg.bucket_tokens,
            share_image_prefix=cfg.share_image_prefix)
        DEV.sync()
        seconds.append(time.perf_counter() - t)
        add_stats(stats, own)
        # Where each configuration's seconds went (the sums above hide which one is slow).
        stats.setdefault("per_configuration", []).append(
            {"mode": mode, "tuned": tuned, "seconds": round(seconds[-1], 3),
             **{k: round(own[k], 3) for k in ("encode_wait_s", "image_features_s", "prefill_s", "graph_capture_s",
                                              "generate_s", "total_s") if k in own},
             "shared_prefix_groups": own.get("shared_prefix_groups"),
             "decode_steps": own.get("decode_steps")})

    # The stage's order: the base configurations (adapter off), then the tuned ones with the
    # adapter merged (the merge timed in the first of them).
    with model.disable_adapter():
        for mode in PROMPT_MODES:
            configuration(mode, False)
    with tuned_weights(model, cfg) as merge:
        for n, mode in enumerate(PROMPT_MODES):
            DEV.sync()
            t = time.perf_counter()
            if n == 0:
                merge()
            configuration(mode, True, started=t)
    return answers, seconds


@contextlib.contextmanager
def tuned_weights(model, cfg):
    """Yields ``merge()``: the adapter merged as the evaluate stage merges it
    (``evaluate.merge_adapter``; a no-op where it does not); on exit the base weights come back
    exactly, from a host copy made before (unmerging subtracts, which rounds in bf16), for the
    benchmark's next run on the same model."""
    from vqatune.evaluation.run import merged_adapter, merges_adapter

    if not merges_adapter(cfg):
        yield lambda: None
        return
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    saved = {name: m.base_layer.weight.detach().to("cpu", copy=True) for name, m in modules.items()}
    try:
        yield lambda: merged_adapter(model)
    finally:
        if any(m.merged for m in modules.values()):
            model.unmerge_adapter()
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].base_layer.weight.copy_(weight)


def static_cache_generation(model, processor, messages, images, image_keys, pixel_cache, cfg) -> dict:
    """The six configurations again with ``cache_implementation="static"``: transformers then
    compiles the decoding step (CUDA graphs); the first configuration pays the compilation."""
    timing, per_config = {}, []
    try:
        _, per_config = six_configurations(model, processor, messages, images, cfg, image_keys=image_keys,
                                           pixel_cache=pixel_cache, cache_implementation="static",
                                           stats=timing, seconds=per_config)
    except Exception as err:  # a lever that fails is reported, not fatal to the benchmark
        log.exception("static cache generation failed")
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300],
                "seconds_per_configuration": per_config}
    rows = len(images)
    return {"examples_per_s": 6 * rows / sum(per_config),
            "examples_per_s_after_first": 5 * rows / sum(per_config[1:]),
            "first_configuration_s": per_config[0], "seconds_per_configuration": per_config,
            "timing": timing}


# --------------------------------------------------------------------------- --profile-generation

def profile_generation(work: Path, out: Path, scale: Scale, tiny: bool) -> dict:
    """The evaluate stage's generation path (``generate_answers``, features cached, pixels made
    once) on ``scale.gen_rows`` rows in prompt mode none, batch ``scale.gen_batch``, timed:
    prefill only (1 new token) vs ``scale.new_tokens``, adapter on / off / merged, half and a
    quarter of the batch; then ``torch.profiler`` over one batch (top operators by CPU and by
    device time, and the device's busy share of the wall time)."""
    from vqatune.generation.generate import generate_answers
    from vqatune.models.lora import LoraSettings, attach_lora
    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.vision.pixel_cache import ImagePixelCache
    from vqatune.vision.feature_cache import maybe_install_image_feature_cache

    model_dir, data_dir, world = build_world(work, scale, tiny)
    batch, new_tokens = scale.gen_batch, scale.new_tokens
    results: dict = {"device": DEV.name, "torch": torch.__version__, "world": world, "rows": scale.gen_rows,
                     "batch": batch, "new_tokens": new_tokens}

    def save():
        (out / "profile_generation.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    # The evaluate stage's model: bf16 base, the project's LoRA (mlp, r16) with non-zero B so
    # the adapter really changes the function, image features cached.
    processor = load_processor(model_dir)
    base = load_base_model(model_dir, quantization="none", dtype=str(DEV.compute_dtype)[6:],
                           attn_implementation="sdpa", device=DEV.type)
    model = attach_lora(base, LoraSettings())
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    model.eval()
    maybe_install_image_feature_cache(model, training=False)
    test, messages, images = evaluation_inputs(data_dir, scale)
    msgs, keys = messages["none"], test["img_id"]
    rows = len(msgs)
    pixel_cache = ImagePixelCache()
    generate_answers(model, processor, msgs[:2], [images[0], images[1]], batch_size=2, max_new_tokens=2)

    def timed(label, *, batch=batch, new_tokens=new_tokens, context=contextlib.nullcontext):
        stats = {}
        DEV.sync()
        t = time.perf_counter()
        with context():
            answers = generate_answers(model, processor, msgs, images, batch_size=batch, max_new_tokens=new_tokens,
                                       image_keys=keys, pixel_cache=pixel_cache, stats=stats)
        DEV.sync()
        seconds = time.perf_counter() - t
        entry = {"seconds": round(seconds, 3), "examples_per_s": round(rows / seconds, 2),
                 "generate_s": round(stats["generate_s"], 3), "batches": stats["batches"],
                 "generate_s_per_batch": round(stats["generate_s"] / stats["batches"], 4),
                 "peak_gib": DEV.peak_gib()}
        results.setdefault("runs", {})[label] = entry
        log.info("%s %s", label, entry)
        save()
        return answers

    DEV.reset()
    timed("tuned_prefill_only", new_tokens=1)  # also fills the pixel and feature caches
    timed("tuned_prefill_only", new_tokens=1)
    tuned = timed("tuned")
    timed("base", context=model.disable_adapter)
    runs = results["runs"]
    results["decode_step_s"] = round((runs["tuned"]["generate_s_per_batch"]
                                      - runs["tuned_prefill_only"]["generate_s_per_batch"])
                                     / max(new_tokens - 1, 1), 4)
    results["prefill_s_per_batch"] = runs["tuned_prefill_only"]["generate_s_per_batch"]

    # Profile one batch of the tuned model.
    n = min(batch, rows)
    results["profile"] = profiled(lambda: generate_answers(
        model, processor, msgs[:n], [images[i] for i in range(n)], batch_size=n, max_new_tokens=8,
        image_keys=keys[:n], pixel_cache=pixel_cache))
    save()
    log.info("profile of one batch\n%s\n%s", results["profile"]["top_cpu"], results["profile"]["top_device"])

    # Levers: the adapter merged into the weights (the answers must not change), smaller batches.
    model.merge_adapter()
    merged = timed("tuned_merged")
    results["merged_identical_share"] = sum(a == b for a, b in zip(merged, tuned)) / rows
    model.unmerge_adapter()
    for smaller in sorted({max(batch // 4, 1), max(batch // 2, 1)} - {batch}):
        timed(f"tuned_batch_{smaller}", batch=smaller)
    save()
    free(model)
    return results


def profiled(fn, rows: int = 30) -> dict:
    """``fn()`` under ``torch.profiler`` (CPU, and CUDA on a GPU), synchronised: its wall time,
    the device's busy seconds (None on CPU) and the top operators by CPU and by device time."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    DEV.sync()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        DEV.sync()
        wall = time.perf_counter() - t
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages) / 1e6 if DEV.type == "cuda" else None
    return {"wall_s": round(wall, 3), "device_busy_s": busy,
            "top_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
            "top_device": averages.table(sort_by=device_key, row_limit=rows)}


# --------------------------------------------------------------------------- --collate

def _median_s(fn, reps: int) -> float:
    fn()  # warm-up: lazy imports, tokenizer caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def collate_cost(work: Path, out: Path, scale: Scale, tiny: bool) -> dict:
    """CPU seconds to collate one training batch (``scale.train_batch`` rows), two ways on the same
    rows: the processor on every image (``AnswerOnlyCollator``) vs image keys only
    (``image_keys=True``, what the training uses with precomputed features). On the builtin tiny
    model's processor, at its own size (64 px) and, full scale, at 896 px (MedGemma's), images
    resized first as the prepare stage does; one torch thread, as a DataLoader worker has.
    ``fetch_*_s``: the worker's other per-batch cost, reading the rows from an Arrow dataset
    with and without the PNG-encoded image column (a keyed batch never needs it)."""
    import copy

    from datasets import Dataset, load_from_disk
    from PIL import Image

    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.config import ModelConfig, PrepareConfig
    from vqatune.data.prepare import prepare_dataset
    from vqatune.models.loading import load_processor
    from vqatune.prompts import PromptsConfig
    from vqatune.models.tiny import build_tiny_gemma3

    n_rows, reps, sizes = scale.train_batch, (1 if tiny else 5), ([0] if tiny else [0, 896])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = build_tiny_gemma3(work / "collate_model", ModelConfig())
    prepare_dataset(PrepareConfig(synthetic_images=max(8, n_rows // 4), seed=0), PromptsConfig(),
                    work / "collate_processed")
    train = load_from_disk(str(work / "collate_processed"))["train"]
    base_rows = [train[i % len(train)] for i in range(n_rows)]
    base = load_processor(model_dir)
    measured = []
    try:
        for size in sizes:
            processor = base
            if size:
                processor = copy.deepcopy(base)
                processor.image_processor.size = {"height": size, "width": size}
            side = processor.image_processor.size["height"]
            rows = [{**row, "image": row["image"].convert("RGB").resize((side, side), Image.BILINEAR)}
                    for row in base_rows]
            pixels = AnswerOnlyCollator(processor, "none", "right")
            keyed = AnswerOnlyCollator(processor, "none", "right", image_keys=True)
            pixel_batch, keyed_batch = pixels(rows), keyed(rows)
            same_tokens = all(torch.equal(pixel_batch[k], keyed_batch[k])
                              for k in ("input_ids", "labels", "token_type_ids"))
            stored = Dataset.from_list(rows)  # images stored PNG-encoded, as data/processed holds them
            no_image = stored.remove_columns("image")
            entry = {
                "image_px": side, "same_tokens": same_tokens,
                "pixel_s": _median_s(lambda: pixels(rows), reps),
                "keyed_s": _median_s(lambda: keyed(rows), reps),
                "pixel_values_mb": round(pixel_batch["pixel_values"].numel() * 4 / 1e6, 1),
                "keyed_values_bytes": keyed_batch["pixel_values"].numel() * 8,
                "fetch_with_image_s": _median_s(lambda: [stored[i] for i in range(len(rows))], reps),
                "fetch_without_image_s": _median_s(lambda: [no_image[i] for i in range(len(rows))], reps),
            }
            entry["speedup"] = round(entry["pixel_s"] / max(entry["keyed_s"], 1e-9), 1)
            measured.append(entry)
            log.info("collate %s", entry)
    finally:
        torch.set_num_threads(threads)
    results = {"rows": n_rows, "reps": reps, "threads": 1, "cpu": platform.processor() or platform.machine(),
               "results": measured}
    (out / "collate.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# --------------------------------------------------------------------------- FLOPs and report

def mfu_table(results: dict, model_dir: Path, data_dir: Path, scale: Scale | None = None):
    """Model FLOPs per example (one FLOP model for every row) and MFU against the card's peak."""
    from datasets import load_from_disk

    from transformers import AutoConfig

    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.models.loading import load_processor

    config = AutoConfig.from_pretrained(model_dir)
    fm = flop_model(config)
    processor = load_processor(model_dir)
    train = load_from_disk(str(data_dir))["train"]
    sample = [train[i] for i in range(min(64, len(train)))]
    batch = AnswerOnlyCollator(processor, "none", "right")(sample)
    tokens = batch["attention_mask"].sum(1).float()
    answer_tokens = float((batch["labels"] != -100).sum(1).float().mean())
    qa_per_image = len(train) / len(set(train["img_id"]))
    T = float(tokens.mean())
    vision_share = fm["vision_per_image"] / qa_per_image
    # Training: forward + activation-gradient backward of the frozen language model (2x forward;
    # no weight gradients but LoRA's, ignored), logits at answer positions, the vision forward
    # once per distinct image. Recompute (gradient checkpointing) is overhead, not model FLOPs.
    train_flops = 2 * lm_forward_flops(fm, T, answer_tokens, T / 2) + vision_share
    # Generation: prefill of the prompt + one forward per new token (logits for each), vision
    # once per image for the six configurations.
    # New tokens per answer: counted on the guide's outputs (the same model, prompts and greedy
    # answers); the project's strings cannot be re-tokenized into the random model's ids.
    guide = results["evaluation"].get("guide")
    timing = results["evaluation"]["project"].get("timing") or {}
    # Without the guide's run: the project's generated tokens per batch (an upper bound per row).
    new = guide["mean_new_tokens"] if guide else timing.get("decode_steps", 0) / max(timing.get("batches", 1), 1)
    gen_flops = lm_forward_flops(fm, T - answer_tokens, 1, (T - answer_tokens) / 2) \
        + new * (fm["lm_linear_per_token"] + fm["lm_head_per_token"] + fm["attention_per_pair"] * T) \
        + fm["vision_per_image"] / (qa_per_image * 6)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in DEV.name), None)
    results["flop_model"] = {
        "peak_flops": peak, "mean_tokens": T, "mean_answer_tokens": answer_tokens,
        "qa_per_image": qa_per_image, "train_flops_per_example": train_flops,
        "generation_flops_per_example": gen_flops, **fm,
        "statement": "matmul FLOPs (2 per multiply-add) of the language model over the example's real tokens "
                     "(attention: 4*heads*head_dim per query-key pair), training = 2x forward (frozen base: "
                     "activation gradients only; recompute not counted), logits at answer positions; "
                     "vision forward once per distinct image (train) / per image for six configurations "
                     "(evaluation); MFU = examples/s x FLOPs per example / card peak (989.4 TFLOP/s bf16 dense)"}
    for section, flops in (("training", train_flops), ("evaluation", gen_flops)):
        rows = list(results[section].values()) + list((results[section].get("project") or {}).get("levers", {}).values())
        for row in rows:
            if isinstance(row, dict) and "examples_per_s" in row and peak:
                row["mfu"] = row["examples_per_s"] * flops / peak


def write_report(results: dict, out: Path):
    tr, ev = results["training"], results["evaluation"]
    lines = [f"Card: {results['device']}. {'Tiny stand-in model' if results['scale']['image_size'] < 896 else 'MedGemma-4B shapes'}, "
             f"random weights, {results['scale']['image_size']} px, "
             f"~{results['flop_model']['mean_tokens']:.0f} tokens per example.", "",
             "| run | examples/s | vs guide | peak GiB | MFU |", "|---|---|---|---|---|"]

    def row(label, r, base):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        versus = f"{r['examples_per_s'] / base:.1f}x" if base else "-"
        lines.append(f"| {label} | {r['examples_per_s']:.2f} | {versus} | {peak} | {mfu} |")

    g = tr["guide"]["examples_per_s"] if "guide" in tr else None
    if g:
        row("train: guide recipe (nf4, eager, batch 1, k-bit prep, LoRA MLP)", tr["guide"], g)
    for key, r in tr.items():
        if key != "guide" and "examples_per_s" in r:
            row(f"train: project, {r['label']}"
                + (f" [{r['checkpointed_layers']} layers recompute]" if r.get("checkpointed_layers") is not None
                   and key != "project_default" else ""), r, g)
        elif key != "guide":
            lines.append(f"| train: project, {r.get('label')} | failed: {r.get('error')} | | | |")
    peer = results.get("unsloth")
    if peer is not None:
        for n, entry in (peer.get("batches") or {}).items():
            if "examples_per_s" in entry:
                row(f"train: Unsloth {peer.get('unsloth', '')} FastVisionModel, batch {n} (305 tokens, vision every step)",
                    entry, g)
            else:
                lines.append(f"| train: Unsloth, batch {n} | failed: {entry.get('error')} | | | |")
        if not peer.get("best_examples_per_s"):
            lines.append(f"| train: Unsloth | not measured: {peer.get('error')} | | | |")
    ge = ev["guide"]["examples_per_s"] if "guide" in ev else None
    if ge:
        row("evaluate: guide (one at a time, nf4, eager, 25 new tokens)", ev["guide"], ge)
    row(f"evaluate: project (generate_answers, batch {ev['project']['batch']}, bf16, image cache, "
        + ("compiled norms, " if ev["project"].get("compiled_norms") else "")
        + f"{ev['project'].get('cache_implementation', 'dynamic')} cache, "
        + ("adapter merged, " if ev["project"].get("merged_adapter") else "")
        + ("image prefix shared, " if ev["project"].get("share_image_prefix") else "") + "six configurations)",
        ev["project"], ge)
    plain = ev["project"].get("without_compiled_norms")
    if plain:
        row("evaluate: project, the same without compiled norms", {"examples_per_s": plain["examples_per_s"]}, ge)
    for label, lever in (ev["project"].get("levers") or {}).items():
        if "examples_per_s" not in lever:
            lines.append(f"| evaluate: project, {label} | failed: {lever.get('error')} | | | |")
            continue
        row(f"evaluate: project, {label} (graph capture {lever['graph_capture_s']:.1f} s inside; "
            f"answers = the default row {100 * lever['answers_equal_default']:.1f}%"
            + (f"; fell back: {lever['fallback']}" if lever.get("fallback") else "") + ")", lever, ge)
        row(f"evaluate: project, {label}, capture time left out", {"examples_per_s": lever["examples_per_s_without_capture"]}, ge)
    static = ev["project"].get("static_cache") or {}
    if "examples_per_s" in static:
        row(f"evaluate: project, static KV cache + compiled decoding (first configuration "
            f"{static['first_configuration_s']:.0f} s incl. compile)", {**static, "peak_gib": None}, ge)
        row("evaluate: project, static KV cache, after the first configuration",
            {"examples_per_s": static["examples_per_s_after_first"]}, ge)
    elif static:
        lines.append(f"| evaluate: project, static KV cache | failed: {static['error']} | | | |")
    timing = ev["project"].get("timing") or {}
    if timing:
        lines += ["", "Where the project's generation time went (six configurations, seconds): "
                  + ", ".join(f"{k} {timing[k]:.1f}" for k in ("encode_wait_s", "transfer_s", "image_features_s",
                                                                 "generate_s", "prefill_s", "graph_capture_s",
                                                                 "decode_s", "total_s") if k in timing)
                  + (f"; {timing['shared_prefix_rows']} rows in {timing['shared_prefix_groups']} shared image prefixes"
                     if timing.get("shared_prefix_rows") else "")
                  + f"; images processed {timing.get('images_processed')}, reused {timing.get('images_reused')}"
                  + f"; tokens generated per batch {timing.get('decode_steps', 0) / max(timing.get('batches', 1), 1):.1f}."]
    best_t, best_e = results["train_examples_per_s_best"], results["eval_examples_per_s_best"]
    summary = [f"train_examples_per_s {results['train_examples_per_s']:.2f} (best {best_t['examples_per_s']:.2f}: "
               f"{best_t['run']}), eval_examples_per_s {results['eval_examples_per_s']:.2f} (best "
               f"{best_e['examples_per_s']:.2f}: {best_e['run']})"
               + (f", unsloth_ratio {results['unsloth_ratio']:.2f}" if "unsloth_ratio" in results else "")
               + (f", 16 GB mode: {results['mode_16gb']['examples_per_s']:.2f} examples/s at "
                  f"{results['mode_16gb']['peak_gib']:.1f} GiB peak." if results["targets"]["mode_16gb"] is not None
                  else ", 16 GB mode: no run under 15 GiB in this call (--train-levers mode_16gb).")]
    if "train_speedup" in results:
        summary.append(f"train_speedup {results['train_speedup']:.1f}x"
                       + (f", eval_speedup {results['eval_speedup']:.1f}x" if "eval_speedup" in results else "") + ".")
    lines += [""] + summary
    p, q = results["parity"]["training"], results["parity"]["generation"]
    if "mean_abs_gap" in p:
        lines.append(
            f"Loss parity ({p['steps']} steps, batch {p['batch']}): mean |guide - project| {p['mean_abs_gap']:.4f}, "
            f"max {p['max_abs_gap']:.4f}; noise: project reseeded (adapter init + dropout) mean "
            f"{p['mean_abs_noise_seed']:.4f}, dropout seed only {p['mean_abs_noise_dropout']:.4f}: "
            f"{'within noise' if p['within_noise'] else 'NOT within noise'}"
            + (f"; the project's levers with the guide's fp32 upcast: mean gap {p['mean_abs_gap_with_upcast']:.4f}"
               if "mean_abs_gap_with_upcast" in p else "")
            + (f"; with a bf16 residual stream (before train.fp32_residual): mean gap "
               f"{p['mean_abs_gap_bf16_residual']:.4f}." if "mean_abs_gap_bf16_residual" in p else "."))
    else:
        lines.append(f"Loss parity: not run ({p.get('skipped')}).")
    lines.append(f"Generation parity: {100 * q['share_identical']:.1f}% of {q['rows']} batched answers identical to "
                 "one-at-a-time answers of the same model"
                 + "".join(f"; {label}: {100 * v:.1f}%" for label, v in (q.get("levers") or {}).items()) + ".")
    text = "\n".join(lines) + "\n"
    (out / "gpu_bench.md").write_text(text)
    print(text)


def main(argv=None):
    global DEV, STATIC_CACHE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--work", default=None, help="scratch folder (model, data, adapters); default: a temp dir")
    ap.add_argument("--tiny", action="store_true", help="the builtin tiny model on CPU (smoke test)")
    ap.add_argument("--parity-rows", type=int, help="rows generated one at a time for the parity check")
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--parity-only", action="store_true",
                      help="only the training loss-parity runs (gpu_bench_parity.json)")
    part.add_argument("--profile-generation", action="store_true",
                      help="only the profile of the evaluate stage's generation (profile_generation.json)")
    part.add_argument("--collate", action="store_true",
                      help="only the CPU cost of collating a training batch, pixels vs image keys (collate.json)")
    ap.add_argument("--static-cache", action="store_true",
                    help="also time generation with a static KV cache (compiled decoding)")
    ap.add_argument("--skip-guide", action="store_true",
                    help="without the guide's recipe (its training, the loss parity, its generation)")
    ap.add_argument("--levers", action="store_true",
                    help="every training and generation lever beside the defaults (--train-levers and "
                         "--gen-levers name a few)")
    ap.add_argument("--train-levers", default="", help="comma-separated training levers, each run beside "
                    f"the defaults: {', '.join(TRAIN_LEVERS)}")
    ap.add_argument("--gen-levers", default="", help="comma-separated generation levers: "
                    f"{', '.join(GENERATION_LEVERS)}")
    ap.add_argument("--profile-eval", action="store_true",
                    help="also torch.profiler over one tuned configuration, with the last --gen-levers lever")
    ap.add_argument("--uncompiled-norms-row", action="store_true",
                    help="also the evaluation without compiled RMSNorms first (~1 minute more)")
    ap.add_argument("--eval-only", action="store_true",
                    help="only the evaluation (and its parity), on a random untrained adapter: no training, "
                         "no Unsloth (a quick measurement of generation levers)")
    ap.add_argument("--unsloth", action="store_true",
                    help="Unsloth's FastVisionModel training on the same model, first, in its own process")
    ap.add_argument("--unsloth-path", default=".unsloth", help="Unsloth's carried package tree")
    ap.add_argument("--unsloth-timeout", type=int, default=240, help="seconds for the Unsloth process")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    DEV = Device()
    STATIC_CACHE = args.static_cache or args.tiny
    scale = TINY if args.tiny else FULL
    if args.parity_rows:
        scale = dataclasses.replace(scale, parity_rows=args.parity_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.parity_only:
            return run_parity(work, out, scale, args.tiny)
        if args.profile_generation:
            return profile_generation(work, out, scale, args.tiny)
        if args.collate:
            return collate_cost(work, out, scale, args.tiny)
        return run(work, out, scale, args.tiny, skip_guide=args.skip_guide, levers=args.levers,
                   unsloth=args.unsloth, unsloth_path=Path(args.unsloth_path), unsloth_timeout=args.unsloth_timeout,
                   train_levers=lever_names(args.train_levers, TRAIN_LEVERS, ap, "--train-levers"),
                   gen_levers=lever_names(args.gen_levers, GENERATION_LEVERS, ap, "--gen-levers"),
                   uncompiled_norms_row=args.uncompiled_norms_row, eval_only=args.eval_only,
                   profile_eval=args.profile_eval)


def lever_names(text: str, known: dict, ap, flag: str) -> tuple[str, ...]:
    """``--train-levers a,b`` -> ("a", "b"); an unknown name stops here, before the world is built."""
    names = tuple(x for x in text.split(",") if x)
    unknown = [x for x in names if x not in known]
    if unknown:
        ap.error(f"{flag}: unknown lever(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def train_lever(name: str, defaults: dict) -> tuple[dict, str, str]:
    """(overrides of the defaults, results key, label) of a training lever; ``defaults``: the
    default row, which decides what dequantize_other compares against."""
    if name == "dequantize_other":
        other = not defaults["dequantized_layers"]
        return ({"dequantize_base": other}, "project_dequantize_" + ("on" if other else "off"),
                "the same, nf4 dequantized once (train.dequantize_base: true)" if other else
                "the same, nf4 dequantized per call (train.dequantize_base: false)")
    return TRAIN_LEVERS[name]


def run_parity(work: Path, out: Path, scale: Scale, tiny: bool) -> dict:
    """The loss-parity runs alone (a device call too short for the whole benchmark)."""
    model_dir, data_dir, world = build_world(work, scale, tiny)
    guide, parity = loss_parity(model_dir, data_dir, scale)
    results = {"device": DEV.name, "torch": torch.__version__, "world": world, "guide": guide, "parity": parity}
    (out / "gpu_bench_parity.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    log.info("parity %s", {k: v for k, v in parity.items() if not isinstance(v, list)})
    return results


def unsloth_peer(model_dir: Path, out: Path, *, path: Path, timeout: int) -> dict:
    """Unsloth's FastVisionModel training on the same model (benchmarks/unsloth_peer.py), in its
    own process with ``path`` (Unsloth's carried package tree) first on PYTHONPATH; its output
    goes to ``out/unsloth_peer.log``. Returns its result, or why it did not run."""
    if DEV.type != "cuda":
        return {"error": f"not run: Unsloth needs a CUDA GPU (this run is on {DEV.name})"}
    if not (path / "unsloth").is_dir():
        return {"error": f"not run: {path}/unsloth not found (carry Unsloth's tree, see unsloth_peer.py)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path.resolve()), os.environ.get("PYTHONPATH", "")]),
           "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    logfile = out / "unsloth_peer.log"
    started = time.perf_counter()
    result: dict = {}
    with logfile.open("w") as fh:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("unsloth_peer.py")),
                                   "--model", str(model_dir)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            result["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["error"] = f"timed out after {timeout} s (log: unsloth_peer.log)"
    lines = logfile.read_text(errors="replace").splitlines()
    final = [json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("UNSLOTH_RESULT ")]
    if final:
        result = {**final[-1], **{k: v for k, v in result.items() if k != "error" or "error" not in final[-1]}}
    else:  # killed or crashed: what it measured before, and the end of its log
        progress = [json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("UNSLOTH_PROGRESS ")]
        result["batches"] = {str(e["batch"]): e for e in progress}
        rates = [e["examples_per_s"] for e in progress if "examples_per_s" in e]
        if rates:
            result["best_examples_per_s"] = max(rates)
        result.setdefault("error", "no result line (log: unsloth_peer.log)")
        result["log_tail"] = lines[-15:]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def run(work: Path, out: Path, scale: Scale, tiny: bool, *, skip_guide: bool = False, levers: bool = False,
        unsloth: bool = False, unsloth_path: Path = Path(".unsloth"), unsloth_timeout: int = 240,
        train_levers: tuple[str, ...] = (), gen_levers: tuple[str, ...] = (),
        uncompiled_norms_row: bool = False, eval_only: bool = False, profile_eval: bool = False) -> dict:
    """The whole benchmark. ``skip_guide``: without the guide's recipe (training, loss parity,
    one-at-a-time generation), for a call too short for everything; ``levers``: the issue-25
    levers side by side (training with the nf4 weights dequantized per call vs once; generation
    with the dynamic cache and with length buckets); ``train_levers`` / ``gen_levers``: names
    from TRAIN_LEVERS / GENERATION_LEVERS, each run beside the defaults; ``uncompiled_norms_row``:
    the evaluation without compiled RMSNorms too; ``unsloth``: Unsloth's training on the same
    model first, in its own process; ``eval_only``: the evaluation alone, on a random adapter
    (no training, no Unsloth, no summary against the targets)."""
    import peft
    import transformers
    import trl

    started = time.perf_counter()
    if levers:
        train_levers, gen_levers = tuple(TRAIN_LEVERS), tuple(GENERATION_LEVERS)
    results = {"device": DEV.name, "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "trl": trl.__version__, "scale": dataclasses.asdict(scale),
               "options": {"skip_guide": skip_guide, "levers": levers, "unsloth": unsloth,
                           "train_levers": list(train_levers), "gen_levers": list(gen_levers)}}
    try:
        import bitsandbytes
        results["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass

    def save():
        results["wall_s"] = round(time.perf_counter() - started, 1)
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    model_dir, data_dir, results["world"] = build_world(work, scale, tiny)
    log.info("world %s", results["world"])
    if eval_only:
        results["options"]["eval_only"] = True
        results["evaluation"], results["parity"] = {}, {}
        results["evaluation"]["project"], results["parity"]["generation"] = project_generation(
            model_dir, random_adapter(model_dir, work, scale), data_dir, scale, plain_row=uncompiled_norms_row,
            levers=gen_levers, profile_eval=profile_eval)
        save()
        return results
    if unsloth:
        # First, on an otherwise idle card; its timeout bounds it, and the project's parts follow.
        results["unsloth"] = unsloth_peer(model_dir, out, path=unsloth_path, timeout=unsloth_timeout)
        save()
        log.info("unsloth %s", results["unsloth"])

    # Training: the guide, the parity runs, then the project through run_training.
    results["training"], results["parity"] = {}, {}
    if skip_guide:
        results["parity"]["training"] = {"skipped": "--skip-guide"}
    else:
        guide, results["parity"]["training"] = loss_parity(model_dir, data_dir, scale)
        results["training"]["guide"] = guide
        save()
        log.info("guide training %s; parity %s", guide, {k: v for k, v in results["parity"]["training"].items()
                                                         if not isinstance(v, list)})
    fast, adapter_dir = project_training(model_dir, data_dir, work, scale, name="default")
    ckpt = fast.get("checkpointed_layers")
    ckpt = "checkpointing" if ckpt is None else f"checkpointing auto: {ckpt} layers recompute"
    fast["label"] = (f"defaults (nf4, sdpa, batch {fast['batch']}, {ckpt}, image cache"
                     + (", fp32 residual stream" if fast["fp32_residual"] else "")
                     + (", compiled layers" if fast["compiled_layers"] else "")
                     + (", nf4 dequantized once" if fast["dequantized_layers"] else "") + ")")
    results["training"]["project_default"] = fast
    save()
    log.info("project training %s", {k: v for k, v in fast.items() if k != "losses"})
    for lever in train_levers:
        # Each lever side by side: the defaults with one setting changed.
        overrides, key, label = train_lever(lever, fast)
        try:
            row, _ = project_training(model_dir, data_dir, work, scale, name=lever, **overrides)
        except Exception as err:  # e.g. out of memory: reported, not fatal to the benchmark
            log.exception("training lever %s failed", lever)
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
            free()
        row["label"] = label
        results["training"][key] = row
        save()
        log.info("project training, %s %s", lever, {k: v for k, v in row.items() if k != "losses"})
    # Evaluation.
    results["evaluation"] = {}
    if not skip_guide:
        results["evaluation"]["guide"] = guide_generation(model_dir, adapter_dir, data_dir, scale)
        save()
        log.info("guide generation %s", results["evaluation"]["guide"])
    results["evaluation"]["project"], results["parity"]["generation"] = project_generation(
        model_dir, adapter_dir, data_dir, scale, plain_row=uncompiled_norms_row,
        levers=gen_levers, profile_eval=profile_eval)
    save()
    log.info("project generation %s", results["evaluation"]["project"])
    summarize(results, model_dir, data_dir, scale)
    save()
    write_report(results, out)
    return results


def summarize(results: dict, model_dir: Path, data_dir: Path, scale: Scale) -> None:
    """MFU, the headline figures, the speedups against the guide (when it ran), the Unsloth ratio
    and the targets, from what ``results`` holds."""
    mfu_table(results, model_dir, data_dir, scale)
    tr, ev = results["training"], results["evaluation"]
    project_rows = {k: r for k, r in tr.items() if k != "guide" and "examples_per_s" in r}
    best_key = max(project_rows, key=lambda k: project_rows[k]["examples_per_s"])
    results["train_examples_per_s"] = tr["project_default"]["examples_per_s"]
    results["train_examples_per_s_best"] = {"examples_per_s": project_rows[best_key]["examples_per_s"], "run": best_key}
    results["eval_examples_per_s"] = ev["project"]["examples_per_s"]
    lever_rates = {k: r["examples_per_s"] for k, r in (ev["project"].get("levers") or {}).items()
                   if "examples_per_s" in r}
    best_eval = max([("project", results["eval_examples_per_s"])] + list(lever_rates.items()), key=lambda kv: kv[1])
    results["eval_examples_per_s_best"] = {"examples_per_s": best_eval[1], "run": best_eval[0]}
    if "guide" in tr:
        g = tr["guide"]["examples_per_s"]
        results["train_speedup"] = tr["project_default"]["examples_per_s"] / g
        results["train_speedup_best"] = project_rows[best_key]["examples_per_s"] / g
    if "guide" in ev:
        ge = ev["guide"]["examples_per_s"]
        results["eval_speedup"] = ev["project"]["examples_per_s"] / ge
        results["eval_speedup_best"] = best_eval[1] / ge
        static = ev["project"].get("static_cache") or {}
        if "examples_per_s" in static:
            results["eval_speedup_static_cache"] = static["examples_per_s"] / ge
    peer = results.get("unsloth") or {}
    if peer.get("best_examples_per_s"):
        results["unsloth_ratio"] = project_rows[best_key]["examples_per_s"] / peer["best_examples_per_s"]
        results["unsloth_ratio_defaults"] = tr["project_default"]["examples_per_s"] / peer["best_examples_per_s"]
    fits = [r for r in project_rows.values() if (r.get("peak_gib") or 0) <= 15.0]
    results["mode_16gb"] = max(fits, key=lambda r: r["examples_per_s"]) if fits else \
        {"examples_per_s": None, "peak_gib": None, "label": "no training row under 15 GiB in this run"}
    gen_parity = results["parity"]["generation"]
    results["targets"] = {
        "train_80": results["train_examples_per_s_best"]["examples_per_s"] >= 80,
        "eval_120": results["eval_examples_per_s_best"]["examples_per_s"] >= 120,
        "unsloth_6_5x": results.get("unsloth_ratio", 0) >= 6.5,
        # None: no row of this run fits 15 GiB (the 16 GB mode is a training lever, not a default)
        "mode_16gb": results["mode_16gb"]["examples_per_s"] >= 11.9 if fits else None,
        "generation_parity_100": gen_parity["share_identical"] == 1.0
        and all(v == 1.0 for v in gen_parity.get("levers", {}).values()),
        "loss_parity": results["parity"]["training"].get("within_noise"),
    }
    if "train_speedup_best" in results:
        results["targets"]["train_20x"] = results["train_speedup_best"] >= 20
    if "eval_speedup" in results:
        results["targets"]["eval_100x"] = results["eval_speedup"] >= 100


if __name__ == "__main__":
    main()
