"""``train.gradient_checkpointing: auto``: recompute only as many decoder layers as memory needs.

Gradient checkpointing trades memory for time: a checkpointed layer keeps only its input for the
backward pass and runs its forward again there. For a LoRA run on a frozen base the forward is
about a third of a step's compute (the backward computes input gradients, a second forward's
worth, and tiny adapter gradients), so checkpointing every layer costs ~1.5x the time of none.
On a large card the activations of many layers fit; ``auto`` keeps as many layers
un-checkpointed as the free memory holds and checkpoints the rest. transformers has a switch per
layer (``GradientCheckpointingLayer.gradient_checkpointing``), which this sets; what each layer
computes is unchanged (the recompute replays the same RNG state), so losses are the same
whichever layers recompute.

The activation size is an estimate from the text config (``activation_bytes_per_token``) that
errs high; ``AUTO_HEADROOM`` keeps a share of the card free for what it does not count (the
allocator's fragmentation, the loss over the 262k vocabulary, the evaluation steps' logits).
"""
from __future__ import annotations

import logging
from typing import Union

log = logging.getLogger(__name__)

# Share of the card's memory left free after the planned activations, plus a fixed reserve.
AUTO_HEADROOM = 0.15
AUTO_RESERVE_GIB = 2.0


def resolve(setting: Union[bool, str], device: str) -> Union[bool, str]:
    """What ``prepare_for_kbit_training`` gets: True, False, or "auto" (CUDA only; on CPU the
    activations live in host memory and the recompute is pure cost, so auto is off)."""
    if setting == "auto":
        return "auto" if str(device).startswith("cuda") else False
    return bool(setting)


def decoder_layers(model) -> list:
    """The language model's checkpointable layers (Gemma 3: ``Gemma3DecoderLayer``), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and type(m).__name__.endswith("DecoderLayer")]


def activation_bytes_per_token(text_config, *, fp32_residual: bool) -> int:
    """Bytes one un-checkpointed decoder layer keeps per token for the backward pass (upper
    estimate for a Gemma 3 layer with LoRA on its linear layers, bf16 activations).

    Counted per token: the four RMSNorms' inputs and outputs and the residual sums (12 x hidden),
    q/k/v before and after their norms and rotary, and sdpa's saved q/k/v/output (3 x q width +
    5 x kv width), and the MLP's gate, up, activation, product and a LoRA dropout copy of the
    down projection's input (5 x intermediate). The fp32 residual stream stores its hidden-size
    tensors at 4 bytes: 4 of them per layer.
    """
    h = text_config.hidden_size
    inter = text_config.intermediate_size
    head_dim = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    q = text_config.num_attention_heads * head_dim
    kv = getattr(text_config, "num_key_value_heads", text_config.num_attention_heads) * head_dim
    elements = 12 * h + 3 * q + 5 * kv + 5 * inter
    return 2 * elements + (2 * 4 * h if fp32_residual else 0)


def plan(n_layers: int, *, per_layer: int, boundary: int, budget: int) -> int:
    """How many of ``n_layers`` to checkpoint so that the activations fit ``budget`` bytes.

    An un-checkpointed layer keeps ``per_layer`` bytes; a checkpointed one keeps its input
    (``boundary``), and the backward pass holds one recomputed layer at a time (``per_layer``
    more while any layer is checkpointed)."""
    for checkpointed in range(n_layers + 1):
        need = (n_layers - checkpointed) * per_layer + checkpointed * boundary + (per_layer if checkpointed else 0)
        if need <= budget:
            return checkpointed
    return n_layers


def apply_auto(model, *, tokens_per_step: int, fp32_residual: bool) -> dict:
    """Checkpoint the first k decoder layers of ``model`` (gradient checkpointing already
    enabled on all of them) and turn it off on the rest; k from the free CUDA memory now (after
    the model, the adapters and the image-feature table are in place). Returns what was planned
    (for the train metrics and the log)."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        return {"checkpointed_layers": None, "why": "no decoder layers found"}
    device = next(layers[0].parameters()).device
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    free, total = torch.cuda.mem_get_info(device)
    # Memory torch's allocator holds but does not use is free to the run as well.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = int(free - AUTO_HEADROOM * total - AUTO_RESERVE_GIB * 2**30)
    per_token = activation_bytes_per_token(text, fp32_residual=fp32_residual)
    per_layer = per_token * tokens_per_step
    boundary = tokens_per_step * text.hidden_size * (4 if fp32_residual else 2)
    k = plan(len(layers), per_layer=per_layer, boundary=boundary, budget=max(budget, 0))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k
    info = {"checkpointed_layers": k, "layers": len(layers), "tokens_per_step": tokens_per_step,
            "estimated_gib_per_layer": round(per_layer / 2**30, 3), "budget_gib": round(budget / 2**30, 2),
            "why": f"auto: {len(layers) - k} of {len(layers)} layers keep their activations "
                   f"(~{per_layer / 2**30:.2f} GiB each at {tokens_per_step} tokens a step) in "
                   f"{budget / 2**30:.1f} GiB free after a {AUTO_HEADROOM:.0%} + {AUTO_RESERVE_GIB:g} GiB reserve"}
    log.info("train.gradient_checkpointing=%s", info["why"])
    return info


def longest_row_tokens(collator, dataset, *, sample: int = 256, seed: int = 0) -> int:
    """Tokens in the longest collated row among the rows with the longest messages and a random
    sample (every Gemma 3 prompt carries the same image tokens, so the text decides).
    ``dataset``: rows the collator takes (with ``image_keys``, no image is processed)."""
    import random

    n = len(dataset)
    if n == 0:
        return 0
    columns = [c for c in dataset.column_names if c.startswith("messages_") or c in ("row_id", "img_id", "question")]
    rows = dataset.select_columns(columns)
    size = [len(str(row[f"messages_{collator.row_mode(row)}"])) for row in rows]
    longest = sorted(range(n), key=size.__getitem__)[-32:]
    picked = sorted(set(longest) | set(random.Random(seed).sample(range(n), min(sample, n))))
    best = 0
    for start in range(0, len(picked), 32):
        batch = collator([dataset[i] for i in picked[start:start + 32]])
        best = max(best, int(batch["input_ids"].shape[1]))
    return best
