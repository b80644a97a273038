"""Batched greedy answers from a Gemma 3 / MedGemma model: the one generator evaluation, the
``vqatune ask`` command and the GPU benchmark all call, so their answers are the same answers.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Hashable, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _left_padding(tokenizer):
    # Left padding: generate appends on the right, so every row's last prompt token must sit in
    # the last column, and the prompt ends at the same position for the whole batch.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _input_device(model):
    # A PeftModel or a model placed with device_map: the embedding layer's device is where
    # inputs go.
    return model.get_input_embeddings().weight.device


def _floating_dtype(model):
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def stop_token_ids(model, tokenizer) -> set[int]:
    """Ids that end the model's turn: the generation config's eos ids, ``<eos>``, ``<end_of_turn>``."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return {i for i in ids if i is not None}


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    for pos, token in enumerate(ids):
        if token in stop:
            return ids[:pos]
    return ids


def prompt_texts(processor, messages_list: Sequence[list[dict]]) -> list[str]:
    """Chat-templated prompts ending with the model's turn, as the model is asked."""
    return [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in messages_list]


GENERATION_CACHES = ("dynamic", "static", "static_graphs")


def length_batches(order: list[int], lengths: list[int], batch_size: int,
                   bucket_tokens: int | None = None) -> list[list[int]]:
    """Rows in ``order`` (ascending length) cut into batches of at most ``batch_size``; with
    ``bucket_tokens``, also where a row is more than that many tokens longer than its batch's first."""
    batches: list[list[int]] = []
    for i in order:
        if (not batches or len(batches[-1]) >= batch_size
                or (bucket_tokens is not None and lengths[i] - lengths[batches[-1][0]] > bucket_tokens)):
            batches.append([])
        batches[-1].append(i)
    return batches


def _static_graphs(model, inputs, max_new_tokens, stop, pad_token_id, timing, share_prefix=False):
    """New tokens from ``graphs.greedy_static``, or None where it cannot run (the reason is kept
    in ``timing["graph_fallback"]``, and a failure on the device turns it off for the model)."""
    from .graphs import Unsupported, greedy_static

    try:
        return greedy_static(model, inputs, max_new_tokens=max_new_tokens, stop_ids=stop,
                             pad_token_id=pad_token_id, stats=timing, share_prefix=share_prefix)
    except Unsupported as err:
        timing["graph_fallback"] = str(err)
    except Exception as err:  # a capture that fails must not stop an evaluation
        log.exception("static_graphs failed; generate with the dynamic cache")
        timing["graph_fallback"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        try:
            model._vqatune_graphs_failed = timing["graph_fallback"]
        except AttributeError:
            pass
    return None


def generate_answers(model, processor, messages_list: Sequence[list[dict]], images: Sequence[Any],
                     *, batch_size: int = 8, max_new_tokens: int = 25, progress: bool = False,
                     image_keys: Sequence[Hashable] | None = None, pixel_cache=None,
                     cache_implementation: str = "dynamic", stats: dict | None = None,
                     bucket_tokens: int | None = None, share_image_prefix: bool = False) -> list[str]:
    """Greedy answers, one per (messages, image), in input order.

    ``messages_list`` holds chat messages without the assistant turn (``prompts.build_messages``);
    each user turn carries one image part, filled with the matching entry of ``images``.
    Prompts are sorted by length so a batch holds similar lengths (little padding), padded on
    the left, and each answer is the decoded tokens after its prompt, stripped.

    ``image_keys`` (one per row, e.g. the dataset's ``img_id``; equal keys = the same image) has
    each distinct image processed once, into ``pixel_cache`` (a ``vision.pixel_cache.ImagePixelCache``; pass
    the same one to several calls over the same images, e.g. evaluation's six configurations);
    the inputs, hence the answers, are the same as without. ``images`` is then read only for
    images not in the cache yet.

    ``cache_implementation``: "dynamic" (transformers' default), "static" (a preallocated KV
    cache; on CUDA transformers then compiles the decoding step, see ``EvaluateConfig``), or
    "static_graphs" (``generation.graphs.greedy_static``: a static cache and the project's own
    greedy loop, each decoding step one CUDA graph replay on CUDA; where that loop does not
    support the model, ``generate`` with the dynamic cache, the reason under
    ``stats["graph_fallback"]``). Every path stops a batch once all its rows have ended.

    ``bucket_tokens``: a batch also ends where the next (longer) prompt is more than this many
    text tokens longer than the batch's first, so rows of very different lengths are not padded
    to the longest (None: batches of ``batch_size`` along the length order).

    ``share_image_prefix`` (with "static_graphs", ``image_keys`` and an image-feature cache on the
    model): rows whose prompts agree up to their image, and show the same image, run that prefix
    once (``graphs.shared_prefix_plan``); rows are then ordered by the prompt before the image and
    the image, so a batch holds whole groups, and by length within them.

    ``stats``, when given, gets seconds added under ``encode_wait_s`` (waiting for inputs the
    CPU threads had not finished), ``transfer_s`` (inputs to the device), ``generate_s``
    (``model.generate``, synchronised on CUDA), ``decode_s``, ``total_s``, plus ``encode_thread_s``
    (the threads' encoding time, summed), ``rows``, ``batches``, ``decode_steps`` (tokens
    generated per batch, summed: fewer than ``max_new_tokens`` per batch where all rows ended
    early), ``padding_tokens`` (text-token padding over all batches) and, with ``image_keys``,
    ``images_processed`` / ``images_reused``, and ``image_features_s`` (the vision tower on
    unseen images, where the model has an image-feature cache); with "static_graphs"
    ``prefill_s``, ``graph_capture_s`` and ``graph_batches``. Values add up over calls sharing one dict.
    """
    import torch

    from ..vision.feature_cache import installed_feature_cache

    if len(messages_list) != len(images):
        raise ValueError(f"{len(messages_list)} message lists for {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if cache_implementation not in GENERATION_CACHES:
        raise ValueError(f"cache_implementation must be one of {GENERATION_CACHES}, got {cache_implementation!r}")
    started = time.perf_counter()
    texts = prompt_texts(processor, messages_list)
    tokenizer = processor.tokenizer
    # Text-token length is the sort key: every prompt carries the same number of image tokens.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    # Keyed rows on a model with an image-feature cache: batches name their images and carry the
    # pixels of unseen images only; no pixels of a known image are made, moved or hashed again.
    features = installed_feature_cache(model) if image_keys is not None else None
    share_image_prefix = share_image_prefix and features is not None and cache_implementation == "static_graphs"
    if share_image_prefix:
        boi = getattr(processor, "boi_token", None) or ""
        order = sorted(range(len(texts)), key=lambda i: (texts[i].split(boi)[0], str(image_keys[i]), lengths[i]))
    answers: list[str] = [""] * len(texts)
    device, dtype = _input_device(model), _floating_dtype(model)
    stop = stop_token_ids(model, tokenizer)
    # The static cache is transformers' own; "dynamic" stays its default (nothing passed).
    cache_kwargs = {"cache_implementation": "static"} if cache_implementation == "static" else {}
    sync = torch.cuda.synchronize if device.type == "cuda" and stats is not None else (lambda: None)
    timing = dict.fromkeys(("encode_wait_s", "transfer_s", "generate_s", "decode_s"), 0.0)

    from ..vision.keys import is_image_keys
    from ..vision.pixel_cache import ImagePixelCache
    from .encoder import BatchEncoder

    if image_keys is not None and pixel_cache is None:
        pixel_cache = ImagePixelCache()
    computed, reused = (pixel_cache.computed, pixel_cache.reused) if pixel_cache is not None else (0, 0)
    was_training = model.training
    model.eval()
    encoder = None
    batches = length_batches(order, lengths, batch_size, bucket_tokens)
    timing["padding_tokens"] = sum(len(rows) * max(lengths[i] for i in rows) - sum(lengths[i] for i in rows)
                                   for rows in batches)
    timing["decode_steps"] = 0
    try:
        with _left_padding(tokenizer):
            # The next batch is encoded on CPU threads while the GPU generates this one
            # (generation.encoder.BatchEncoder); the inputs are unchanged. Pixels are stored in the
            # dtype the model takes them in (the cast below is then a no-op).
            encoder = BatchEncoder(processor, texts, images, threads=min(batch_size, len(texts)),
                                   image_keys=image_keys,
                                   pixel_cache=pixel_cache if image_keys is not None else None,
                                   pixel_dtype=dtype if image_keys is not None else None,
                                   pin_memory=device.type == "cuda", feature_cache=features)
        pending = encoder.submit(batches[0]) if batches else None
        for n, rows in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
            clock = time.perf_counter()
            inputs = pending.result()
            if n + 1 < len(batches):
                pending = encoder.submit(batches[n + 1])
            timing["encode_wait_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            # Pinned pixels (BatchEncoder, CUDA) copy asynchronously; the stream orders the copy
            # before generate's first kernel.
            new_keys, new_pixels = inputs.pop("new_image_keys", None), inputs.pop("new_pixel_values", None)
            inputs = {k: (v.to(device, dtype, non_blocking=v.is_pinned())
                          if k == "pixel_values" and dtype is not None and not is_image_keys(v)
                          else v.to(device)) for k, v in inputs.items()}
            sync()
            timing["transfer_s"] += time.perf_counter() - clock
            if new_keys is not None:
                # The vision tower on this batch's unseen images, into the cache the forward reads.
                clock = time.perf_counter()
                features.prefill([(new_keys, new_pixels.to(device, dtype, non_blocking=new_pixels.is_pinned()))],
                                 device)
                sync()
                timing["image_features_s"] = timing.get("image_features_s", 0.0) + time.perf_counter() - clock
            clock = time.perf_counter()
            output = None
            if cache_implementation == "static_graphs" and not getattr(model, "_vqatune_graphs_failed", None):
                output = _static_graphs(model, inputs, max_new_tokens, stop, tokenizer.pad_token_id, timing,
                                        share_prefix=share_image_prefix)
            if output is None:
                with torch.inference_mode():
                    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id, **cache_kwargs)
                # Left padding puts every prompt's end at the same column: the answer starts there.
                output = output[:, inputs["input_ids"].shape[1]:]
                timing["decode_steps"] += output.shape[1]
            sync()
            timing["generate_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            new_tokens = output.tolist()
            # The answer ends at the turn's end: decoding alone would keep <end_of_turn> on a
            # tokenizer that does not flag it special (the tiny one), and rows that finished
            # early continue with padding.
            decoded = tokenizer.batch_decode([_until_stop(ids, stop) for ids in new_tokens],
                                             skip_special_tokens=True)
            for i, text in zip(rows, decoded):
                answers[i] = text.strip()
            timing["decode_s"] += time.perf_counter() - clock
    finally:
        if encoder is not None:
            encoder.close()
        model.train(was_training)
    if stats is not None:
        timing.update(total_s=time.perf_counter() - started, rows=len(texts), batches=len(batches),
                      encode_thread_s=encoder.encode_seconds if encoder is not None else 0.0)
        if pixel_cache is not None:
            timing.update(images_processed=pixel_cache.computed - computed,
                          images_reused=pixel_cache.reused - reused)
        add_stats(stats, timing)
    return answers


def add_stats(total: dict, new: dict) -> dict:
    """``new`` added into ``total`` key by key (strings, e.g. a fallback's reason, replace): how
    ``generate_answers`` sums its ``stats`` over calls sharing one dict. Returns ``total``."""
    for key, value in new.items():
        total[key] = value if isinstance(value, str) else total.get(key, 0) + value
    return total
