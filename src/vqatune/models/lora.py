"""LoRA: which weights of the base model learn (``train.lora``), and attaching the adapters."""
from __future__ import annotations

import dataclasses
import logging
from typing import Literal, Union

from ..config import require

log = logging.getLogger(__name__)


# LoRA target presets. Language-model and vision-tower projections carry the same leaf names
# (q_proj ...), so presets are resolved per tower into a regex over full module names.
LM_MLP = ("gate_proj", "up_proj", "down_proj")
LM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
VISION_MLP = ("fc1", "fc2")
VISION_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TARGET_PRESETS = ("mlp", "lm", "all-linear")
LM_PREFIX = r".*language_model\."
VISION_PREFIX = r".*vision_tower\."
TIED_MODULES = ("embed_tokens", "lm_head")


@dataclasses.dataclass
class LoraSettings:
    """`train.lora:` — which weights learn, and how much."""

    r: int = 16
    # Scale of the update is alpha / r; the guide keeps alpha at 1-4x r (2x customary).
    alpha: int = 32
    dropout: float = 0.05
    # mlp: the guide's up/gate/down (least memory); lm: every language-model projection
    # (q/k/v/o/gate/up/down, the faster recipe of the GPU measurements); all-linear: every linear layer of both
    # towers (peft's and Google's notebook meaning; vision_tower is implied). Or a list of module
    # names (peft's suffix match).
    target_modules: Union[str, list[str]] = "mlp"
    # LoRA on the vision tower's projections too (mlp, lm, list). Frozen by default: on MedGemma it costs memory
    # (all-linear with the tower ran out of memory at batch 8 on an H100) and its SigLIP is already medical.
    vision_tower: bool = False
    # Modules trained in full and saved with the adapter. multi_modal_projector: the image->text
    # projector (1152x2560 on MedGemma), lets a model whose projector was never trained (the tiny
    # one: it starts at zero) use its images. embed_tokens: the (tied) embeddings and output head,
    # as Google's MedGemma notebook trains them; 0.67 B parameters on MedGemma, so off there.
    modules_to_save: list[str] = dataclasses.field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"

    def validate(self, p: str) -> None:
        require(self.r >= 1, f"{p}.r", "must be a positive integer (the guide uses 8-32)")
        require(self.alpha >= 1, f"{p}.alpha", "must be a positive integer (1-4x r is customary)")
        require(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str):
            require(self.target_modules in TARGET_PRESETS, f"{p}.target_modules",
                    f"must be one of {', '.join(TARGET_PRESETS)} or a list of module names")
        else:
            require(bool(self.target_modules) and all(m.strip() for m in self.target_modules),
                    f"{p}.target_modules", "must be a non-empty list of module names")
        require(all(m.strip() for m in self.modules_to_save), f"{p}.modules_to_save",
                "must be a list of module names, e.g. [multi_modal_projector]")


def lora_target_regex(target_modules: str, vision_tower: bool) -> str:
    """A peft target regex (full match on module names) for a preset, per tower."""
    lm = {"mlp": LM_MLP, "lm": LM_ATTENTION + LM_MLP, "all-linear": LM_ATTENTION + LM_MLP}
    vision = {"mlp": VISION_MLP, "lm": VISION_ATTENTION + VISION_MLP,
              "all-linear": VISION_ATTENTION + VISION_MLP}
    parts = [LM_PREFIX + ".*\\.(" + "|".join(lm[target_modules]) + ")"]
    if vision_tower:
        parts.append(VISION_PREFIX + ".*\\.(" + "|".join(vision[target_modules]) + ")")
    return "|".join(f"({p})" for p in parts)


def attach_lora(model, lora_cfg: LoraSettings):
    """Wrap ``model`` in a peft ``PeftModel`` with the adapters ``lora_cfg`` asks for.

    Returns the PeftModel; ``trainable_parameters(peft_model)`` gives the count and share.
    """
    from peft import LoraConfig, get_peft_model

    exclude = None
    if isinstance(lora_cfg.target_modules, str):
        vision = lora_cfg.vision_tower or lora_cfg.target_modules == "all-linear"
        target = lora_target_regex(lora_cfg.target_modules, vision)
    else:
        target = list(lora_cfg.target_modules)
        if not lora_cfg.vision_tower:
            exclude = VISION_PREFIX + ".*"
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target,
        exclude_modules=exclude,
        bias=lora_cfg.bias,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        # A tied embedding trained in full must stay tied to the output head it shares weights with.
        ensure_weight_tying=any(m in TIED_MODULES for m in lora_cfg.modules_to_save),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable, total = trainable_parameters(peft_model)
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)", lora_cfg.r,
             lora_cfg.alpha, lora_cfg.target_modules, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1))
    return peft_model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
