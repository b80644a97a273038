"""Model set-up: loading (quantized on CPU too), LoRA targets per preset, no fp32 upcast, freeing."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vqatune.config import ConfigError, build
from vqatune.models.loading import free_model, load_base_model
from vqatune.models.lora import LoraSettings, attach_lora, trainable_parameters
from vqatune.models.precision import prepare_for_kbit_training


def lora_modules(model) -> set[str]:
    """Names (from the base model's root) of the modules that carry a LoRA adapter."""
    return {name.split("base_model.model.", 1)[1] for name, module in model.named_modules()
            if hasattr(module, "lora_A") and name.startswith("base_model.model.")}


def test_4bit_loads_and_runs_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir, quantization="4bit", compute_dtype="float32", device="cpu")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 26  # 2 LM layers x 7 + 2 vision layers x 6; lm_head stays dense
    assert linears[0].weight.quant_type == "nf4" and linears[0].weight.quant_state.nested
    out = model(input_ids=torch.tensor([[2, 10, 20, 30]]), labels=torch.tensor([[2, 10, 20, 30]]))
    assert torch.isfinite(out.loss)
    free_model(model)


@pytest.mark.parametrize("preset, vision, expect_lm, expect_vision", [
    ("mlp", False, {"gate_proj", "up_proj", "down_proj"}, set()),
    ("lm", False, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, set()),
    ("mlp", True, {"gate_proj", "up_proj", "down_proj"}, {"fc1", "fc2"}),
    ("all-linear", False, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
     {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    (["q_proj"], False, {"q_proj"}, set()),
    (["q_proj"], True, {"q_proj"}, {"q_proj"}),
])
def test_lora_targets_per_preset_and_tower(tiny_model_dir, preset, vision, expect_lm, expect_vision):
    model = load_base_model(tiny_model_dir, device="cpu")
    peft_model = attach_lora(model, LoraSettings(target_modules=preset, vision_tower=vision))
    names = lora_modules(peft_model)
    lm = {n.rsplit(".", 1)[1] for n in names if ".language_model." in n}
    vis = {n.rsplit(".", 1)[1] for n in names if ".vision_tower." in n}
    assert lm == expect_lm and vis == expect_vision
    assert not any("lm_head" in n or "multi_modal_projector" in n for n in names)
    # Each LM layer gets the adapters (2 layers).
    assert len([n for n in names if ".language_model." in n]) == 2 * len(expect_lm)
    trainable, total = trainable_parameters(peft_model)
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    free_model(peft_model)


def test_modules_to_save_train_in_full_and_keep_tied_head(tiny_model_dir):
    model = load_base_model(tiny_model_dir, device="cpu")
    peft_model = attach_lora(model, LoraSettings(modules_to_save=["multi_modal_projector", "embed_tokens"]))
    full = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert any("multi_modal_projector.modules_to_save" in n for n in full)
    embed = [p for n, p in peft_model.named_parameters() if "embed_tokens.modules_to_save" in n]
    assert len(embed) == 1
    with torch.no_grad():
        embed[0].add_(1.0)
    assert torch.equal(peft_model.get_output_embeddings().weight, embed[0])
    free_model(peft_model)


def test_kbit_preparation_keeps_dtypes_and_freezes(tiny_model_dir):
    model = load_base_model(tiny_model_dir, quantization="4bit", compute_dtype="bfloat16",
                            dtype="bfloat16", device="cpu")
    before = {n: p.dtype for n, p in model.named_parameters()}
    model = prepare_for_kbit_training(model, gradient_checkpointing=True)
    # peft's prepare_model_for_kbit_training would turn these bf16 weights into fp32.
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    free_model(model)


@pytest.mark.parametrize("fp32_residual", [True, False])
def test_fp32_residual_keeps_a_small_lora_update_that_a_bf16_stream_rounds_away(tiny_model_dir, fp32_residual):
    """A LoRA update far below half a bf16 step of the layer output it joins (what AdamW's first
    steps from a zero LoRA B are) survives in an fp32 stream and is rounded away in a bf16 one."""
    model = load_base_model(tiny_model_dir, quantization="4bit", compute_dtype="bfloat16",
                            dtype="bfloat16", device="cpu")
    model = prepare_for_kbit_training(model, gradient_checkpointing=False, fp32_residual=fp32_residual)
    model = attach_lora(model, LoraSettings(r=4, alpha=4, dropout=0.0, target_modules="mlp"))
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    seen = {}
    layer.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output))
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16]])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer's bf16 runs
        model(input_ids=ids)
        before = seen["out"].float()
        update = torch.full_like(layer.lora_B["default"].weight, 1e-6)
        layer.lora_B["default"].weight.copy_(update)
        model(input_ids=ids)
        after = seen["out"].float()
    x, a = seen["x"].float(), layer.lora_A["default"].weight.float()
    expected = x @ a.T @ update.float().T * layer.scaling["default"]  # fp32, outside autocast
    assert seen["out"].dtype == (torch.float32 if fp32_residual else torch.bfloat16)
    assert expected.abs().max() < 1e-3 * before.abs().max()  # far below one bf16 step of the output
    if fp32_residual:
        torch.testing.assert_close(after - before, expected, rtol=0.05, atol=1e-7)
    else:
        assert (after == before).float().mean() > 0.9  # the update is lost in bf16 rounding
    free_model(model)


def test_free_model_releases_model_and_trainer_like_holders(tiny_model_dir):
    model = attach_lora(load_base_model(tiny_model_dir, device="cpu"), LoraSettings())
    ref = weakref.ref(model)
    param = next(model.parameters())

    class Holder:  # a trainer-like object with a reference cycle back to itself
        def __init__(self, m):
            self.model = m
            self.optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
            self.me = self

    holder = Holder(model)
    free_model(holder, model)
    assert param.numel() == 0  # storage released even though we still hold `param`
    del model, holder, param
    gc.collect()
    assert ref() is None


def test_lora_settings_validation():
    with pytest.raises(ConfigError, match=r"train.lora.target_modules"):
        build(LoraSettings, {"target_modules": "attention"}, "train.lora")
    with pytest.raises(ConfigError, match=r"train.lora.r"):
        build(LoraSettings, {"r": 0}, "train.lora")
    with pytest.raises(ConfigError, match=r"train.lora.dropout"):
        build(LoraSettings, {"dropout": 1.5}, "train.lora")
    with pytest.raises(ConfigError, match=r"train.lora.rank: unknown key"):
        build(LoraSettings, {"rank": 8}, "train.lora")
    assert build(LoraSettings, {"target_modules": ["q_proj", "v_proj"]}, "train.lora").target_modules == [
        "q_proj", "v_proj"]
