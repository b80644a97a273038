"""``ImageFeatureCache``: a frozen vision tower gives the same 256 image embeddings for every QA
of an image, every epoch and every search trial (~5.5 TFLOP per 896 px image); they are computed
once per distinct image and reused. Prefilled under ``image_key``s (vqatune.vision.keys),
training batches carry only those keys, so no step decodes or processes an image (~1.6 s of CPU
per batch of 32 at 896 px, benchmarks/collate_bench.py). The cache refuses to run where it could
change what is trained: with an adapter on, or a trainable, vision tower or projector.

Where only the projector trains (the embedded tiny model's, which starts random), training can
cache one step earlier: the frozen tower's output, with the projector run on it at every step
(``level="tower"``). On CPU the tower was about a quarter of the tiny model's training step.
"""
from __future__ import annotations

import logging

import torch

from .keys import is_image_keys

log = logging.getLogger(__name__)


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

    def __init__(self, device: str | torch.device | None = "cpu", seed: int = 0, level: str = "projected"):
        # Host memory by default: ~1.3 MB per image on MedGemma in bf16, 2.6 MB in fp32 (Kvasir's
        # 6,500 images: 8.5 / 17 GB), nothing on the GPU; a copy of ~20 MB per batch of 16 costs
        # ~2 ms. None keeps them where they were computed. Training moves its precomputed
        # features to the GPU when they fit (move_to): there a keyed batch needs no host work.
        if level not in ("projected", "tower"):
            raise ValueError(f"level must be 'projected' or 'tower', not {level!r}")
        self.device = device
        self.seed = seed
        # What is stored: "projected", what the language model sees (get_image_features' output), or
        # "tower", the vision tower's last hidden state, the projector then run on it at every call
        # (training a projector over a frozen tower).
        self.level = level
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

        reason = vision_cache_blocker(model, training=training, level=self.level)
        if reason:
            raise ValueError(f"image-feature cache refused: {reason}")
        core = _multimodal_core(model)
        original = core.get_image_features

        if self.level == "projected":
            def compute(pixel_values):
                return original(pixel_values, return_dict=True).pooler_output

            def cached_get_image_features(pixel_values, **kwargs):
                return BaseModelOutputWithPooling(pooler_output=self.features(pixel_values, compute))
        else:
            # What Gemma3Model.get_image_features does after its tower call (the projector on the
            # tower's last hidden state), with the tower's output from the cache.
            def compute(pixel_values):
                return core.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state

            def cached_get_image_features(pixel_values, **kwargs):
                hidden = self.features(pixel_values, compute)
                return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                                  pooler_output=core.multi_modal_projector(hidden))

        core.get_image_features = cached_get_image_features  # instance attribute shadows the method
        core._vqatune_feature_cache = self  # installed_feature_cache finds it here
        self._core, self._uncached = core, compute
        return self

    def uninstall(self) -> None:
        if self._core is not None:
            del self._core.get_image_features
            del self._core._vqatune_feature_cache
            self._core = self._uncached = None

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.store


def vision_cache_blocker(model, *, training: bool, level: str = "projected") -> str | None:
    """Why image features of ``model`` cannot be cached at ``level``, or None when they can
    (the "tower" level needs only the vision tower frozen and without adapters)."""
    core = _multimodal_core(model)
    towers = {"vision_tower": core.vision_tower}
    if level == "projected":
        towers["multi_modal_projector"] = core.multi_modal_projector
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


def installed_feature_cache(model) -> ImageFeatureCache | None:
    """The ``ImageFeatureCache`` installed on ``model``, or None (none installed, or no vision tower)."""
    try:
        core = _multimodal_core(model)
    except ValueError:
        return None
    return getattr(core, "_vqatune_feature_cache", None)


def install_image_feature_cache(model, device: str | torch.device | None = "cpu", *,
                                training: bool = True, level: str = "projected") -> ImageFeatureCache:
    """Cache image features on ``model``; returns the cache (ValueError when it cannot apply)."""
    return ImageFeatureCache(device=device, level=level).install(model, training=training)


# Share of the host's memory that the vision tower's outputs may take when they are cached (a
# projector that trains over a frozen tower): MedGemma's are 4,096 x 1,152 per 896 px image,
# ~19 MB in fp32, seven times its projected features.
TOWER_CACHE_HOST_SHARE = 0.25


def tower_outputs_fit(model, images: int) -> tuple[bool, str]:
    """Whether the vision tower's outputs for ``images`` images (fp32, the larger case) fit in
    TOWER_CACHE_HOST_SHARE of the host's memory; and the sizes, for the log."""
    import os

    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    need = images * tokens * vision.hidden_size * 4
    budget = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * TOWER_CACHE_HOST_SHARE)
    return need <= budget, f"{images} images x {tokens} x {vision.hidden_size}: {need / 2**30:.2f} GiB of {budget / 2**30:.1f}"


def maybe_install_image_feature_cache(model, *, training: bool, enabled: bool = True,
                                      device: str | torch.device | None = "cpu",
                                      tower_images: int = 0) -> ImageFeatureCache | None:
    """The cache when ``enabled`` and valid for ``model``, else None with the reason logged.

    ``tower_images``: the distinct images whose features training precomputes (0: none). Where
    the projected features cannot be cached but the vision tower's output can (a projector that
    trains over a frozen tower), and those images' tower outputs fit in memory, cache those."""
    if not enabled:
        return None
    reason = vision_cache_blocker(model, training=training)
    if reason and tower_images and not vision_cache_blocker(model, training=training, level="tower"):
        fits, sizes = tower_outputs_fit(model, tower_images)
        if fits:
            log.info("vision tower outputs cached, the projector run at every step: %s", reason)
            return install_image_feature_cache(model, device, training=training, level="tower")
        reason += f"; its tower's outputs exceed the host share ({sizes})"
    if reason:
        log.info("image features computed every time: %s", reason)
        return None
    return install_image_feature_cache(model, device, training=training)
