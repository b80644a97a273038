"""Greedy decoding over a static KV cache, each decoding step replayed as one CUDA graph.

``evaluate.cache_implementation: static_graphs``. A decoding step of MedGemma-4B is bound by the
host CPU on an H100: ~190 ms for a batch of 192 to launch thousands of small kernels one by one
(benchmarks/results/). Here the step (the model's forward for one token over a preallocated
cache, the argmax, the position and length updates) is captured once per batch with
``torch.cuda.graph`` and replayed: one launch per token. No ``torch.compile`` is involved, so the
capture costs two eager steps, not minutes of compilation (transformers' own static cache
compiles the step and did not finish in ~6 minutes on an H100).

The numbers are the model's: the prefill is the model's own forward (the image tokens'
bidirectional mask included), positions are generate's (``attention_mask.cumsum - 1``), and
each step attends to the prompt's real tokens and the tokens generated so far, the mask
``generate`` builds. The answers equal ``model.generate``'s up to floating-point rounding of the
longer (static) attention rows (tests/test_generation.py compares them on CPU, where the same
loop runs without a graph).

Supported: Gemma 3 style models with sdpa attention whose sliding window (if any) covers the
whole sequence; anything else raises ``Unsupported`` and the caller uses ``model.generate``.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .attention import NAME as GROUPED


class Unsupported(RuntimeError):
    """The static-graph loop cannot run this model or batch; use ``model.generate``."""


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(model, max_len: int) -> None:
    text = _text_config(model)
    attn = getattr(text, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if attn not in ("sdpa", GROUPED):
        raise Unsupported(f"attention {attn!r} (the loop builds sdpa's boolean masks)")
    window = getattr(text, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(text, "layer_types", None) or []) and max_len > window:
        raise Unsupported(f"{max_len} tokens exceed the sliding window of {window}")
    generation = getattr(model, "generation_config", None)
    # Logits processors generate would add for greedy decoding: the loop has none.
    neutral = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_new_tokens": (None, 0),
               "min_length": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
               "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
               "sequence_bias": (None,)}
    for key, allowed in neutral.items():
        value = getattr(generation, key, None)
        if value not in allowed:
            raise Unsupported(f"generation_config.{key}={value!r} changes greedy decoding")


def _positions(mask: torch.Tensor, start=0) -> torch.Tensor:
    # generate's positions: real tokens count from ``start``; padding gets 0
    position_ids = mask.long().cumsum(-1) - 1 + (start[:, None] if torch.is_tensor(start) else start)
    return position_ids.masked_fill(mask == 0, 0)


def _prefill(model, inputs: dict, max_new_tokens: int):
    """The whole prompt in one forward: (cache, last logits, prompt slots' validity [B, L],
    each row's next position)."""
    from transformers import StaticCache

    attention_mask = inputs["attention_mask"]
    length = attention_mask.shape[1]
    check_supported(model, length + max_new_tokens)
    cache = StaticCache(config=model.config, max_cache_len=length + max_new_tokens)
    position_ids = _positions(attention_mask)
    logits = model(**inputs, past_key_values=cache, use_cache=True, position_ids=position_ids,
                   logits_to_keep=1).logits
    return cache, logits, attention_mask.bool(), position_ids[:, -1] + 1


@dataclasses.dataclass
class SharedPrefixPlan:
    """Rows whose prompts agree up to their last image token (the same tokens and the same image)
    share that prefix's keys and values: it runs once per group (``group_of_row``), and each row
    only its own suffix (the question and the turn's end)."""

    groups: int
    group_of_row: torch.Tensor   # [B] long, on the device
    first_row: list[int]         # a row of each group
    prefix_start: torch.Tensor   # [B] first real (non-padding) column of each row
    prefix_end: torch.Tensor     # [B] column after each row's last image token


def shared_prefix_plan(inputs: dict, *, max_group_share: float = 0.75) -> SharedPrefixPlan | None:
    """The groups of a batch whose image rows are named by ``image_key`` (the evaluate stage's
    keyed batches: ``pixel_values`` int64 [B, 2]), or None where sharing would not pay (more
    groups than ``max_group_share`` of the rows, e.g. adaptive prompts that differ before the
    image) or the batch has no keys or image tokens."""
    from ..vision.keys import is_image_keys

    keys, types = inputs.get("pixel_values"), inputs.get("token_type_ids")
    if keys is None or types is None or not is_image_keys(keys):
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    cols = torch.arange(length, device=ids.device)
    last_image = torch.where(types.bool(), cols, -1).max(-1).values
    first_real = torch.where(mask.bool(), cols, length).min(-1).values
    if bool((last_image < 0).any()):
        return None
    end = last_image + 1
    # Grouping is a few hundred tuples: on the host.
    ids_h, keys_h, start_h, end_h = ids.tolist(), keys.tolist(), first_real.tolist(), end.tolist()
    index: dict = {}
    group_of_row, first_row = [], []
    for b in range(batch):
        signature = (tuple(keys_h[b]), tuple(ids_h[b][start_h[b]:end_h[b]]))
        if signature not in index:
            index[signature] = len(first_row)
            first_row.append(b)
        group_of_row.append(index[signature])
    if len(first_row) > max_group_share * batch:
        return None
    return SharedPrefixPlan(groups=len(first_row), first_row=first_row, prefix_start=first_real,
                            prefix_end=end, group_of_row=torch.tensor(group_of_row, device=ids.device))


def _prefill_shared(model, inputs: dict, plan: SharedPrefixPlan, max_new_tokens: int, pad_token_id: int):
    """``_prefill``'s result from two forwards: each group's prefix (with its image) once, then
    every row's suffix over the prefix's keys and values.

    The cache holds, per row, its group's prefix right-aligned in the first P slots, then its
    suffix right-aligned in the next S; the slots between are padding, masked as left padding is.
    Positions are the row's own (prefix 0..p-1, suffix p..), so each row computes what the
    single forward computes, up to floating-point rounding (tests/test_generation.py).
    """
    from transformers import StaticCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    device = ids.device
    start, end = plan.prefix_start, plan.prefix_end
    prefix_len = end - start
    first = torch.tensor(plan.first_row, device=device)
    width = int(prefix_len.max())
    suffix = int((length - end).max())
    check_supported(model, width + suffix + max_new_tokens)

    # Each group's prefix, right-aligned in `width` columns (left padding).
    cols = torch.arange(width, device=device)
    offset = (width - prefix_len[first])[:, None]             # [G, 1]
    source = (start[first][:, None] + cols - offset).clamp(min=0)  # [G, width] column in the batch
    prefix_mask = cols[None, :] >= offset
    pick = lambda t, fill: torch.where(prefix_mask, t[first].gather(1, source), fill)  # noqa: E731
    prefix_inputs = {"input_ids": pick(ids, pad_token_id), "attention_mask": prefix_mask.long(),
                     "token_type_ids": pick(inputs["token_type_ids"], 0),
                     "pixel_values": inputs["pixel_values"][first]}
    prefix_cache = StaticCache(config=model.config, max_cache_len=width)
    model(**prefix_inputs, past_key_values=prefix_cache, use_cache=True,
          position_ids=_positions(prefix_mask), logits_to_keep=1)

    # Every row: its group's prefix keys/values, then its suffix (the batch's last `suffix`
    # columns; the part of them before the row's suffix is padding).
    cache = StaticCache(config=model.config, max_cache_len=width + suffix + max_new_tokens)
    for layer, kv in enumerate(prefix_cache.layers):
        cache.update(kv.keys.index_select(0, plan.group_of_row), kv.values.index_select(0, plan.group_of_row),
                     layer)
    del prefix_cache
    suffix_cols = torch.arange(length - suffix, length, device=device)
    suffix_mask = (suffix_cols[None, :] >= end[:, None]) & mask[:, length - suffix:].bool()
    prompt_valid = torch.cat([prefix_mask[plan.group_of_row], suffix_mask], dim=1)
    total = width + suffix + max_new_tokens
    slots = torch.arange(total, device=device)
    queries = width + torch.arange(suffix, device=device)
    allowed = torch.cat([prompt_valid, torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)], 1)
    allowed = (allowed[:, None, :] & (slots[None, None, :] <= queries[None, :, None])).view(batch, 1, suffix, total)
    logits = model(input_ids=torch.where(suffix_mask, ids[:, length - suffix:], pad_token_id),
                   attention_mask={"full_attention": allowed, "sliding_attention": allowed},
                   position_ids=_positions(suffix_mask, prefix_len), past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    next_pos = prefix_len + suffix_mask.sum(-1)
    return cache, logits, prompt_valid, next_pos


def greedy_static(model, inputs: dict, *, max_new_tokens: int, stop_ids, pad_token_id: int,
                  use_graph: bool | None = None, stats: dict | None = None, check_every: int = 4,
                  share_prefix: bool = False) -> torch.Tensor:
    """Greedy tokens after the prompt, ``[batch, <= max_new_tokens]`` (a row's tokens after its
    first stop token are whatever the model chose next; callers cut at the stop token, as they
    do for ``generate``'s padding). Stops once every row has produced a stop token (checked
    every ``check_every`` steps). ``use_graph``: capture the step as a CUDA graph (default: on
    CUDA). ``stats`` gets ``prefill_s`` (synchronised), ``graph_capture_s``, ``decode_steps``,
    ``graph_batches`` added."""
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    device = input_ids.device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    stop = torch.tensor(sorted(stop_ids), device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)

    started = time.perf_counter()
    with torch.inference_mode():
        plan = shared_prefix_plan(inputs) if share_prefix else None
        if plan is not None:
            cache, logits, prompt_valid, next_pos = _prefill_shared(model, inputs, plan, max_new_tokens, pad_token_id)
        else:
            cache, logits, prompt_valid, next_pos = _prefill(model, inputs, max_new_tokens)
        length = prompt_valid.shape[1]
        max_len = length + max_new_tokens
        token = logits[:, -1].float().argmax(-1)
        out[:, 0] = token
        finished = torch.isin(token, stop)
        if stats is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - started
            if plan is not None:
                stats["shared_prefix_rows"] = stats.get("shared_prefix_rows", 0) + batch
                stats["shared_prefix_groups"] = stats.get("shared_prefix_groups", 0) + plan.groups
        if max_new_tokens == 1:
            return out

        # The step's static inputs, updated in place by the step itself.
        in_tok = token[:, None].clone()
        pos = next_pos[:, None].clone()
        cur = torch.tensor(length, device=device)  # the cache slot the fed token goes to
        valid = torch.cat([prompt_valid, torch.ones(batch, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
        slots = torch.arange(max_len, device=device)

        def step():
            mask = (valid & (slots <= cur)).view(batch, 1, 1, max_len)
            logits = model(input_ids=in_tok, attention_mask={"full_attention": mask, "sliding_attention": mask},
                           position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            nxt = logits[:, -1].float().argmax(-1)
            in_tok.copy_(nxt[:, None])
            pos.add_(1)
            cur.add_(1)
            return nxt

        run = step
        graph = None
        if use_graph:
            started = time.perf_counter()
            layers = list(getattr(cache, "layers", []))
            saved = [(layer.cumulative_length.clone(), getattr(layer, "cumulative_length_int", None))
                     for layer in layers]
            state = (in_tok.clone(), pos.clone(), cur.clone())

            def restore():
                for layer, (tensor, count) in zip(layers, saved):
                    layer.cumulative_length.copy_(tensor)
                    if count is not None:
                        layer.cumulative_length_int = count
                in_tok.copy_(state[0]), pos.copy_(state[1]), cur.copy_(state[2])

            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()  # warm-up: lazy allocations, compiled kernels, cuBLAS workspaces
            torch.cuda.current_stream(device).wait_stream(side)
            restore()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the BatchEncoder's threads may pin host memory for the next batch meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_next = step()
            restore()  # capturing ran the Python again (the ints), not the kernels
            torch.cuda.synchronize(device)

            def replay():
                graph.replay()
                return static_next

            run = replay

            if stats is not None:
                stats["graph_capture_s"] = stats.get("graph_capture_s", 0.0) + time.perf_counter() - started
                stats["graph_batches"] = stats.get("graph_batches", 0) + 1
        steps = 1
        for t in range(1, max_new_tokens):
            if t % check_every == 0 and bool(finished.all()):
                break
            token = run()
            out[:, t] = token
            finished |= torch.isin(token, stop)
            steps += 1

    if stats is not None:
        stats["decode_steps"] = stats.get("decode_steps", 0) + steps
    return out[:, :steps]
