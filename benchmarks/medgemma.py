"""The benchmark's world: a random-weight MedGemma-4B folder and its FLOP model.

No hub: the architecture comes from ``benchmarks/medgemma4b_config.json`` (every size written
out), the weights are random, and the tokenizer is the builtin stand-in's (vocabulary ~1k, ids
mapped into the real model's 262,208-row embedding). Token ids do not change FLOPs or memory;
the sequence shape does, and it is MedGemma's: 256 image tokens per 896 px image.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

CONFIG = Path(__file__).with_name("medgemma4b_config.json")

# H100 SXM and H200: 989.4 TFLOP/s dense bf16 (vendor datasheet). The matmul ceiling measured on
# these machines is ~780 TFLOP/s (KINDS.md); MFU here is against the datasheet figure.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


def load_config(path: Path = CONFIG, token_ids: dict | None = None):
    """Gemma3Config from the written-out JSON; ``token_ids`` remaps the special-token ids."""
    from transformers import Gemma3Config

    raw = json.loads(Path(path).read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if token_ids:
        raw.update({k: token_ids[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index")})
        raw["text_config"]["eos_token_id"] = token_ids["eos_token_id"]
    return Gemma3Config(**raw)


def build_processor(out_dir: Path, image_size: int, image_tokens: int):
    """A Gemma3Processor with the stand-in tokenizer and MedGemma's image geometry."""
    from transformers import AutoProcessor, Gemma3Processor

    from vqatune.config import ModelConfig
    from vqatune.models.tiny import CHAT_TEMPLATE, build_tiny_gemma3

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_gemma3(tmp, ModelConfig())
        tiny = AutoProcessor.from_pretrained(tmp)
    try:  # the torchvision backend where torchvision exists (the GPU machine), else PIL
        from transformers import Gemma3ImageProcessor as ImageProcessor
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size},
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                     do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tiny.tokenizer,
                                chat_template=CHAT_TEMPLATE, image_seq_length=image_tokens)
    processor.save_pretrained(out_dir)
    return processor


def build_random_medgemma(out_dir: str | Path, *, tiny: bool = False, seed: int = 0,
                          config_path: Path = CONFIG) -> Path:
    """Write a loadable model folder: MedGemma-4B shapes with random bf16 weights (GPU), or the
    builtin tiny model (``tiny=True``, the CPU smoke path)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    out_dir = Path(out_dir)
    if tiny:
        from vqatune.config import ModelConfig
        from vqatune.models.tiny import build_tiny_gemma3

        return build_tiny_gemma3(out_dir, ModelConfig(seed=seed))
    raw = json.loads(Path(config_path).read_text())
    processor = build_processor(out_dir, raw["vision_config"]["image_size"], raw["mm_tokens_per_image"])
    tok = processor.tokenizer
    ids = {"boi_token_index": tok.convert_tokens_to_ids("<start_of_image>"),
           "eoi_token_index": tok.convert_tokens_to_ids("<end_of_image>"),
           "image_token_index": tok.convert_tokens_to_ids("<image_soft_token>"),
           "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]}
    config = load_config(config_path, ids)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on CPU
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "vqatune_benchmark.json").write_text(json.dumps(
        {"config": str(config_path.name), "seed": seed, "weights": "random", **ids}, indent=2) + "\n")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


# --------------------------------------------------------------------------- FLOP model

def flop_model(config) -> dict:
    """FLOPs per image (vision forward) and per token (language-model forward) from the shapes.

    Matmuls count 2 FLOPs per multiply-add; norms, activations, softmax and RoPE are left out.
    Attention scores+values cost 4 * heads * head_dim FLOPs per (query, key) pair.
    """
    t, v = config.text_config, config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    vis_linear = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    vision = 2 * patches * (vis_linear + 3 * v.patch_size ** 2 * v.hidden_size) \
        + v.num_hidden_layers * 4 * patches * patches * v.hidden_size
    projector = 2 * config.mm_tokens_per_image * v.hidden_size * t.hidden_size
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return {
        "vision_per_image": vision + projector,
        "lm_linear_per_token": 2 * t.num_hidden_layers * per_layer,
        "lm_head_per_token": 2 * t.hidden_size * t.vocab_size,
        "attention_per_pair": 4 * t.num_hidden_layers * q,
    }


def lm_forward_flops(fm: dict, tokens: int, logits_tokens: int, mean_context: float) -> float:
    return tokens * (fm["lm_linear_per_token"] + fm["attention_per_pair"] * mean_context) \
        + logits_tokens * fm["lm_head_per_token"]
