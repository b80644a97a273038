"""Grouped-query attention without copying the KV cache, for generation.

Gemma 3 has fewer key/value heads than query heads (MedGemma-4B: 8 query heads share 4 KV
heads). transformers' ``sdpa`` attention hands that to ``scaled_dot_product_attention`` as
``enable_gqa`` only when there is no attention mask; with a mask (every padded batch, every
decoding step over a static cache) it first copies each KV head once per query head
(``repeat_kv``): for a 384-row batch over a 450-token cache that is ~0.7 GB written and read
again per layer and decoding step, more memory traffic than the layer's weights.

``grouped_sdpa_attention`` computes the same thing without the copy: the query heads that share
a KV head are stacked along the query axis, so one ``scaled_dot_product_attention`` call per KV
head attends all of them, the mask repeated along that axis (one row per query, small). Every
query row sees the same keys, values and mask as before; only the copy is gone
(tests/test_generation.py compares it with ``sdpa``). transformers has no option for this, so
it is written here and registered under its own name through transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (the mask is ``sdpa``'s).
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "sdpa_grouped"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: ``query`` [b, heads, q, d], ``key``/``value``
    [b, kv_heads, k, d]; returns ([b, q, heads, d], None) as ``sdpa_attention_forward`` does."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1 or attention_mask is None or dropout or kwargs.get("position_bias") is not None:
        # Nothing to save (no mask: sdpa already passes enable_gqa) or a case it handles alone.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    # repeat_kv gives query head h the KV head h // groups: the heads of one group are adjacent.
    stacked = query.reshape(b, kv_heads, groups * q, d)
    # The mask's rows in the same order: a shared mask once per head of a group, a per-head one
    # as it is ([b, 1 or heads, q or 1, k] -> [b, 1 or kv_heads, groups * q, k]).
    k = attention_mask.shape[-1]
    mask = attention_mask.expand(b, groups if attention_mask.shape[1] == 1 else heads, q, k)
    mask = mask.reshape(b, -1, groups * q, k)
    out = torch.nn.functional.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> bool:
    """Switch ``model`` (loaded with ``sdpa``) to ``grouped_sdpa_attention``. Returns whether it
    did: models on another attention implementation are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
