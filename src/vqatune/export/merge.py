"""Fuse the LoRA adapter into its base model and save a checkpoint llama.cpp's converter reads.

The base is reloaded unquantized (bf16/fp16/fp32), never in 4-bit: merging into a 4-bit model
loses precision (peft #2321) and the converter cannot map its ``absmax`` tensors (llama.cpp
#12923). Gemma 3 ties its output head to the input embeddings; the merged model keeps them tied
(an adapter that trained both apart, peft #2777, is refused rather than saved half-right).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Literal, Optional

from ..config import require
from ..outputs import fresh_staging, replace_dir

log = logging.getLogger(__name__)

MERGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
# The checkpoint layout of google/medgemma-4b-it, the one llama.cpp's convert_hf_to_gguf.py
# maps: anything else fails the mmproj conversion.
ORIGINAL_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                     "multi_modal_projector.")
# Files the processor and tokenizer need beside the weights; tokenizer.model is what gives the
# GGUF a SentencePiece vocabulary, and transformers 5 does not write it back on save.
TOKENIZER_FILES = ("tokenizer.model",)
PROBE_QUESTION = "Are there any abnormalities in the image?"


class MergeError(RuntimeError):
    """The merge cannot produce a faithful checkpoint; the message says what to change."""


@dataclasses.dataclass
class MergeConfig:
    """`merge:` — how the adapter is fused into the base model."""

    # The dtype the merged model is saved in (it is fused in float32); never a quantized one. auto:
    # the checkpoint's own dtype (MedGemma: bfloat16, 8.6 GB; the builtin tiny model: float32).
    # float32 doubles the files; the GGUF's outtype is chosen at export.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Merging is one small matmul per adapted layer: cpu needs no GPU, and RAM for the float32
    # copy (2x a bf16 model: ~25 GB peak for MedGemma-4B).
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Compare base+adapter logits with the merged model's on one probe (image + question) and
    # stop when they differ by more than verify_rtol of the largest logit. The merge is computed
    # and checked in float32 (a correct merge lands near 1e-6), then rounded to `dtype` to save.
    verify: bool = True
    verify_rtol: float = 0.05

    def validate(self, p: str) -> None:
        require(self.verify_rtol > 0, f"{p}.verify_rtol", "must be a positive number")


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a checkpoint was saved in (config.json), bfloat16 when it does not say."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for holder in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if holder.get(key) in MERGE_DTYPES[1:]:
                return holder[key]
    return "bfloat16"


def tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name in a folder's safetensors files, read from the headers only."""
    from safetensors import safe_open

    names = []
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            names.extend(fh.keys())
    return names


def layout_problems(model_dir: str | Path) -> list[str]:
    """Tensor names outside the layout llama.cpp's converter reads (empty when all are fine)."""
    return [name for name in tensor_names(model_dir) if not name.startswith(ORIGINAL_PREFIXES)]


def _check_dirs(base_dir: Path, adapter_dir: Path) -> None:
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir}/config.json not found; run the base_model stage or pass --base")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir}/adapter_config.json not found; run the train stage or "
                         "pass --adapter")
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    saved = set(adapter_cfg.get("modules_to_save") or [])
    if {"lm_head", "embed_tokens"} <= saved:
        raise MergeError(f"{adapter_dir}: the adapter trains lm_head and embed_tokens apart "
                         "(modules_to_save), which unties Gemma's shared embeddings (peft #2777); "
                         "retrain without them in modules_to_save")


def keep_embeddings_tied(model) -> bool:
    """Re-tie the output head to the input embeddings when the config ties them.

    Returns whether they are tied. A head that differs from the embeddings cannot be kept:
    Gemma 3 saves one matrix for both, and llama.cpp reads no separate output weight.
    """
    import torch

    text_config = model.config.get_text_config()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)
                or getattr(text_config, "tie_word_embeddings", False))
    if not tied:
        return False
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        if not torch.equal(embed, head):
            raise MergeError("after the merge lm_head differs from embed_tokens but the model "
                             "ties them; retrain without modules_to_save=[lm_head, embed_tokens]")
        model.tie_weights()
    return True


def probe_inputs(processor, image_size: Optional[int] = None):
    """One fixed question about one fixed image, tokenized as evaluation does."""
    import numpy as np
    from PIL import Image

    from ..prompts import PromptsConfig, build_messages

    size = image_size or processor.image_processor.size.get("height", 64)
    # A smooth colour gradient: deterministic, and it exercises every vision patch.
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)),
                       np.tile(ramp[:, None], (1, size))], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    messages = build_messages(PROBE_QUESTION, "none", PromptsConfig())
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The chat template already starts with <bos>.
    return processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)


def probe_logits(model, inputs):
    """The probe's logits (float32 on the CPU) from one forward pass in the model's own dtype."""
    import torch

    param = next(p for p in model.parameters() if p.is_floating_point())
    batch = {k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
             for k, v in inputs.items()}
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def write_added_tokens_decoder(tokenizer, out_dir: Path) -> None:
    """List the added tokens in tokenizer_config.json, as transformers 4 did.

    transformers 5 keeps them in tokenizer.json only; llama.cpp's converter reads them from
    ``added_tokens_decoder`` (or added_tokens.json). Without it ``<start_of_turn>`` and friends
    become normal pieces of the SentencePiece vocabulary and llama.cpp spells them out letter by
    letter, so the chat template no longer marks turns.
    """
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = {
        str(token_id): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                        "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _copy_tokenizer_files(base_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(base_dir / name, out_dir / name)


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  cfg: MergeConfig, *, trust_remote_code: bool = False) -> dict:
    """Write ``base + adapter`` fused into ``out_dir`` (weights, processor, tokenizer); returns
    the metrics (dtype, parameter count, tied, probe logit difference).

    ``out_dir`` appears complete or not at all: everything is written to a sibling first.
    """
    import torch
    from peft import PeftModel

    from ..models.loading import load_base_model, load_processor, resolve_device
    from ..models.metadata import copy_training_metadata
    from ..models.tiny import save_model_in_original_layout

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _check_dirs(base_dir, adapter_dir)
    dtype = checkpoint_dtype(base_dir) if cfg.dtype == "auto" else cfg.dtype
    device = resolve_device(None if cfg.device == "auto" else cfg.device)

    # Model: the base unquantized, the adapter on top, then fused, all in float32, and only then
    # rounded to the checkpoint's dtype. Checked after rounding instead, a correct bf16 merge of a
    # random-weight MedGemma-4B missed the check by 10% of the largest logit (0.83 of 8.5): each
    # fused weight's rounding is small, but 34 random layers amplify it (docs/medgemma.md). The
    # float32 copy costs 2x a bf16 model's memory on merge.device (17 GB for MedGemma-4B).
    log.info("merging %s into %s (float32 on %s, saved as %s)", adapter_dir, base_dir, device, dtype)
    model = load_base_model(base_dir, quantization="none", dtype="float32", device=device,
                            trust_remote_code=trust_remote_code)
    processor = load_processor(base_dir, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    probe = probe_inputs(processor) if cfg.verify else None
    before = probe_logits(model, probe) if cfg.verify else None
    model = model.merge_and_unload()
    tied = keep_embeddings_tied(model)

    metrics = {"dtype": dtype, "device": device, "tied_embeddings": tied,
               "parameters": sum(p.numel() for p in model.parameters())}
    if cfg.verify:
        after = probe_logits(model, probe)
        diff = float((after - before).abs().max())
        scale = float(before.abs().max())
        metrics.update(probe_max_abs_logit_diff=diff, probe_max_abs_logit=scale)
        if diff > cfg.verify_rtol * scale:
            raise MergeError(f"merged logits differ from base+adapter by {diff:.3g} (largest logit "
                             f"{scale:.3g}, merge.verify_rtol {cfg.verify_rtol}): the adapter does not "
                             f"fit {base_dir}; was it trained on this base?")
        log.info("probe: merged vs base+adapter logits differ by at most %.3g (largest %.3g)",
                 diff, scale)

    model.to(getattr(torch, dtype))  # after the check: the rounding is the file format's, not the merge's

    # Save: weights in the original layout, processor and tokenizer beside them.
    staging = fresh_staging(out_dir, f".{out_dir.name}.partial")
    save_model_in_original_layout(model, staging)
    processor.save_pretrained(staging)
    write_added_tokens_decoder(processor.tokenizer, staging)
    _copy_tokenizer_files(base_dir, staging)
    copy_training_metadata(adapter_dir, staging)   # the trained prompt mode, for ask and export
    problems = layout_problems(staging)
    if problems:
        raise MergeError(f"merged tensor {problems[0]!r} (and {len(problems) - 1} more) is not in the "
                         f"layout llama.cpp's converter reads ({', '.join(ORIGINAL_PREFIXES)})")
    replace_dir(staging, out_dir, "merge")
    metrics["tensors"] = len(tensor_names(out_dir))
    return metrics
