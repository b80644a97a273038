"""train.gradient_checkpointing: auto (vqatune.training.checkpointing): the plan, and that a
partly checkpointed model recomputes exactly the planned layers and trains like an unchecked one."""
from __future__ import annotations

import types

import torch

from vqatune.training import checkpointing
from vqatune.training.checkpointing import activation_bytes_per_token, apply_auto, decoder_layers, plan


def test_plan_checkpoints_the_fewest_layers_that_fit():
    # 4 layers, 10 bytes each kept, 1 byte at a checkpointed layer's input, +10 while recomputing.
    assert plan(4, per_layer=10, boundary=1, budget=40) == 0        # 4 x 10 fits
    assert plan(4, per_layer=10, boundary=1, budget=39) == 2        # k=1: 30+1+10=41; k=2: 20+2+10=32
    assert plan(4, per_layer=10, boundary=1, budget=14) == 4        # 4x1 + 10 = 14
    assert plan(4, per_layer=10, boundary=1, budget=0) == 4         # nothing fits: all of them


def test_auto_is_off_on_cpu_and_kept_on_cuda():
    assert checkpointing.resolve("auto", "cpu") is False
    assert checkpointing.resolve("auto", "cuda:1") == "auto"
    assert checkpointing.resolve(True, "cpu") is True and checkpointing.resolve(False, "cuda") is False


def test_activation_estimate_by_hand():
    text = types.SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, head_dim=2,
                                 num_key_value_heads=1)
    # 12*4 + 3*(2*2) + 5*(1*2) + 5*8 = 48 + 12 + 10 + 40 = 110 elements of 2 bytes
    assert activation_bytes_per_token(text, fp32_residual=False) == 220
    assert activation_bytes_per_token(text, fp32_residual=True) == 220 + 2 * 4 * 4


def test_auto_recomputes_the_planned_layers_and_leaves_gradients_unchanged(processed_dir, monkeypatch,
                                                                           tmp_path):
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model

    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.models.precision import prepare_for_kbit_training
    from vqatune.config import ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3
    from vqatune.training.collate import AnswerOnlyCollator

    tiny_model_dir = build_tiny_gemma3(tmp_path / "model", ModelConfig(tiny_layers=4))
    processor = load_processor(tiny_model_dir)
    train = load_from_disk(str(processed_dir))["train"]
    collator = AnswerOnlyCollator(processor, "mix")
    batch = collator([train[i] for i in range(4)])
    longest = checkpointing.longest_row_tokens(collator, train)
    assert longest >= batch["input_ids"].shape[1]

    torch.manual_seed(0)
    model = load_base_model(tiny_model_dir, device="cpu")
    model = prepare_for_kbit_training(model, True, fp32_residual=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj", "q_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    model.train()
    layers = decoder_layers(model)
    assert len(layers) == 4 and all(layer.gradient_checkpointing for layer in layers)

    # A card whose free memory holds all layers' activations but one: two layers recompute (one
    # alone would save nothing: the backward holds a recomputed layer's activations).
    text = model.config.get_text_config(decoder=True)
    tokens = 4 * longest
    per_layer = activation_bytes_per_token(text, fp32_residual=False) * tokens
    boundary = tokens * text.hidden_size * 2
    total = 100 * 2**30
    free = ((len(layers) - 1) * per_layer + 2 * boundary
            + checkpointing.AUTO_HEADROOM * total + checkpointing.AUTO_RESERVE_GIB * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free) + 1, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    info = apply_auto(model, tokens_per_step=tokens, fp32_residual=False)
    assert info["checkpointed_layers"] == 2
    assert [layer.gradient_checkpointing for layer in layers] == [True, True] + [False] * (len(layers) - 2)

    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    partial = grads()
    assert calls == [2, 2] + [1] * (len(layers) - 2)  # the checkpointed layers ran again in the backward
    for layer in layers:
        layer.gradient_checkpointing = False
    plain = grads()
    assert partial.keys() == plain.keys() and any("lora_A" in n for n in plain)
    for name, g in plain.items():
        assert torch.allclose(partial[name], g, rtol=1e-5, atol=1e-7), name
