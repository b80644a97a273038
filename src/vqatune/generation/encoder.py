"""``BatchEncoder``: the model inputs of the next generation batch, made on CPU threads while the
GPU answers this one (inputs unchanged; tests/test_speed.py compares them with the processor's).
"""
from __future__ import annotations

import threading
import time
import weakref

import torch

from ..vision.keys import image_prompt_texts
from ..vision.pixel_cache import ImagePixelCache


# Processor copies of finished encoders, per processor, for the next encoder: a deep copy of
# MedGemma's processor (its 262k-piece fast tokenizer) took ~0.5 s, and 8 of them per
# generate_answers call were ~4 s of each evaluation configuration on an H200 (benchmarks/).
_SPARE_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SPARE_LOCK = threading.Lock()


def _borrow_copy(processor):
    import copy

    with _SPARE_LOCK:
        spare = _SPARE_COPIES.get(processor)
        twin = spare.pop() if spare else None
    if twin is None:
        return copy.deepcopy(processor)
    # The one setting callers change between calls (generate_answers pads on the left).
    twin.tokenizer.padding_side = processor.tokenizer.padding_side
    return twin


def _return_copies(processor, copies) -> None:
    with _SPARE_LOCK:
        _SPARE_COPIES.setdefault(processor, []).extend(copies)


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

    With ``image_keys`` and a ``feature_cache`` (the model's ``ImageFeatureCache``) a batch
    carries no pixels for images whose features are known: ``pixel_values`` holds each row's
    ``image_key`` (int64 [n, 2], what the cache answers keyed batches with), and
    ``new_image_keys`` / ``new_pixel_values`` the images met for the first time (once each),
    whose features the caller stores before the forward (``generate_answers``). An image is new
    once per encoder: a later batch counts on the caller having stored it. No pixel is kept in
    ``pixel_cache`` (the features are); only its counters move.

    Threads each borrow their own copy of the processor (a fast tokenizer is not safe to share
    across threads: padding settings are set on it per call). Pillow's decoders, the image
    processor's numpy work and the tokenizers release the GIL. ``close`` keeps the copies for
    the next encoder of the same processor (only its tokenizer's padding side is taken from the
    processor again: do not change other settings of a processor between calls).
    """

    def __init__(self, processor, texts, images, threads: int | None = None, *,
                 image_keys=None, pixel_cache: ImagePixelCache | None = None,
                 pixel_dtype: torch.dtype | None = None, pin_memory: bool = False, feature_cache=None):
        import os
        import queue
        from concurrent.futures import ThreadPoolExecutor

        if image_keys is not None and len(image_keys) != len(texts):
            raise ValueError(f"{len(image_keys)} image keys for {len(texts)} prompts")
        self.texts, self.images = texts, images
        self.image_keys = image_keys
        self.pixel_cache = pixel_cache if pixel_cache is not None or image_keys is None else ImagePixelCache()
        self.pixel_dtype = pixel_dtype
        self.feature_cache = feature_cache if image_keys is not None else None
        self._announced: set = set()  # image_keys of images whose pixels went out with a batch
        # Batches for a CUDA device: the pixels are assembled straight into page-locked memory,
        # so the ~1 GB host-to-device copy of a 192-row batch runs at full speed, asynchronously.
        self.pin_memory = pin_memory
        # At most 8 threads and one per core; a one-row call (vqatune ask) copies the processor once.
        self.threads = max(1, min(threads or 8, 8, os.cpu_count() or 1))
        # Copies taken now carry the caller's padding side (left for generation).
        self.processors: queue.Queue = queue.Queue()
        self._processor = processor
        for _ in range(self.threads):
            self.processors.put(_borrow_copy(processor))
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

    def _pin(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        if not self.pin_memory:
            return torch.cat(pixels)
        shape = (sum(p.shape[0] for p in pixels), *pixels[0].shape[1:])
        return torch.cat(pixels, out=torch.empty(shape, dtype=pixels[0].dtype, pin_memory=True))

    def _submit_with_features(self, rows):
        from ..vision.keys import image_key

        cache, known = self.pixel_cache, self.feature_cache
        keys = [image_key(self.image_keys[i]) for i in rows]
        new: dict = {}  # image_key -> its first row
        for i, key in zip(rows, keys):
            if key in known or key in self._announced or key in new:
                cache.reused += 1
            else:
                new[key] = i
        self._announced.update(new)
        cache.computed += len(new)
        firsts = list(new.values())
        size = -(-len(firsts) // self.threads) if firsts else 1
        pixel_jobs = [self.pool.submit(self._run, self._pixels, firsts[s:s + size])
                      for s in range(0, len(firsts), size)]
        size = -(-len(rows) // self.threads)
        texts = [self.pool.submit(self._run, self._text, rows[i:i + size]) for i in range(0, len(rows), size)]

        def assemble():
            inputs = self._merge([t.result() for t in texts])
            inputs["pixel_values"] = torch.tensor(keys, dtype=torch.int64).reshape(-1, 2)
            if new:
                start = time.perf_counter()
                inputs["new_image_keys"] = torch.tensor(list(new), dtype=torch.int64).reshape(-1, 2)
                inputs["new_pixel_values"] = self._pin([p for job in pixel_jobs for p in job.result()])
                with self._lock:
                    self.encode_seconds += time.perf_counter() - start
            return inputs

        return self.pool.submit(assemble)

    def _submit_with_keys(self, rows):
        if self.feature_cache is not None:
            return self._submit_with_features(rows)
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
            inputs["pixel_values"] = self._pin(pixels)
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
        copies = []
        while not self.processors.empty():
            copies.append(self.processors.get_nowait())
        _return_copies(self._processor, copies)


class _Pending:
    def __init__(self, result):
        self._result = result

    def result(self):
        return self._result()
