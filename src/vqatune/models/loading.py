"""Model set-up, shared by training, search, evaluation and export: load the base model
(optionally quantized), prepare it for k-bit training, attach LoRA, and free it again.

Every loader takes the model *folder* (``models/base``): the base_model stage has already put the
builtin tiny model or the hub checkpoint there.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Literal, Optional, Union

from .config import require

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

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
    # (q/k/v/o/gate/up/down, the anchor's faster recipe); all-linear: every linear layer of both
    # towers (peft's and Google's notebook meaning; vision_tower is implied). Or a list of module
    # names (peft's suffix match).
    target_modules: Union[str, list[str]] = "mlp"
    # LoRA on the vision tower's projections too (mlp, lm, list). Frozen by default: on MedGemma it costs memory
    # (gpu-anchor: all-linear with the tower OOMs at batch 8) and its SigLIP is already medical.
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


def resolve_device(device: Optional[str] = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str):
    import torch

    require(name in DTYPES, "dtype", f"{name!r} is not one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_processor(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def quantization_config(quantization: str, compute_dtype: str = "bfloat16"):
    """The guide's bitsandbytes config: nf4 + double quantization for 4-bit; None for none."""
    import torch
    from transformers import BitsAndBytesConfig

    require(quantization in QUANTIZATIONS, "quantization",
            f"{quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    require(compute_dtype in DTYPES[1:], "compute_dtype", f"must be one of {', '.join(DTYPES[1:])}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def load_base_model(model_dir: str | Path, *, quantization: str = "none",
                    compute_dtype: str = "bfloat16", dtype: str = "auto",
                    attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                    device: Optional[str] = None):
    """The base model from ``model_dir`` on ``device`` (cuda if available, else cpu).

    bitsandbytes 0.50 runs nf4 and int8 on CPU too, so a quantized run does not need a GPU.
    """
    from transformers import AutoModelForImageTextToText

    require(attn_implementation in ATTN_IMPLEMENTATIONS, "attn_implementation",
            f"{attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    device = resolve_device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir),
        quantization_config=quantization_config(quantization, compute_dtype),
        dtype=_torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        # device_map places quantized weights directly; .to() is refused on bnb models.
        device_map={"": device},
    )
    return model


def prepare_for_kbit_training(model, gradient_checkpointing: bool = True, *, fp32_residual: bool = True):
    """What training a (quantized) base model needs, without peft's fp32 upcast of the weights.

    peft's ``prepare_model_for_kbit_training`` casts every non-quantized weight (embeddings,
    norms, the vision tower) to fp32: on an H100 the guide's recipe peaks at ~40 GiB for one
    example (shared/reference/gpu-anchor.md; 27 GiB at batch 4 without it). Here the base stays
    frozen in its loaded dtype. What the upcast did buy, an fp32 residual stream, is kept with
    ``fp32_residual`` (see ``keep_residual_stream_fp32``). Also: no KV cache, and with gradient
    checkpointing, inputs that require grad so the checkpointed blocks of a fully frozen model
    still backpropagate into the adapters.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing: the reentrant kind drops grads when no input needs them.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if fp32_residual:
        keep_residual_stream_fp32(model)
    return model


def keep_residual_stream_fp32(model):
    """Run the language model's residual stream in fp32; the weights keep their dtype.

    The token embeddings' output is cast to fp32, so the image features merged into it, every
    residual sum and each Gemma RMSNorm's output (``type_as`` its input) are fp32; matmuls stay
    bf16 under autocast, and bitsandbytes casts each 4-bit layer's output back to its input's
    dtype, so peft adds a LoRA update to an fp32 value. In a bf16 stream an update smaller than
    half a bf16 step of that value (~0.004 at magnitude 1) is rounded away, which is what
    AdamW's first steps from a zero LoRA B are at lr 2e-4 (about 2/3 of the change survived on
    CPU). This is what peft's fp32 upcast of norms and embeddings gave the guide, without fp32
    weights. Returns the hook handle, or None when the embeddings are fp32 already.
    (With ``quantization: none`` the base linear's output is bf16 under autocast, so the LoRA
    sum itself stays bf16; only the residual stream is fp32 there.)
    """
    import torch

    embeddings = model.get_input_embeddings()
    if embeddings.weight.dtype == torch.float32:
        return None
    return embeddings.register_forward_hook(_output_in_fp32)


def _output_in_fp32(module, args, output):
    return output.float()


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


def free_model(*objects) -> None:
    """Release models and trainers completely: the search stage builds dozens in one process.

    A trainer holds its model, optimizer, scheduler and accelerator (which keeps its own lists
    of prepared objects), and its callbacks refer back to it; those cycles only die in a full
    ``gc.collect``. Parameter storage is released in place as well, so the memory comes back
    even while a caller still holds a reference to the module. Callers should ``del`` their own
    names afterwards.
    """
    import torch

    for obj in objects:
        if obj is None:
            continue
        accelerator = getattr(obj, "accelerator", None)
        if accelerator is not None:
            accelerator.free_memory()
        for attr in ("model", "model_wrapped", "optimizer", "lr_scheduler", "train_dataset",
                     "eval_dataset", "data_collator", "callback_handler", "processing_class"):
            if hasattr(obj, attr) and not isinstance(obj, torch.nn.Module):
                module = getattr(obj, attr)
                if isinstance(module, torch.nn.Module):
                    _release_storage(module)
                try:
                    setattr(obj, attr, None)
                except AttributeError:
                    pass
        if isinstance(obj, torch.nn.Module):
            _release_storage(obj)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release_storage(module) -> None:
    import torch

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype, device="cpu")
            tensor.grad = None
