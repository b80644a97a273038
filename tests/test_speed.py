"""The GPU levers compute the same function as the plain path (checked on the tiny model, CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vqatune import speed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    return model, processor


def _batch(processor, n=3, seed=0):
    from medgemma import benchmark_qa
    from proto_levers import collate

    rows = benchmark_qa(4, processor.image_processor.size["height"], seed=seed)[:n]
    return rows, collate(processor, rows, train=True)


def test_image_feature_cache_returns_what_the_tower_computes_and_runs_it_once_per_image(tiny):
    model, processor = tiny
    rows, batch = _batch(processor, n=3, seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ref = model(**batch).logits
    cache = speed.install_image_feature_cache(model, training=True)
    try:
        calls = []
        tower = speed._multimodal_core(model).vision_tower
        handle = tower.register_forward_hook(
            lambda m, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
        with torch.no_grad():
            first = model(**batch).logits
            second = model(**batch).logits
        handle.remove()
        torch.testing.assert_close(first, ref)
        torch.testing.assert_close(second, ref)
        distinct = len({r.img_id for r in rows})
        assert cache.misses == distinct and cache.hits == 2 * len(rows) - distinct
        assert sum(calls) == distinct  # the tower ran once per distinct image, never again
        # a changed image is a new key
        other = batch["pixel_values"].clone()
        other[0, 0, 0, 0] += 0.5
        assert cache.keys(other)[0] != cache.keys(batch["pixel_values"])[0]
        assert cache.keys(other)[1:] == cache.keys(batch["pixel_values"])[1:]
    finally:
        cache.uninstall()
    assert "get_image_features" not in vars(speed._multimodal_core(model))
    for p in model.parameters():
        p.requires_grad_(True)


def test_image_feature_cache_refuses_a_trainable_tower_or_an_adapter_on_it(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="vision_tower trains"):
        speed.install_image_feature_cache(model, training=True)
    # generation: requires_grad is irrelevant, the weights never change
    speed.install_image_feature_cache(model, training=False).uninstall()
    projector = get_peft_model(model, LoraConfig(r=2, target_modules=["up_proj"],
                                                 modules_to_save=["multi_modal_projector"]))
    assert "multi_modal_projector" in speed.vision_cache_blocker(projector, training=False)
    assert speed.maybe_install_image_feature_cache(projector, training=True) is None
    assert speed.maybe_install_image_feature_cache(projector, training=False, enabled=False) is None


def test_no_cache_when_lora_reaches_the_vision_tower(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    vision = get_peft_model(model, LoraConfig(r=2, target_modules=["fc1"]))
    assert "vision_tower" in speed.vision_cache_blocker(vision, training=False)
    with pytest.raises(ValueError, match="adapter reaches the vision_tower"):
        speed.install_image_feature_cache(vision, training=False)


def test_dequantized_nf4_model_generates_what_the_nf4_model_generates(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=q,
                                                        device_map={"": "cpu"})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    from proto_levers import collate

    from medgemma import benchmark_qa
    batch = collate(processor, benchmark_qa(3, processor.image_processor.size["height"], seed=3)[:4], train=False)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    replaced = speed.dequantize_for_generation(model, dtype=torch.float32)
    assert replaced > 0
    assert not any(type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A") for m in model.modules())
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        with model.disable_adapter():
            base = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert not torch.equal(base, out)  # the adapter still acts and can still be switched off


def test_freeze_without_upcast_keeps_dtypes_and_freezes(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    speed.freeze_for_kbit_training(model, upcast_to_fp32=False, gradient_checkpointing=True)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    speed.freeze_for_kbit_training(model, upcast_to_fp32=True, gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the guide's upcast, on request


def test_batch_encoder_returns_what_one_processor_call_returns(tiny):
    from vqatune.prompts import PromptsConfig, build_messages

    _, processor = tiny
    from medgemma import benchmark_qa

    rows = benchmark_qa(4, processor.image_processor.size["height"], seed=4)[:7]
    modes = ["none", "static", "adaptive"]  # different prompt lengths -> real padding
    texts = [processor.apply_chat_template(build_messages(r.question, modes[i % 3], PromptsConfig()),
                                           add_generation_prompt=True, tokenize=False) for i, r in enumerate(rows)]
    images = [r.image for r in rows]
    processor.tokenizer.padding_side = "left"
    ref = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    encoder = speed.BatchEncoder(processor, texts, images, threads=3)
    try:
        got = encoder.submit(list(range(len(rows)))).result()
        one = encoder.submit([2]).result()
    finally:
        encoder.close()
    assert set(got) == set(ref)
    assert len(set(ref["attention_mask"].sum(1).tolist())) > 1
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert one["input_ids"].shape[0] == 1
