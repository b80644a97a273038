"""Evaluation: the base and the tuned model under each prompt mode, plus the majority baseline.

The base model is loaded once; the tuned model is the same weights with the LoRA adapter attached
through peft and switched off (``disable_adapter``) for the base configurations, then merged into
the weights for the tuned ones (``evaluate.merge_adapter``), so the two never coexist in memory.
Every configuration answers the same test rows with the shared generator and is scored by
``vqatune.evaluation.metrics``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Optional

from ..generation.generate import generate_answers
from ..prompts import PROMPT_MODES
from ..provenance import peak_memory
from .batching import resolve_batch_size
from .config import ABLATION, MAJORITY, MODELS, EvaluateConfig, configuration_name
from .metrics import exact_match, majority_predictions, make_bertscore, mean_scores, mean_scores_by, score_configurations

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluationReport:
    # {"base": {mode: scores}, "tuned": {mode: scores}, "image_ablation": {"none": scores},
    #  "majority": scores, "generation": {...}}
    scores: dict
    # The same shape, each leaf a {category: scores} mapping.
    by_category: dict
    # {"base_none": [rows], ..., "image_ablation_none": [rows], "majority": [rows]}: what each configuration answered.
    predictions: dict[str, list[dict]]


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


class BlankImages:
    """``images`` with every image replaced by a blank one of the same size (the image ablation).

    Uniform mid-grey: the processor's normalisation (mean 0.5, std 0.5) turns it into all-zero
    pixels, an image that carries nothing. ``keys`` names them apart from the real images (one
    blank per size) so no pixel cache hands back a real image's pixels for a blank one.
    """

    COLOUR = (128, 128, 128)

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.new("RGB", self.images[i].size, self.COLOUR)

    def keys(self) -> list[str]:
        return [f"blank:{w}x{h}" for w, h in (self.images[i].size for i in range(len(self.images)))]


def prompt_messages(stored: list[dict]) -> list[dict]:
    """Stored training messages without the assistant answer: exactly what the model is asked.

    ``data/processed`` holds the messages prepare built with ``prompts.build_messages`` for each
    mode, so evaluation asks precisely what training taught, with no second copy of the prompts.
    """
    if not stored or stored[-1]["role"] != "assistant":
        raise ValueError("a messages_* column must end with the assistant's answer; rerun prepare")
    return stored[:-1]


def load_for_evaluation(base_dir: str | Path, adapter_dir: str | Path, cfg: EvaluateConfig,
                        trust_remote_code: bool = False):
    """(model, processor): the base model once, with the adapter attached
    (``models.loading.load_tuned_model``), loaded as ``evaluate:`` says."""
    from ..models.loading import load_tuned_model

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found; run the train stage "
                                "(dvc repro train) or pass --adapter")
    return load_tuned_model(base_dir, adapter_dir, quantization=cfg.quantization, dtype=cfg.dtype,
                            attn_implementation=cfg.attn_implementation,
                            trust_remote_code=trust_remote_code, device=cfg.device)


def generation_levers(model, cfg: EvaluateConfig):
    """What the evaluate stage (and the GPU benchmark) switch on before generating: the image
    feature cache, on CUDA by default compiled RMSNorms, and grouped attention where
    ``evaluate.grouped_attention`` asks for it. Returns the feature cache or None."""
    from ..models.compile import compile_norms
    from ..vision.feature_cache import maybe_install_image_feature_cache

    # On a GPU without a memory budget the features stay on it (~1.3 MB an image on MedGemma, ~1.7
    # GB for Kvasir-VQA's test split): a keyed batch of 384 rows then gathers them there instead
    # of stacking ~0.5 GB on the host and copying it. With max_memory_gib (a small card) on the host.
    on_device = model.get_input_embeddings().weight.device.type == "cuda" and cfg.max_memory_gib is None
    cache = maybe_install_image_feature_cache(model, training=False, enabled=cfg.cache_image_features,
                                              device=None if on_device else "cpu")
    if compiles_norms(model, cfg):
        log.info("torch.compile: %d RMSNorm modules (the first batch compiles)", compile_norms(model))
    if cfg.grouped_attention:
        from ..generation.attention import use_grouped_attention

        if use_grouped_attention(model):
            log.info("attention: grouped-query heads without KV copies (sdpa_grouped)")
    return cache


def merges_adapter(cfg: EvaluateConfig) -> bool:
    """``evaluate.merge_adapter`` (null = when the base is not quantized)."""
    return cfg.quantization == "none" if cfg.merge_adapter is None else cfg.merge_adapter


def merged_adapter(model):
    """The adapter merged into ``model``'s weights (peft ``merge_adapter``), for the tuned
    configurations after the base ones: a tuned forward then costs what a base forward costs, with
    no per-layer LoRA matmuls, additions and scalings (on MedGemma the unmerged adapter made a
    384-row batch ~1.5x slower, gpu_bench's generation profile). The model stays merged: unmerging
    subtracts, which rounds in bf16, so nothing runs the base weights after this."""
    model.merge_adapter()
    return model


def compiles_norms(model, cfg: EvaluateConfig) -> bool:
    """``evaluate.compile`` for ``model`` (null = on when it sits on a CUDA device)."""
    from ..models.compile import compile_wanted

    return compile_wanted(cfg.compile, model.get_input_embeddings().weight.device.type)


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
    from ..models.loading import resolve_device

    with _cpu_threads(cfg.cpu_threads, resolve_device(cfg.device)):
        return _evaluate(base_dir, adapter_dir, data_dir, cfg, trust_remote_code, progress)


def _longest_prompts_probe(model, processor, test, images, cfg: EvaluateConfig):
    """probe(n): the tuned model answers the n test rows with the longest (adaptive) prompts."""
    def probe(n: int) -> None:
        messages = [prompt_messages(m) for m in test["messages_adaptive"]]
        longest = sorted(range(len(messages)), key=lambda i: -len(str(messages[i])))[:n]
        generate_answers(model, processor, [messages[i] for i in longest], [images[i] for i in longest],
                         batch_size=len(longest), max_new_tokens=cfg.max_new_tokens,
                         cache_implementation=cfg.cache_implementation,
                         bucket_tokens=cfg.bucket_tokens)
    return probe


def _evaluate(base_dir, adapter_dir, data_dir, cfg: EvaluateConfig, trust_remote_code: bool,
              progress: bool) -> EvaluationReport:
    import torch

    from ..data.processed import load_prepared
    from ..provenance import device_name
    from ..vision.pixel_cache import ImagePixelCache

    # Data
    splits = load_prepared(data_dir)
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
    model, processor = load_for_evaluation(base_dir, adapter_dir, cfg, trust_remote_code)
    generation_levers(model, cfg)
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bertscore = make_bertscore(cfg.bertscore_model, cfg.bertscore_layers, cfg.bertscore_rescale,
                               cfg.bertscore_batch_size, device=str(device))

    batch_size, batch_info = resolve_batch_size(
        cfg.batch_size, device, _longest_prompts_probe(model, processor, test, images, cfg),
        max_memory_gib=cfg.max_memory_gib)

    meta = test.select_columns(["img_id", "question", "category", "answer"]).to_list()
    total_seconds, total_examples = 0.0, 0
    timing: dict = {}
    # Each configuration's answers and speed; all are scored together at the end (one BERTScore call).
    generated: dict[tuple[str, str], tuple[list[str], dict]] = {}

    def run_configuration(model_name: str, mode: str, messages, images_, keys, pixels, adapter) -> None:
        """Generate and time one configuration."""
        nonlocal total_seconds, total_examples
        start = time.perf_counter()
        with adapter:
            answers = generate_answers(model, processor, messages, images_, batch_size=batch_size,
                                       max_new_tokens=cfg.max_new_tokens, progress=progress,
                                       image_keys=keys, pixel_cache=pixels,
                                       cache_implementation=cfg.cache_implementation, stats=timing,
                                       bucket_tokens=cfg.bucket_tokens, share_image_prefix=cfg.share_image_prefix)
        seconds = time.perf_counter() - start
        total_seconds += seconds
        total_examples += len(answers)
        peak, _ = peak_memory(device)
        generated[(model_name, mode)] = (answers, {"examples_per_s": round(len(answers) / seconds, 3),
                                                   "peak_memory_gib": round(peak, 3)})
        log.info("%s: exact match %.3f, %.2f examples/s", configuration_name(model_name, mode),
                 sum(exact_match(a, r) for a, r in zip(answers, references)) / len(answers),
                 len(answers) / seconds)

    # Generation: the base configurations run the same weights with the adapter switched off,
    # then the tuned ones, with the adapter merged into the weights unless merge_adapter is false.
    messages = {mode: [prompt_messages(m) for m in test[f"messages_{mode}"]] for mode in PROMPT_MODES}
    for mode in PROMPT_MODES:
        run_configuration("base", mode, messages[mode], images, image_keys, pixel_cache, model.disable_adapter())
    if merges_adapter(cfg):
        start = time.perf_counter()
        merged_adapter(model)
        total_seconds += time.perf_counter() - start  # generation's cost too
    for mode in PROMPT_MODES:
        run_configuration("tuned", mode, messages[mode], images, image_keys, pixel_cache, contextlib.nullcontext())
    # The image ablation: the tuned model again (mode none) on blank images of the same sizes.
    # What it loses against tuned/none is what the adapter reads from the pixels.
    blank = BlankImages(images)
    run_configuration(ABLATION, "none", messages["none"], blank, blank.keys(), ImagePixelCache(),
                      contextlib.nullcontext())
    # The majority-answer baseline, scored the same way
    majority, unseen = majority_predictions(splits["train"]["question"], splits["train"]["answer"], questions)

    # Scores
    names = {key: configuration_name(*key) for key in generated}
    answers_by_name = {**{names[key]: answers for key, (answers, _) in generated.items()}, MAJORITY: majority}
    per_row = score_configurations(answers_by_name, references, bertscore)
    scores: dict = {m: {} for m in MODELS}
    by_category: dict = {m: {} for m in MODELS}
    for (model_name, mode), (_, speed) in generated.items():
        rows = per_row[names[(model_name, mode)]]
        scores.setdefault(model_name, {})[mode] = {**mean_scores(rows), **speed}
        by_category.setdefault(model_name, {})[mode] = mean_scores_by(rows, categories)
    scores[MAJORITY] = {**mean_scores(per_row[MAJORITY]), "unseen_questions": unseen}
    by_category[MAJORITY] = mean_scores_by(per_row[MAJORITY], categories)
    predictions = {
        name: [{"img_id": r["img_id"], "question": r["question"], "category": r["category"],
                "reference": r["answer"], "prediction": a, "exact_match": row["exact_match"]}
               for r, a, row in zip(meta, answers_by_name[name], rows)]
        for name, rows in per_row.items()}

    peak, measure = peak_memory(device)
    scores["generation"] = {
        "device": device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch_size, **batch_info, "max_new_tokens": cfg.max_new_tokens,
        "quantization": cfg.quantization, "dtype": str(model.dtype).removeprefix("torch."),
        "examples": total_examples, "seconds": round(total_seconds, 2),
        "examples_per_s": round(total_examples / total_seconds, 3) if total_seconds else None,
        "peak_memory_gib": round(peak, 3), "memory_measure": measure,
        "test_rows": len(test), "test_rows_total": len(splits["test"]),
        "cache_implementation": cfg.cache_implementation, "compiled_norms": compiles_norms(model, cfg),
        "merged_adapter": merges_adapter(cfg),
        # Where the generation time went, summed over the six configurations and the ablation (generate_answers).
        "timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
    }
    return EvaluationReport(scores=scores, by_category=by_category, predictions=predictions)


def write_predictions(predictions: dict[str, list[dict]], out_dir: str | Path) -> None:
    """One JSONL file per configuration under ``out_dir`` (replaced as a whole)."""
    from ..outputs import fresh_staging, replace_dir

    tmp = fresh_staging(out_dir)
    for name, rows in predictions.items():
        with (tmp / f"{name}.jsonl").open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    replace_dir(tmp, out_dir, "evaluate-predictions")
