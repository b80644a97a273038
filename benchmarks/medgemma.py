"""The benchmark's world: a random-weight MedGemma-4B folder and its FLOP model.

No hub: the architecture comes from ``benchmarks/medgemma4b_config.json`` (every size written
out), the weights are random, and the tokenizer is built here with MedGemma's shape: 262,145
SentencePiece pieces (the model's embedding has 262,208 rows), its special-token ids and chat
template. Its real pieces come from the builtin tiny model's small trained SentencePiece model;
the rest of the ids are filler (``<unusedN>``), as in Gemma's own vocabulary. llama.cpp's
converter takes it (the export stage), and the sequence shape is MedGemma's: 256 image tokens per
896 px image.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

CONFIG = Path(__file__).with_name("medgemma4b_config.json")

# google/medgemma-4b-it's tokenizer: the ids its config and chat template use. The pieces from pad
# to <mask> open the vocabulary, the turn markers follow Gemma's <unused0..98>, the image markers
# sit at the end of the text vocabulary and <image_soft_token> is the last piece.
TOKEN_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
             "<start_of_turn>": 105, "<end_of_turn>": 106,
             "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}
TOKENIZER_PIECES = 262_145   # ids 0..262144; the embedding's 262,208 rows are padded past them
FIRST_TEXT_ID = 107          # Gemma's text pieces start after <end_of_turn> ("\n" is 107 there too)

# H100 SXM and H200: 989.4 TFLOP/s dense bf16 (vendor datasheet). The matmul ceiling measured on
# these machines is ~780 TFLOP/s (KINDS.md); MFU here is against the datasheet figure.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


def load_config(path: Path = CONFIG, token_ids: dict | None = None, raw: dict | None = None):
    """Gemma3Config from the written-out JSON (or its ``raw`` dict); ``token_ids`` remaps the
    special-token ids."""
    import copy

    from transformers import Gemma3Config

    raw = copy.deepcopy(raw) if raw is not None else json.loads(Path(path).read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if token_ids:
        raw.update({k: token_ids[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index")})
        raw["text_config"]["eos_token_id"] = token_ids["eos_token_id"]
    return Gemma3Config(**raw)


def medgemma_sentencepiece(out_dir: Path, seed: int = 0) -> Path:
    """Write ``out_dir/tokenizer.model``: MedGemma's vocabulary size and special-token ids.

    The builtin tiny model's trained SentencePiece model (byte fallback, ~1k pieces) gives the real
    pieces; its specials move to MedGemma's ids, its other pieces fill ids from 107 on in their
    order, and every id left over is an ``<unusedN>`` filler of type UNUSED (never produced by
    encoding, typed UNUSED in the GGUF) so the proto stays a valid SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from vqatune.models.tiny import train_tokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        small = pb.ModelProto()
        small.ParseFromString(train_tokenizer(Path(tmp), 1024, seed).read_bytes())
    slots: list = [None] * TOKENIZER_PIECES
    text_id = FIRST_TEXT_ID
    for piece in small.pieces:
        if piece.piece in TOKEN_IDS:
            slots[TOKEN_IDS[piece.piece]] = piece
            continue
        while slots[text_id] is not None or text_id in TOKEN_IDS.values():
            text_id += 1
        slots[text_id] = piece
        text_id += 1
    missing = [tok for tok, i in TOKEN_IDS.items() if slots[i] is None]
    if missing:
        raise RuntimeError(f"the tiny tokenizer has no {missing}")
    proto = pb.ModelProto()
    proto.CopyFrom(small)
    del proto.pieces[:]
    unused = 0
    for piece in slots:
        if piece is None:
            proto.pieces.add(piece=f"<unused{unused}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
            unused += 1
        else:
            proto.pieces.append(piece)
    proto.trainer_spec.vocab_size = TOKENIZER_PIECES
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "tokenizer.model"
    target.write_bytes(proto.SerializeToString())
    return target


def build_processor(out_dir: Path, image_size: int, image_tokens: int, seed: int = 0):
    """A Gemma3Processor with MedGemma's tokenizer shape (``medgemma_sentencepiece``) and image
    geometry, saved in ``out_dir`` with its tokenizer.model."""
    from transformers import Gemma3Processor

    from vqatune.models.tiny import CHAT_TEMPLATE, finish_tokenizer_files, gemma_tokenizer

    out_dir = Path(out_dir)
    sp_model = medgemma_sentencepiece(out_dir, seed)
    tokenizer = gemma_tokenizer(out_dir)
    wrong = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, want in TOKEN_IDS.items()
             if tokenizer.convert_tokens_to_ids(tok) != want}
    if wrong or len(tokenizer) != TOKENIZER_PIECES:
        raise RuntimeError(f"MedGemma tokenizer: ids {wrong}, {len(tokenizer)} entries")
    try:  # the torchvision backend where torchvision exists (the GPU machine), else PIL
        from transformers import Gemma3ImageProcessor as ImageProcessor
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size},
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                     do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE, image_seq_length=image_tokens)
    processor.save_pretrained(out_dir)
    finish_tokenizer_files(out_dir, sp_model)
    return processor


def small_config(path: Path = CONFIG) -> dict:
    """MedGemma-4B's config with tiny sizes (the CPU smoke path): the real vocabulary, token ids,
    patch size, 4x4 pooling and 5:1 sliding/global layer pattern; 224 px images (16 tokens)."""
    raw = json.loads(Path(path).read_text())
    raw["_comment"] = "medgemma4b_config.json with tiny sizes (benchmarks/medgemma.py small_config)"
    raw["mm_tokens_per_image"] = 16
    raw["text_config"].update(hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=16, max_position_embeddings=4096,
                              sliding_window=128, layer_types=["sliding_attention"] * 5 + ["full_attention"])
    raw["vision_config"].update(image_size=224, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    return raw


def build_random_medgemma(out_dir: str | Path, *, tiny: bool = False, seed: int = 0,
                          config_path: Path = CONFIG, config: dict | None = None) -> Path:
    """Write a loadable model folder: MedGemma-4B shapes with random bf16 weights (GPU), or the
    builtin tiny model (``tiny=True``, the CPU smoke path). ``config``: the raw config to use
    instead of ``config_path``'s (e.g. ``small_config()``: MedGemma's tokenizer, tiny sizes).

    The weights are saved in google/medgemma-4b-it's own checkpoint layout
    (``language_model.model.*``, ``vision_tower.vision_model.*``), as the hub serves them.
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from vqatune.models.tiny import save_model_in_original_layout

    out_dir = Path(out_dir)
    if tiny:
        from vqatune.config import ModelConfig
        from vqatune.models.tiny import build_tiny_gemma3

        return build_tiny_gemma3(out_dir, ModelConfig(seed=seed))
    raw = config if config is not None else json.loads(Path(config_path).read_text())
    processor = build_processor(out_dir, raw["vision_config"]["image_size"], raw["mm_tokens_per_image"], seed)
    tok = processor.tokenizer
    ids = {"boi_token_index": tok.convert_tokens_to_ids("<start_of_image>"),
           "eoi_token_index": tok.convert_tokens_to_ids("<end_of_image>"),
           "image_token_index": tok.convert_tokens_to_ids("<image_soft_token>"),
           "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]}
    config = load_config(token_ids=ids, raw=raw)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on CPU
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.do_sample = False
    save_model_in_original_layout(model, out_dir)
    (out_dir / "vqatune_benchmark.json").write_text(json.dumps(
        {"config": Path(config_path).name if config is None else "small_config()",
         "seed": seed, "weights": "random", "tokenizer_pieces": len(tok), **ids}, indent=2) + "\n")
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
