"""Loading models, shared by training, search, evaluation, ask and export: the base model from its
folder (optionally quantized), the base with a trained adapter on top, and freeing them again.

Every loader takes the model *folder* (``models/base``): the base_model stage has already put the
builtin tiny model or the hub checkpoint there.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Optional

from ..config import InputError, require, restore_hint
from ..cpu_numerics import use_portable_4bit_path, use_portable_quantization

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def resolve_device(device: Optional[str] = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str):
    import torch

    require(name in DTYPES, "dtype", f"{name!r} is not one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def check_safetensors(path: Path) -> None:
    """The header parses and the tensors it lists end exactly at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(fh.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        raise ValueError(f"tensors end at byte {8 + n + max(ends, default=0)}, the file at {size}")


def check_model_folder(folder: str | Path, config_file: str = "config.json") -> None:
    """A cheap look before loading: ``config_file`` is a JSON object and every safetensors file
    is whole (header parsed, tensors ending at the end of the file). InputError, one line naming
    the file, if not: transformers and peft would raise a traceback, or load a truncated tensor."""
    folder = Path(folder)
    config = folder / config_file
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise InputError(f"{config} not found; {restore_hint(folder)}") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{config} is damaged ({err}); {restore_hint(folder)}") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise InputError(f"{folder} holds no weights (*.safetensors); {restore_hint(folder)}")
    for file in weights:
        try:
            check_safetensors(file)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise InputError(f"{file} is damaged ({err}); {restore_hint(folder)}") from None


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
    check_model_folder(model_dir)
    device = resolve_device(device)
    if quantization == "4bit" and str(device).startswith("cpu"):
        # The nf4 absmax quantized by the same rule on every CPU (see cpu_numerics).
        use_portable_quantization()
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir),
        quantization_config=quantization_config(quantization, compute_dtype),
        dtype=_torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        # device_map places quantized weights directly; .to() is refused on bnb models.
        device_map={"": device},
    )
    # The same 4-bit arithmetic on every CPU (see cpu_numerics): never bitsandbytes' packed path.
    use_portable_4bit_path(model)
    return model


def load_tuned_model(base_dir: str | Path, adapter_dir: str | Path, *, trust_remote_code: bool = False,
                     **base_kwargs):
    """(model, processor): the base model from ``base_dir`` (``load_base_model``'s ``base_kwargs``)
    with the adapter of ``adapter_dir`` attached (a peft ``PeftModel``, not trainable) in the base's
    compute dtype (``precision.adapters_in_compute_dtype``), in eval mode. Evaluation and
    ``vqatune ask`` both load this way, so an answer there is computed as evaluation computed it.
    """
    from peft import PeftModel

    from .precision import adapters_in_compute_dtype

    check_model_folder(adapter_dir, "adapter_config.json")
    base = load_base_model(base_dir, trust_remote_code=trust_remote_code, **base_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    adapters_in_compute_dtype(model)
    model.eval()
    processor = load_processor(base_dir, trust_remote_code=trust_remote_code)
    return model, processor


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
