"""GPU levers for training and generating with Gemma 3 / MedGemma, each measured in benchmarks/.

Every lever here computes the same function as the plain Hugging Face path; where a lever could
change what is trained it refuses to run (e.g. the image-feature cache with a trainable vision
tower). The numbers behind each choice are in benchmarks/results/ and the README's
"GPU throughput" section.

- ``freeze_for_kbit_training``: what ``peft.prepare_model_for_kbit_training`` does, without
  its upcast of every non-quantized weight to fp32 (embeddings, norms, an unquantized vision
  tower): the upcast alone takes the guide's recipe to ~40 GiB for one example on an H100.
  Gemma's RMSNorm already computes in fp32 internally, so nothing is gained by it.
- Logits on answer positions only: not here. TRL's SFTTrainer (>= 1.x) already scores only
  positions with a label, in tiles (``add_fused_lm_head``), so the project's training path has it;
  benchmarks/proto_levers.py measured its effect (Gemma 3's 262,208-row head, ~3 answer tokens
  per ~290-token example).
- ``ImageFeatureCache``: a frozen vision tower gives the same 256 image embeddings for every QA
  of an image, every epoch and every search trial (~5.5 TFLOP per 896 px image); they are
  computed once per distinct image and reused.
- ``dequantize_for_generation``: nf4 weights dequantized once to bf16. For more than one row
  bitsandbytes dequantizes to bf16 and calls the same matmul at every step, so the function
  is unchanged while each decode step stops paying the dequantization.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training set-up

def freeze_for_kbit_training(model, *, upcast_to_fp32: bool = False,
                             gradient_checkpointing: bool = True):
    """Freeze the base weights and turn on gradient checkpointing for (Q)LoRA training.

    ``upcast_to_fp32=True`` is the guide's ``prepare_model_for_kbit_training`` (kept for the
    benchmark's baseline and for users who want it); the default keeps bf16 weights bf16.
    """
    if upcast_to_fp32:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires-grad hook on the input embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --------------------------------------------------------------------------- image features

def _multimodal_core(model):
    """The module that owns ``get_image_features`` and the vision tower (Gemma3Model)."""
    for module in model.modules():
        if hasattr(module, "vision_tower") and hasattr(module, "multi_modal_projector") \
                and hasattr(module, "get_image_features"):
            return module
    raise ValueError("model has no vision tower + multi_modal_projector (not a Gemma 3 vision model?)")


class ImageFeatureCache:
    """Projected image features (what the language model sees) keyed by the exact pixel values.

    Installed on a model, it answers ``get_image_features`` for every image it has seen, and
    runs the vision tower only on new ones. Keys are two 64-bit universal hashes of the raw
    bits of each image's ``pixel_values`` (random multipliers, wrap-around sums, computed on the
    GPU): equal pixels give equal keys, and two different images collide with probability about
    2^-128. Only valid while the vision tower and projector are frozen; ``install`` checks that.
    """

    def __init__(self, device: str | torch.device | None = "cpu", seed: int = 0):
        # Host memory by default: ~1.3 MB per image on MedGemma (Kvasir's 6,500 images: 8.5 GB),
        # nothing on the GPU, and a copy of ~20 MB per batch of 16 costs ~2 ms (measured no slower
        # than keeping them on the GPU). None keeps them where they were computed.
        self.device = device
        self.seed = seed
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._multipliers: torch.Tensor | None = None
        self._core = None
        self._original = None

    # Keys -----------------------------------------------------------------
    def keys(self, pixel_values: torch.Tensor) -> list[tuple[int, int]]:
        flat = pixel_values.detach().reshape(pixel_values.shape[0], -1).contiguous()
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        words = flat.view(bits).to(torch.int64)
        n = words.shape[1]
        if self._multipliers is None or self._multipliers.shape[1] != n \
                or self._multipliers.device != words.device:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            mult = torch.randint(-2**62, 2**62, (2, n), generator=gen, dtype=torch.int64)
            self._multipliers = (mult | 1).to(words.device)  # odd multipliers
        # One image at a time keeps the int64 temporary at 2 x pixels (~38 MB at 896 px).
        hashes = torch.stack([(row.unsqueeze(0) * self._multipliers).sum(-1) for row in words])
        return [tuple(int(v) for v in row) for row in hashes.tolist()]

    # Features -------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor, compute) -> torch.Tensor:
        """[n_images, tokens, hidden] features for ``pixel_values``, computing only unseen images."""
        keys = self.keys(pixel_values)
        todo: dict[tuple[int, int], int] = {}
        for i, key in enumerate(keys):
            if key not in self.store and key not in todo:
                todo[key] = i
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            with torch.no_grad():
                fresh = compute(pixel_values[list(todo.values())])
            for key, feats in zip(todo, fresh):
                self.store[key] = feats.detach().to(self.device or feats.device).clone()
        out = torch.stack([self.store[k] for k in keys])
        return out.to(pixel_values.device, non_blocking=True)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    # Installation ---------------------------------------------------------
    def install(self, model, *, training: bool = True) -> "ImageFeatureCache":
        """Answer ``get_image_features`` of ``model`` from the cache.

        Refused (ValueError) when an adapter reaches the vision tower or projector (its features
        would differ between base and tuned), and, for ``training``, when any of their weights
        trains (the features would change from step to step).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        reason = vision_cache_blocker(model, training=training)
        if reason:
            raise ValueError(f"image-feature cache refused: {reason}")
        core = _multimodal_core(model)
        original = core.get_image_features

        def compute(pixel_values):
            return original(pixel_values, return_dict=True).pooler_output

        def cached_get_image_features(pixel_values, **kwargs):
            return BaseModelOutputWithPooling(pooler_output=self.features(pixel_values, compute))

        core.get_image_features = cached_get_image_features  # instance attribute shadows the method
        self._core, self._original = core, original
        return self

    def uninstall(self) -> None:
        if self._core is not None:
            del self._core.get_image_features
            self._core = self._original = None


def vision_cache_blocker(model, *, training: bool) -> str | None:
    """Why image features of ``model`` cannot be cached, or None when they can."""
    core = _multimodal_core(model)
    towers = {"vision_tower": core.vision_tower, "multi_modal_projector": core.multi_modal_projector}
    for tower_name, tower in towers.items():
        adapted = [n for n, m in tower.named_modules()
                   if hasattr(m, "lora_A") or type(m).__name__ == "ModulesToSaveWrapper"]
        if adapted:
            return f"an adapter reaches the {tower_name} ({adapted[0] or tower_name})"
        if training:
            trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
            if trainable:
                return f"the {tower_name} trains ({trainable[0]})"
    return None


def install_image_feature_cache(model, device: str | torch.device | None = "cpu", *,
                                training: bool = True) -> ImageFeatureCache:
    """Cache image features on ``model``; returns the cache (ValueError when it cannot apply)."""
    return ImageFeatureCache(device=device).install(model, training=training)


def maybe_install_image_feature_cache(model, *, training: bool, enabled: bool = True,
                                      device: str | torch.device | None = "cpu") -> ImageFeatureCache | None:
    """The cache when ``enabled`` and valid for ``model``, else None with the reason logged."""
    if not enabled:
        return None
    reason = vision_cache_blocker(model, training=training)
    if reason:
        log.info("image features computed every time: %s", reason)
        return None
    return install_image_feature_cache(model, device, training=training)


# --------------------------------------------------------------------------- generation

def dequantize_for_generation(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every bitsandbytes 4-bit linear layer by a plain linear layer of its weights.

    LoRA layers keep working (PEFT calls ``base_layer(x)`` and adds the adapter), and
    ``disable_adapter()`` still gives the base model: no second copy of the weights. Returns
    the number of layers replaced. A no-op on a model without 4-bit layers.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            linear.weight.data = weight.reshape(child.out_features, child.in_features)
            linear.weight.requires_grad_(False)
            if child.bias is not None:
                linear.bias.data = child.bias.data.to(dtype)
                linear.bias.requires_grad_(False)
            setattr(parent, name, linear)
            replaced += 1
    if replaced and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced


# --------------------------------------------------------------------------- generation inputs

class BatchEncoder:
    """Processor calls for generation batches on CPU threads, a batch ahead of the GPU.

    At 896 px a row costs ~20 ms of CPU (PNG decode, resize/normalise, tokenize): 192 rows are
    ~4 s, more than the H100 needs to answer them (benchmarks/: generation was CPU-bound at
    25 examples/s). Each batch is split into one chunk per thread, each thread has its own copy
    of the processor (a fast tokenizer is not safe to share across threads), and the chunks are
    padded on the left to the batch's longest row, which is exactly what one processor call on
    the whole batch returns. Pillow's decoders, torchvision and the tokenizers release the GIL.
    """

    def __init__(self, processor, texts, images, threads: int | None = None):
        import copy
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.texts, self.images = texts, images
        # At most 8 threads and one per core; a one-row call (vqatune ask) copies the processor once.
        self.threads = max(1, min(threads or 8, 8, os.cpu_count() or 1))
        # Copies taken now carry the caller's padding side (left for generation).
        self.processors = [copy.deepcopy(processor) for _ in range(self.threads)]
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.padding_side = processor.tokenizer.padding_side
        self.pool = ThreadPoolExecutor(max_workers=self.threads)

    def _encode(self, processor, rows):
        # The chat template already starts with <bos>; the tokenizer must not add another.
        return processor(text=[self.texts[i] for i in rows], images=[[self.images[i]] for i in rows],
                         return_tensors="pt", padding=True, add_special_tokens=False)

    def submit(self, rows):
        """Start encoding ``rows``; call ``.result()`` on the return value for the batch."""
        size = -(-len(rows) // self.threads)
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        futures = [self.pool.submit(self._encode, proc, chunk) for proc, chunk in zip(self.processors, chunks)]
        encoder = self

        class _Pending:
            def result(self):
                return encoder._merge([f.result() for f in futures])

        return _Pending()

    def _merge(self, parts):
        if len(parts) == 1:
            return dict(parts[0])
        width = max(p["input_ids"].shape[1] for p in parts)
        merged = {}
        for key in parts[0]:
            tensors = [p[key] for p in parts]
            if all(t.dim() == 2 and t.shape[1] == p["input_ids"].shape[1] for t, p in zip(tensors, parts)):
                fill = self.pad_token_id if key == "input_ids" else 0
                pad = (lambda n: (n, 0)) if self.padding_side == "left" else (lambda n: (0, n))
                tensors = [torch.nn.functional.pad(t, pad(width - t.shape[1]), value=fill) for t in tensors]
            merged[key] = torch.cat(tensors)
        return merged

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
