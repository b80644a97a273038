"""The builtin stand-in for MedGemma-4b-it: a tiny random Gemma 3 that runs on a CPU.

Same classes (``Gemma3ForConditionalGeneration``, ``Gemma3Processor``), the same chat
template and special tokens as ``google/medgemma-4b-it``, and a SentencePiece tokenizer
trained here, so every later stage loads it through the Auto classes exactly as it loads the
real model. Only the sizes differ. The vision keys are saved in the original checkpoint
layout (``vision_tower.vision_model.*``) and SigLIP has no pooling head, as in MedGemma.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..config import ModelConfig
from ..data.kvasir import ANSWER_VOCAB, QUESTIONS
from ..prompts import DEFAULT_PROMPTS

# Gemma's specials in Gemma's order where the real vocabulary fixes one (pad 0, eos 1, bos 2,
# unk 3); the turn and image markers follow; <image_soft_token> comes last, as in the real one.
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
USER_SYMBOLS = [MASK, START_OF_TURN, END_OF_TURN, BOI, EOI, "\n", "\n\n"]

# google/gemma-3-4b-it and google/medgemma-4b-it tokenizer_config.json, verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# Mirrors google/medgemma-4b-it's tokenizer_config.json: Gemma3Processor reads these names.
EXTRA_SPECIAL_TOKENS = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN}


def _tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: every question, answer and prompt we use."""
    lines = list(QUESTIONS)
    for vocab in ANSWER_VOCAB.values():
        lines.extend(vocab)
    lines.append(DEFAULT_PROMPTS["static"])
    for cat in DEFAULT_PROMPTS["categories"].values():
        lines.append(cat["prompt"])
        lines.extend(cat["keywords"])
    lines.extend([
        "The quick brown fox jumps over the lazy dog.",
        "yes no none not relevant 0 1 2 3 4 5 6 7 8 9 10 16 20 mm ; , . ? ! - < > ( ) \" '",
        "colonoscopy gastroscopy capsule endoscopy polyp ulcerative colitis oesophagitis",
    ])
    # Repeat so SentencePiece sees enough sentences to fill the vocabulary.
    return [line for line in lines for _ in range(4)]


def train_tokenizer(out_dir: Path, vocab_size: int, seed: int) -> Path:
    """Train a byte-fallback BPE SentencePiece model like Gemma's; returns tokenizer.model."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_tokenizer_corpus()) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size - 1,  # <image_soft_token> is appended last, as in Gemma
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
            user_defined_symbols=USER_SYMBOLS + [IMAGE_TOKEN],
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
        # The model proto records the temporary training paths; clear them so that the same
        # seed gives byte-identical files (DVC hashes them).
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((Path(tmp) / "tokenizer.model").read_bytes())
        del proto.trainer_spec.input[:]
        proto.trainer_spec.model_prefix = ""
        target = out_dir / "tokenizer.model"
        target.write_bytes(proto.SerializeToString())
    return target


def gemma_tokenizer(folder: str | Path):
    """The transformers tokenizer of ``folder/tokenizer.model`` (a Gemma-style SentencePiece model),
    with MedGemma's chat template and special-token names, left padding; pad/eos/bos/unk checked
    to be Gemma's ids 0-3."""
    from transformers import GemmaTokenizer

    tokenizer = GemmaTokenizer.from_pretrained(
        str(folder),
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
    )
    for want, tok in enumerate((PAD, EOS, BOS, UNK)):
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != want:
            raise RuntimeError(f"tokenizer in {folder}: {tok} has id {got}, Gemma's is {want}")
    return tokenizer


def finish_tokenizer_files(out_dir: Path, sp_model: Path) -> None:
    """After ``save_pretrained``: tokenizer.model beside the weights (transformers 5 does not write
    it back; llama.cpp's converter reads it), and no absolute path in tokenizer_config.json
    (transformers records where it read tokenizer.model; two builds would differ)."""
    if not (out_dir / "tokenizer.model").exists():
        shutil.copy(sp_model, out_dir / "tokenizer.model")
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.pop("vocab_file", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def build_tiny_gemma3(out_dir: str | Path, cfg: ModelConfig | None = None) -> Path:
    """Write a loadable tiny Gemma 3 model folder (weights, processor, tokenizer) to ``out_dir``."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    cfg = cfg or ModelConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # Tokenizer: SentencePiece model converted by transformers, as the hub checkpoints are.
    sp_model = train_tokenizer(out_dir, cfg.tiny_vocab_size, cfg.seed)
    tokenizer = gemma_tokenizer(out_dir)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in [PAD, EOS, BOS, UNK, BOI, EOI, IMAGE_TOKEN]}
    vocab_size = len(tokenizer)

    # Shapes: MedGemma's layout in miniature. Patches of 8 px pooled 2x2 into image tokens:
    # 64 px -> 8x8 patches -> 16 tokens; 96 px -> 12x12 -> 36 tokens, a 6x6 grid whose 2x2 blocks
    # are the 3x3 cells the location answers name (MedGemma: 896 px / 14 = 64x64, pooled 4x4 -> 256).
    image_size = cfg.tiny_image_size
    patch = 8
    tokens_per_side = image_size // (2 * patch)
    hidden = cfg.tiny_hidden_size
    config = Gemma3Config(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            query_pre_attn_scalar=hidden // 4,
            sliding_window=128,
            layer_types=["sliding_attention"] * (cfg.tiny_layers - 1) + ["full_attention"],
            max_position_embeddings=2048,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            pad_token_id=ids[PAD], eos_token_id=ids[EOS], bos_token_id=ids[BOS],
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            image_size=image_size,
            patch_size=patch,
            hidden_size=cfg.tiny_vision_hidden_size,
            intermediate_size=cfg.tiny_vision_hidden_size * 4,
            num_hidden_layers=cfg.tiny_vision_layers,
            num_attention_heads=2,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens_per_side ** 2,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE_TOKEN],
        tie_word_embeddings=True,
    )
    config.text_config.eos_token_id = [ids[EOS], tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the projector at zero (a pretrained checkpoint overwrites it). A random
    # model kept so would see every image as the same zero vector: nothing to read, nothing for
    # the fine-tuning to learn from the pixels. A random projector scaled so its outputs are about
    # as large as the (sqrt(hidden)-scaled) word embeddings lets the images reach the LM at once.
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, 1.0 / proj.shape[0] ** 0.5)
    vision_report = {"pretrained": False}
    if cfg.tiny_vision_tower == "bundled":  # every tower weight comes from the file (no fold needed)
        from .tiny_vision import BUNDLED, load_tower

        vision_report = {"pretrained": True, "bundled": BUNDLED.name, **load_tower(model, BUNDLED)}
    else:
        fold_world_contrast(model, image_size, cfg.seed)
    if cfg.tiny_vision_tower == "pretrain" and cfg.tiny_vision_pretraining_scenes:
        from .tiny_vision import PretrainConfig, pretrain_vision_tower

        scores = pretrain_vision_tower(model, image_size, PretrainConfig(
            scenes=cfg.tiny_vision_pretraining_scenes, epochs=cfg.tiny_vision_pretraining_epochs,
            seed=cfg.seed))
        vision_report = {"pretrained": True, "scenes": cfg.tiny_vision_pretraining_scenes,
                         "epochs": cfg.tiny_vision_pretraining_epochs, "held_out_accuracy": scores}
    model.generation_config.eos_token_id = [ids[EOS], tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.do_sample = False

    # The PIL backend: torchvision (the fast backend) has no build for the pinned CPU torch.
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=config.mm_tokens_per_image,
    )

    save_model_in_original_layout(model, out_dir)
    processor.save_pretrained(out_dir)
    finish_tokenizer_files(out_dir, sp_model)
    (out_dir / "vqatune_builtin.json").write_text(
        json.dumps({"model_id": cfg.id, "seed": cfg.seed, "vocab_size": vocab_size,
                    "image_size": image_size, "vision_tower": vision_report}, indent=2) + "\n")
    return out_dir


def world_pixel_stats(image_size: int, seed: int, n_scenes: int = 96) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (0..1 pixels) of the synthetic world's scenes at
    ``image_size``: drawn with the generator the prepare stage uses, so they follow the world."""
    import random

    import numpy as np
    from PIL import Image

    from ..data.synthetic import SOURCE_WEIGHTS, make_scene

    rng = random.Random(seed)
    sources, weights = list(SOURCE_WEIGHTS), list(SOURCE_WEIGHTS.values())
    pixels = []
    for _ in range(n_scenes):
        img = make_scene(rng.choices(sources, weights=weights)[0], rng)[0]
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels.append(np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0)
    pixels = np.concatenate(pixels)
    return pixels.mean(0).tolist(), pixels.std(0).tolist()


def fold_world_contrast(model, image_size: int, seed: int) -> None:
    """Fold the synthetic world's pixel statistics into the random patch embedding.

    The processor keeps MedGemma's normalisation, (p - 0.5) / 0.5. The synthetic mucosa is one
    pinkish tone, so under that normalisation every patch is nearly the same vector: measured on
    the random tower, 2% of an image token's direction depended on the picture (the rest was the
    shared mucosa colour and the position), and the fine-tuned model learned only whole-image
    properties (source, procedure), never a box, a polyp count or a size. A pretrained tower has
    learned to see contrast; a random one is given it here: the convolution computes what it
    would on (p - mean) / std of the world's own pixels (57% of the direction then depends on
    the picture). Exact algebra on the weights, so the processor and every later stage are
    unchanged: with x = (p - 0.5) / 0.5, (p - mean) / std = x * 0.5 / std + (0.5 - mean) / std.
    """
    import torch

    mean, std = world_pixel_stats(image_size, seed)
    vision = model.model.vision_tower
    conv = getattr(vision, "vision_model", vision).embeddings.patch_embedding
    mean_t = torch.tensor(mean, dtype=conv.weight.dtype)
    std_t = torch.tensor(std, dtype=conv.weight.dtype)
    with torch.no_grad():
        shift = ((0.5 - mean_t) / std_t).view(1, 3, 1, 1)
        conv.bias += (conv.weight * shift).sum(dim=(1, 2, 3))
        conv.weight *= (0.5 / std_t).view(1, 3, 1, 1)


# transformers 5 saves Gemma 3 with its runtime names; llama.cpp's converter (and
# google/medgemma-4b-it itself) use the original checkpoint layout. Both load in transformers.
# transformers 5.17 already writes `language_model.model.*` but `vision_tower.embeddings.*`
# (no `vision_model.`), on which llama.cpp's mmproj conversion fails.
_ORIGINAL_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
]


def original_layout_key(key: str) -> str:
    for new, old in _ORIGINAL_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def save_model_in_original_layout(model, out_dir: str | Path) -> None:
    """``save_pretrained`` then rename tensors to the layout llama.cpp's converter reads."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for shard in sorted(out_dir.glob("model*.safetensors")):
        tensors = load_file(str(shard))
        renamed = {original_layout_key(k): v.contiguous() for k, v in tensors.items()}
        save_file(renamed, str(shard), metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {original_layout_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
