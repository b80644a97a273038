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
  computed once per distinct image and reused. Prefilled under ``image_key``s, training batches
  carry only those keys, so no step decodes or processes an image (~1.6 s of CPU per batch of
  32 at 896 px, benchmarks/collate_bench.py).
- ``ImagePixelCache`` + ``BatchEncoder(image_keys=...)``: each image's ``pixel_values`` made once
  by the processor (~20 ms of CPU at 896 px) for all its QA and all six evaluation
  configurations; a batch then costs only its prompts' tokenization.
- ``adapters_in_compute_dtype``: LoRA weights in the base's compute dtype for generation (peft
  loads them in float32, which doubled the tuned model's generation time).
- ``dequantize_for_generation``: nf4 weights dequantized once to bf16. For more than one row
  bitsandbytes dequantizes to bf16 and calls the same matmul at every step, so the function
  is unchanged while each decode step stops paying the dequantization.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time

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


def compile_layers(model, *, dynamic: bool = True, towers: tuple[str, ...] = ("DecoderLayer", "EncoderLayer")) -> int:
    """``torch.compile`` each transformer layer in place (regional compilation); ``towers``: class
    name endings of the layers to compile (Gemma3DecoderLayer: language model; SiglipEncoderLayer:
    vision tower).

    A training step of MedGemma-4B at batch 16 is CPU-bound on an H100: ~10,000 small kernels
    launched one by one from Python (eager RMSNorm, rotary, GeLU, LoRA, bitsandbytes' 4-bit
    matmuls), more CPU time than the GPU needs for the work (benchmarks/profile_train.py). A
    compiled layer fuses the elementwise work and runs from generated code. All layers of a
    tower share one code object, so one compilation serves them all (torch >= 2.5 inlines the
    modules); ``dynamic`` avoids a recompilation per padded sequence length. The function is
    unchanged (tests/test_speed.py compares losses). Returns the number of layers compiled.
    """
    return _compile_modules(model, towers, dynamic)


def compile_wanted(setting: bool | None, device: str) -> bool:
    """``train.compile`` / ``evaluate.compile``: true, false, or None = on with a CUDA device."""
    return setting if setting is not None else str(device).startswith("cuda")


def _compile_modules(model, class_suffixes: tuple[str, ...], dynamic: bool) -> int:
    import torch._dynamo

    # A speed lever must not stop a training or an evaluation: where compiling fails (e.g. no C
    # compiler for triton's launcher), torch runs the module eagerly and logs why.
    torch._dynamo.config.suppress_errors = True
    # Under DDP, Dynamo's DDPOptimizer cuts every graph it compiles at DDP's bucket sizes (the
    # first bucket: 1 MiB) so that an all-reduce can start inside that graph's backward. With
    # the graphs already one layer each, that only cut each MedGemma layer in two, inside its
    # MLP (between gate_proj's lora_A and lora_B: 1.1 MiB of bf16 LoRA weights behind it), on
    # every process and not on one GPU; DDP's own hooks still all-reduce each layer's gradients
    # as its backward ends. tests/test_distributed.py checks the layers are compiled whole.
    torch._dynamo.config.optimize_ddp = False
    compiled = 0
    for module in model.modules():
        if type(module).__name__.endswith(class_suffixes) and hasattr(module, "compile"):
            module.compile(dynamic=dynamic)
            # nn.Module.compile stores the compiled call there (torch >= 2.2); the wrapper runs
            # before it, outside the graph. Without that attribute the layer stays as compiled.
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = _mask_without_base(module._compiled_call_impl)
            compiled += 1
    return compiled


def _mask_without_base(compiled):
    """Call ``compiled`` with an ``attention_mask`` that is not a view.

    Gemma 3's decoder layers get their mask as a view of a larger tensor (an unsqueezed [b, q, k]
    for one layer type, a sliced [b, 1, q, k] for the other), and Dynamo guards on the view's
    base: its layout differs between the two, so the shared graph compiled twice more, the last
    time steps into training (a stall on two H100s, each DDP process at its own step:
    benchmarks/results/ddp_bench_h100x2_defaults.md). A copy of the mask (b x q x k booleans,
    ~3 MB at 32 x 300 tokens) has no base to guard on. Outside the compiled region on purpose.
    """
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask._base is not None:
            kwargs["attention_mask"] = mask.clone()
        return compiled(*args, **kwargs)

    return call


def freeze_gc_after_warmup():
    """Trainer callback: after the first optimizer step, ``gc.freeze()`` what is alive then.

    Loading the model and compiling its layers leave millions of long-lived Python objects
    (graphs, guards, sympy expressions). Python's full collection walks all of them once the
    young generations have promoted enough new ones, a pause of seconds in the middle of the
    steps (~2 M small objects: 3.3 s on the dev box). Frozen objects are skipped by every later
    collection; cyclic garbage frozen with them lives until training ends (``on_train_end``
    unfreezes). Nothing in the standard library or transformers does this for a Trainer.
    """
    import gc

    from transformers import TrainerCallback

    class _FreezeGc(TrainerCallback):
        def __init__(self):
            self.frozen = False

        def on_step_end(self, args, state, control, **kwargs):
            if not self.frozen:
                gc.freeze()
                self.frozen = True

        def on_train_end(self, args, state, control, **kwargs):
            if self.frozen:
                gc.unfreeze()
                self.frozen = False

    return _FreezeGc()


def compile_norms(model, *, dynamic: bool = True) -> int:
    """``torch.compile`` every RMSNorm of ``model`` in place, for generation.

    Decoding MedGemma-4B is CPU-bound on an H100: in a profiled batch of 192 (prefill + 7 steps)
    the GPU was busy 2.3 s of 7.2 s, a decoding step taking ~190 ms (benchmarks/
    profile_generate.py). Gemma's RMSNorm is ten small operations (fp32 cast, pow, mean, add,
    rsqrt, mul, weight cast, add, mul, cast) and runs 6 times per layer: about half of a step's
    operations. Compiled, each is one fused kernel (1.29x for the six configurations). Whole
    layers cannot be compiled for generation: the KV cache's per-layer state makes every layer a
    new graph (past the recompile limit). Returns the number compiled.
    """
    import torch._dynamo

    # Variants: hidden size and head size (q/k norms), prefill and one-token decoding.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    return _compile_modules(model, ("RMSNorm",), dynamic)


# --------------------------------------------------------------------------- image keys

def image_key(img_id) -> tuple[int, int]:
    """128-bit key of an image named by the dataset's ``img_id`` (one image per id), as two int64.

    A hash of the name, not of the pixels: a batch can then name its images without decoding
    them, and the key is the same in every DataLoader worker and every process (Python's
    ``hash`` of a string is salted per process).
    """
    digest = hashlib.blake2b(str(img_id).encode("utf-8"), digest_size=16).digest()
    return (int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True))


def image_key_tensor(img_ids) -> torch.Tensor:
    """[n, 2] int64 keys of ``img_ids``: what a keyed batch carries in place of ``pixel_values``."""
    return torch.tensor([image_key(i) for i in img_ids], dtype=torch.int64).reshape(-1, 2)


def image_prompt_texts(processor, texts: list[str], *, remedy: str) -> list[str]:
    """``texts`` with their one image placeholder expanded exactly as Gemma3Processor expands it.

    Gemma3Processor replaces the ``<start_of_image>`` of a prompt by ``full_image_sequence``
    (which starts with "\n\n<start_of_image>", then the image tokens) and tokenizes; called on
    the expanded text alone it finds no image to expand, tokenizes the same string the same way
    and still adds ``token_type_ids``. So a prompt's tokens need no image at all. ``remedy``:
    what the caller should do instead when this cannot apply (ends the error message).
    """
    placeholder = getattr(processor, "boi_token", None)
    sequence = getattr(processor, "full_image_sequence", None)
    if placeholder is None or sequence is None:
        raise ValueError(f"image keys need a Gemma 3 processor (boi_token, full_image_sequence); "
                         f"got {type(processor).__name__}: {remedy}")
    expanded = []
    for i, text in enumerate(texts):
        if text.count(placeholder) != 1:
            raise ValueError(f"prompt {i} holds {text.count(placeholder)} image placeholders ({placeholder}); "
                             f"image keys need exactly one per prompt: {remedy}")
        expanded.append(text.replace(placeholder, sequence))
    return expanded


# --------------------------------------------------------------------------- image features

def is_image_keys(tensor: torch.Tensor) -> bool:
    """Whether a ``pixel_values`` tensor holds ``image_key`` rows instead of pixels."""
    return tensor.dtype == torch.int64 and tensor.dim() == 2 and tensor.shape[1] == 2


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

    ``prefill`` can instead store features under the caller's ``image_key``s; a batch whose
    ``pixel_values`` are such keys (int64 [n, 2]) is then answered without any pixels.
    """

    def __init__(self, device: str | torch.device | None = "cpu", seed: int = 0):
        # Host memory by default: ~1.3 MB per image on MedGemma in bf16, 2.6 MB in fp32 (Kvasir's
        # 6,500 images: 8.5 / 17 GB), nothing on the GPU; a copy of ~20 MB per batch of 16 costs
        # ~2 ms. None keeps them where they were computed. Training moves its precomputed
        # features to the GPU when they fit (move_to): there a keyed batch needs no host work.
        self.device = device
        self.seed = seed
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._multipliers: torch.Tensor | None = None
        self._core = None
        self._uncached = None
        # After move_to: every stored feature in one [n, tokens, hidden] table, rows sorted by key.
        self._table: torch.Tensor | None = None
        self._key_words: torch.Tensor | None = None  # [n, 2] int64, the sorted keys
        self._first_words: torch.Tensor | None = None  # their first words, contiguous (searched)

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
        """[n_images, tokens, hidden] features for ``pixel_values``, computing only unseen images.

        An int64 [n, 2] tensor is not pixels but ``image_key``s (a keyed training batch): those
        are looked up only, having no pixels to compute from.
        """
        if is_image_keys(pixel_values):
            if self._table is not None and pixel_values.device == self._table.device:
                return self._lookup(pixel_values)
            # On a GPU, .tolist() waits for the queued work: 16 bytes a row, no hash to compute.
            keys = [tuple(row) for row in pixel_values.tolist()]
            missing = self._unseen(keys)
            if missing:
                raise ValueError(f"image key {next(iter(missing))} was not precomputed ({len(missing)} images of "
                                 "the batch): keyed batches carry no pixels; prefill the cache with every image first")
            self.hits += len(keys)
        else:
            keys = self.keys(pixel_values)
            new = self._compute(keys, pixel_values, compute)
            self.misses += new
            self.hits += len(keys) - new
        out = torch.stack([self.store[k] for k in keys])
        return out.to(pixel_values.device, non_blocking=True)

    def _lookup(self, image_keys: torch.Tensor) -> torch.Tensor:
        """Rows of the table for keyed batch ``image_keys``, found where they are (no host copy)."""
        first = self._first_words
        idx = torch.searchsorted(first, image_keys[:, 0].contiguous()).clamp_(max=first.shape[0] - 1)
        found = (self._key_words.index_select(0, idx) == image_keys).all()
        # Checked on the device, without waiting for it; a missing key stops the run at the next
        # synchronisation (on a GPU as a device-side assert).
        torch._assert_async(found, "image key not precomputed: keyed batches carry no pixels; prefill the "
                                   "cache with every image first")
        self.hits += image_keys.shape[0]
        return self._table.index_select(0, idx)

    def move_to(self, device: str | torch.device, max_bytes: int) -> bool:
        """Keep every stored feature in one table on ``device`` when it takes at most ``max_bytes``;
        returns whether it moved.

        Keyed batches are then answered on the device: a binary search of their keys and one
        gather, where the host path reads the keys back (a GPU sync per micro-batch), stacks 32
        x 1.3 MB on the host and copies it from pageable memory (the copy blocks the CPU), in a
        training step that is CPU-bound on an H100 (benchmarks/results/ddp_bench_h100x2_profile_lean.md).
        Refused (False) when two keys share their first word (searched on), about 2^-64 per pair.
        """
        if not self.store or self.memory_bytes() > max_bytes:
            return False
        keys = sorted(self.store)  # Python's order of signed ints, as torch.searchsorted's
        if len({k[0] for k in keys}) != len(keys):
            return False
        sample = self.store[keys[0]]
        table = torch.empty((len(keys), *sample.shape), dtype=sample.dtype, device=device)
        for i, key in enumerate(keys):  # row by row: no stacked temporary beside the table
            table[i].copy_(self.store[key])
        self._key_words = torch.tensor(keys, dtype=torch.int64, device=table.device)
        self._first_words = self._key_words[:, 0].contiguous()
        # The dict keeps views of the table: one copy of the features, in the table.
        self.store = {k: table[i] for i, k in enumerate(keys)}
        self._table, self.device = table, table.device
        return True

    def _unseen(self, keys) -> dict[tuple[int, int], int]:
        """Keys not in the store -> the first position of each in ``keys``."""
        todo: dict[tuple[int, int], int] = {}
        for i, key in enumerate(keys):
            if key not in self.store and key not in todo:
                todo[key] = i
        return todo

    def _compute(self, keys, pixel_values: torch.Tensor, compute) -> int:
        """Store the features of the images whose keys are unseen; returns how many."""
        todo = self._unseen(keys)
        if todo:
            # New images after move_to: the table no longer holds them all; back to the dict.
            self._table = self._key_words = self._first_words = None
            with torch.no_grad():
                fresh = compute(pixel_values[list(todo.values())])
            for key, feats in zip(todo, fresh):
                self.store[key] = feats.detach().to(self.device or feats.device).clone()
        return len(todo)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def prefill(self, batches, device, *, progress: bool = False) -> int:
        """Compute the features of every image in ``batches`` now; returns how many were new.

        A batch is either a ``pixel_values`` tensor (stored under the hash of its pixels, as a
        training collator without image keys makes them) or a ``(image_keys, pixel_values)`` pair
        (stored under ``image_key``s, for a training collator with ``image_keys``).
        Training then never runs the vision tower: no step waits for the ~5.5 TFLOP of a new
        896 px image, every step has the same shapes (a compiled step does not recompile for the
        batch's number of new images), and the step's CPU work shrinks. Call it under the
        trainer's autocast so the features are computed as they would be inside a step.
        """
        from tqdm.auto import tqdm

        if self._core is None:
            raise RuntimeError("install the cache on a model before prefilling it")
        before = len(self.store)
        for batch in tqdm(batches, desc="image features", unit="batch", disable=not progress):
            if isinstance(batch, torch.Tensor):
                self._core.get_image_features(batch.to(device))
                continue
            image_keys, pixels = batch
            if not is_image_keys(image_keys) or image_keys.shape[0] != pixels.shape[0]:
                raise ValueError(f"prefill batch: keys {tuple(image_keys.shape)} {image_keys.dtype} for "
                                 f"{pixels.shape[0]} images; pass int64 [n, 2] image_key rows, one per image")
            self.misses += self._compute([tuple(row) for row in image_keys.tolist()], pixels.to(device),
                                         self._uncached)
        return len(self.store) - before

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
        self._core, self._uncached = core, compute
        return self

    def uninstall(self) -> None:
        if self._core is not None:
            del self._core.get_image_features
            self._core = self._uncached = None


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


def adapters_in_compute_dtype(model) -> int:
    """Cast the LoRA weights of a loaded ``PeftModel`` to the dtype the base model computes in.

    peft loads adapters in float32 (``autocast_adapter_dtype``), so on a bf16 (or nf4 with bf16
    compute) base every LoRA layer casts its input to float32, runs two float32 matmuls and
    casts back. For generation that doubled the time of the tuned configurations on an H100
    (benchmarks/profile_generate.py: 6.6 s against 3.2 s per batch of 192 with the adapter off).
    Training keeps float32 adapters (small updates); a float32 base (the tiny model on CPU) is
    left as it is. Returns the number of tensors cast.
    """
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if "lora_" in name and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


# --------------------------------------------------------------------------- generation inputs

class ImagePixelCache:
    """``pixel_values`` per image key, made once by the processor and reused by every row and every
    configuration that shows that image.

    Kvasir images carry ~9 questions each and evaluation asks them in six configurations, so an
    image comes back ~54 times; at 896 px its resize/normalise costs ~20 ms of CPU, more than the
    H100 spends answering it. Pass one cache to several ``generate_answers`` calls (with the rows'
    ``image_keys``) to pay that once per image. Entries are kept per (key, dtype) in the dtype the
    model takes them in: bf16 halves the memory (~4.8 MB per 896 px image, the Kvasir test split's
    ~1,300 images ~6 GB of host memory) and casting at store time gives the very values the cast
    before the forward would (round-to-nearest either way).

    The caller vouches that equal keys mean equal images (e.g. the dataset's ``img_id``).
    """

    def __init__(self):
        self.pixels: dict[tuple, torch.Tensor] = {}
        self.computed = 0   # images that went through the processor
        self.reused = 0     # rows that found their image already made (or being made)

    def __len__(self) -> int:
        return len(self.pixels)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pixels.values())


class BatchEncoder:
    """Model inputs for generation batches on CPU threads, a batch ahead of the GPU.

    Without ``image_keys`` every row is one processor call: at 896 px a row costs ~20 ms of CPU
    (PNG decode, resize/normalise, tokenize), 192 rows ~4 s, more than the H100 needs to answer them
    (benchmarks/: generation was CPU-bound at 25 examples/s). Each batch is split into one chunk per
    thread and the chunks are padded on the left to the batch's longest row, which is exactly what
    one processor call on the whole batch returns.

    With ``image_keys`` (one hashable per row; equal keys = the same image) each distinct image
    goes through the processor once into ``pixel_cache`` (an ``ImagePixelCache`` the caller may
    share across calls), and a batch costs only the tokenization of its prompts with the image
    placeholder expanded as Gemma3Processor expands it. The result equals the processor's on
    the whole batch, key by key (tests/test_speed.py).

    Threads each borrow their own copy of the processor (a fast tokenizer is not safe to share
    across threads: padding settings are set on it per call). Pillow's decoders, the image
    processor's numpy work and the tokenizers release the GIL.
    """

    def __init__(self, processor, texts, images, threads: int | None = None, *,
                 image_keys=None, pixel_cache: ImagePixelCache | None = None,
                 pixel_dtype: torch.dtype | None = None, pin_memory: bool = False):
        import copy
        import os
        import queue
        import threading
        from concurrent.futures import ThreadPoolExecutor

        if image_keys is not None and len(image_keys) != len(texts):
            raise ValueError(f"{len(image_keys)} image keys for {len(texts)} prompts")
        self.texts, self.images = texts, images
        self.image_keys = image_keys
        self.pixel_cache = pixel_cache if pixel_cache is not None or image_keys is None else ImagePixelCache()
        self.pixel_dtype = pixel_dtype
        # Batches for a CUDA device: the pixels are assembled straight into page-locked memory,
        # so the ~1 GB host-to-device copy of a 192-row batch runs at full speed, asynchronously.
        self.pin_memory = pin_memory
        # At most 8 threads and one per core; a one-row call (vqatune ask) copies the processor once.
        self.threads = max(1, min(threads or 8, 8, os.cpu_count() or 1))
        # Copies taken now carry the caller's padding side (left for generation).
        self.processors: queue.Queue = queue.Queue()
        for _ in range(self.threads):
            self.processors.put(copy.deepcopy(processor))
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.padding_side = processor.tokenizer.padding_side
        if image_keys is not None:
            self._check_fast_encoding(processor)
        self.pool = ThreadPoolExecutor(max_workers=self.threads)
        self._in_flight: dict = {}   # cache key -> Future of its pixel_values, made by this encoder
        self.encode_seconds = 0.0    # seconds the threads spent encoding (all threads summed)
        self._lock = threading.Lock()

    # Processor copies -------------------------------------------------------
    def _run(self, work, *args):
        # At most `threads` jobs run at once and there are as many copies: a borrow never waits.
        processor = self.processors.get()
        start = time.perf_counter()
        try:
            return work(processor, *args)
        finally:
            with self._lock:
                self.encode_seconds += time.perf_counter() - start
            self.processors.put(processor)

    # Whole-processor path ---------------------------------------------------
    def _encode(self, processor, rows):
        # The chat template already starts with <bos>; the tokenizer must not add another.
        return processor(text=[self.texts[i] for i in rows], images=[[self.images[i]] for i in rows],
                         return_tensors="pt", padding=True, add_special_tokens=False)

    def submit(self, rows):
        """Start encoding ``rows``; call ``.result()`` on the return value for the batch."""
        if self.image_keys is not None:
            return self._submit_with_keys(rows)
        size = -(-len(rows) // self.threads)
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        futures = [self.pool.submit(self._run, self._encode, chunk) for chunk in chunks]
        return _Pending(lambda: self._merge([f.result() for f in futures]))

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

    # Per-image path ---------------------------------------------------------
    _REMEDY = "generate without image_keys"

    def _check_fast_encoding(self, processor) -> None:
        image_prompt_texts(processor, self.texts, remedy=self._REMEDY)

    def _pixels(self, processor, rows):
        # The whole processor on the images alone: its image kwargs (Gemma3ProcessorKwargs' defaults
        # over the image processor's config), so the pixels are the ones a full call makes.
        out = processor(images=[[self.images[i]] for i in rows], return_tensors="pt")
        pixels = out["pixel_values"]
        if pixels.shape[0] != len(rows):
            # Pan-and-scan crops change the placeholder text per image; the processor handles them.
            raise ValueError(f"the processor made {pixels.shape[0]} crops for {len(rows)} images "
                             "(do_pan_and_scan on?); generate without image_keys")
        if self.pixel_dtype is not None:
            pixels = pixels.to(self.pixel_dtype)
        return list(pixels.unsqueeze(1))

    def _text(self, processor, rows):
        # Lists, not tensors: the processor's token-count check is slow on tensors.
        texts = image_prompt_texts(processor, [self.texts[i] for i in rows], remedy=self._REMEDY)
        out = processor(text=texts, padding=True, add_special_tokens=False)
        return {key: torch.tensor(value) for key, value in out.items()}

    def _submit_with_keys(self, rows):
        cache = self.pixel_cache
        dtype = self.pixel_dtype
        sources, new = [], {}
        for i in rows:
            key = (self.image_keys[i], dtype)
            if key in cache.pixels:
                sources.append(cache.pixels[key])
                cache.reused += 1
            elif key in self._in_flight or key in new:
                sources.append(key)
                cache.reused += 1
            else:
                new[key] = i
                sources.append(key)
        if new:
            keys, firsts = list(new), list(new.values())
            size = -(-len(keys) // self.threads)
            for start in range(0, len(keys), size):
                future = self.pool.submit(self._run, self._pixels, firsts[start:start + size])
                for n, key in enumerate(keys[start:start + size]):
                    self._in_flight[key] = (future, n)
            cache.computed += len(keys)
        parts = [s if isinstance(s, torch.Tensor) else self._in_flight[s] for s in sources]
        # The prompts' tokenization in one chunk per thread, merged with padding as one call pads:
        # with a batch of 384, one configuration is one batch, and nothing else overlaps it.
        size = -(-len(rows) // self.threads)
        texts = [self.pool.submit(self._run, self._text, rows[i:i + size]) for i in range(0, len(rows), size)]

        def assemble():
            # Runs on a pool thread queued after every pixel job it waits for: no deadlock, and
            # the ~1 GB concatenation of a 192-row 896 px batch stays off the main thread.
            pixels = [p if isinstance(p, torch.Tensor) else p[0].result()[p[1]] for p in parts]
            inputs = self._merge([t.result() for t in texts])
            start = time.perf_counter()
            if self.pin_memory:
                shape = (sum(p.shape[0] for p in pixels), *pixels[0].shape[1:])
                inputs["pixel_values"] = torch.cat(pixels, out=torch.empty(shape, dtype=pixels[0].dtype,
                                                                            pin_memory=True))
            else:
                inputs["pixel_values"] = torch.cat(pixels)
            with self._lock:
                self.encode_seconds += time.perf_counter() - start
            return inputs

        batch = self.pool.submit(assemble)

        def result():
            inputs = batch.result()
            # The main thread alone moves finished pixels into the shared cache.
            for key in [k for k in sources if not isinstance(k, torch.Tensor)]:
                if key in self._in_flight:
                    future, n = self._in_flight.pop(key)
                    cache.pixels[key] = future.result()[n]
            return inputs

        return _Pending(result)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Pending:
    def __init__(self, result):
        self._result = result

    def result(self):
        return self._result()
