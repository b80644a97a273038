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

import time

import torch


class Unsupported(RuntimeError):
    """The static-graph loop cannot run this model or batch; use ``model.generate``."""


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(model, max_len: int) -> None:
    text = _text_config(model)
    attn = getattr(text, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if attn != "sdpa":
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


def greedy_static(model, inputs: dict, *, max_new_tokens: int, stop_ids, pad_token_id: int,
                  use_graph: bool | None = None, stats: dict | None = None, check_every: int = 4) -> torch.Tensor:
    """Greedy tokens after the prompt, ``[batch, <= max_new_tokens]`` (a row's tokens after its
    first stop token are whatever the model chose next; callers cut at the stop token, as they
    do for ``generate``'s padding). Stops once every row has produced a stop token (checked
    every ``check_every`` steps). ``use_graph``: capture the step as a CUDA graph (default: on
    CUDA). ``stats`` gets ``graph_capture_s``, ``decode_steps``, ``graph_batches`` added."""
    from transformers import StaticCache

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = input_ids.shape
    device = input_ids.device
    max_len = length + max_new_tokens
    check_supported(model, max_len)
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(attention_mask == 0, 0)
    stop = torch.tensor(sorted(stop_ids), device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)

    with torch.inference_mode():
        logits = model(**inputs, past_key_values=cache, use_cache=True, position_ids=position_ids,
                       logits_to_keep=1).logits
        token = logits[:, -1].float().argmax(-1)
        out[:, 0] = token
        finished = torch.isin(token, stop)
        if max_new_tokens == 1:
            return out

        # The step's static inputs, updated in place by the step itself.
        in_tok = token[:, None].clone()
        pos = position_ids[:, -1:] + 1
        cur = torch.tensor(length, device=device)  # the cache slot the fed token goes to
        valid = torch.cat([attention_mask.bool(), torch.ones(batch, max_new_tokens, dtype=torch.bool,
                                                             device=device)], dim=1)
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
