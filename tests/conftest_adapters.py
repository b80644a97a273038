"""Shared by test_merge, test_export and test_cli: a LoRA adapter on the tiny model whose
weights are perturbed, so merging it changes the model (a fresh LoRA's B is zero: merging it
would change nothing and every merge test would pass trivially)."""
from __future__ import annotations

from pathlib import Path


def make_perturbed_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """LoRA on every linear layer of both towers plus a fully trained projector
    (modules_to_save), all moved away from their initial values."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vqatune.models.loading import free_model, load_base_model

    torch.manual_seed(seed)
    model = load_base_model(base_dir, dtype="float32", device="cpu")
    # peft directly, not the training presets: this fixture must not move when they do.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=r".*(language_model|vision_tower).*\.(q_proj|k_proj|v_proj|o_proj|"
                                       r"out_proj|gate_proj|up_proj|down_proj|fc1|fc2)",
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    free_model(peft_model)
    return out_dir


def write_params(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
