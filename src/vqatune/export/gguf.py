"""The merged model as two GGUF files for llama.cpp (and an Ollama Modelfile beside them).

``<name>.gguf`` holds the language model (architecture ``gemma3``), ``mmproj-<name>.gguf`` the
vision tower and projector (``clip``, projector type ``gemma3``). Both come from llama.cpp's own
converter (``converter.py``). Each file is then read back: architecture, projector type and
tensor count are checked, and the text model is loaded through transformers (``gguf_file=``) to
compare its logits with the merged model's on the same tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Literal, Optional

from ..config import require
from ..faults import staging_fault_point
from ..outputs import fresh_staging, replace_dir
from .convert_hooks import wraps_media_marker
from .converter import convert
from .merge import ORIGINAL_PREFIXES, PROBE_QUESTION, layout_problems, tensor_names

log = logging.getLogger(__name__)

TEXT_ARCH, MMPROJ_ARCH, PROJECTOR_TYPE = "gemma3", "clip", "gemma3"
# Turn markers llama.cpp must read as single special tokens, not spell out letter by letter.
CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")
SPECIAL_TYPES = ("CONTROL", "USER_DEFINED")
# llama.cpp runs Gemma 3 with 5 sliding-window layers to 1 global one, whatever config.json
# says, unless the GGUF carries a per-layer pattern (the converter writes none; convert_hooks.py
# writes one where layer_types differ).
LLAMA_CPP_SWA_PATTERN = 6


class ExportError(RuntimeError):
    """An exported file is missing or not what llama.cpp expects; one actionable line."""


@dataclasses.dataclass
class ExportConfig:
    """`export:` — the GGUF files for llama.cpp and the Ollama Modelfile."""

    # File stem and Ollama model name: <name>.gguf, mmproj-<name>.gguf, `ollama create <name>`.
    name: str = "medgemma-kvasir"
    # Text model weights (MedGemma: 7.8 GB in f16, half in q8_0). Max logit error measured on
    # the tiny model: f16 0.1%, bf16 0.8%, q8_0 2.7% of the largest logit; f32 for checking.
    # Smaller (Q4_K_M) needs llama.cpp's compiled quantizer, or `ollama create --quantize q4_K_M`.
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    # The vision tower and projector stay 16-bit: quantizing them costs accuracy, saves 0.4 GB.
    mmproj_outtype: Literal["f32", "f16", "bf16"] = "f16"
    # Load the text GGUF back through transformers and compare logits with the merged model's
    # (MedGemma on CPU: ~35 GB of RAM, a minute); stop when they differ by more than
    # verify_rtol of the largest logit.
    verify: bool = True
    verify_rtol: float = 0.05
    # The Ollama release the Modelfiles are written for (README, "Export to llama.cpp and Ollama").
    ollama_version: str = "0.6.2"
    # Test rows asked of the GGUF pair through llama.cpp (llama-cpp-python, where importable:
    # $VQATUNE_LLAMA_CPP_PYTHON) and compared with the evaluate stage's predictions for the tuned
    # model in the trained prompt mode: gguf_agreement in metrics/export.json. A fixed sample
    # spread over the question categories; 0 = not measured.
    agreement_rows: int = 48

    def validate(self, p: str) -> None:
        require(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", self.name) is not None, f"{p}.name",
                "must be 1-64 lower-case letters, digits, '.', '_' or '-' (a file and Ollama name)")
        require(self.verify_rtol > 0, f"{p}.verify_rtol", "must be a positive number")
        require(self.agreement_rows >= 0, f"{p}.agreement_rows", "must be 0 (off) or a number of rows")


def gguf_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / f"{name}.gguf", out_dir / f"mmproj-{name}.gguf"


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: str | Path) -> dict:
    """What a GGUF file says it is: architecture, type, projector, tensor count, size."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {
        "architecture": _field(reader, "general.architecture"),
        "type": _field(reader, "general.type"),
        "projector_type": _field(reader, "clip.projector_type"),
        "tensors": len(reader.tensors),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
        "bytes": Path(path).stat().st_size,
    }


def marker_token_types(text_path: str | Path, markers=CHAT_MARKERS) -> dict[str, Optional[str]]:
    """The GGUF token type of each chat marker (None when it is not in the vocabulary)."""
    import gguf

    reader = gguf.GGUFReader(str(text_path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    index = {token: i for i, token in enumerate(tokens) if token in markers}
    return {m: gguf.TokenType(types[index[m]]).name if m in index else None for m in markers}


def expected_tensor_counts(model_dir: str | Path) -> tuple[int, int]:
    """(text, mmproj) tensor counts: the converter maps each checkpoint tensor to one GGUF
    tensor; the tied output head is not stored (llama.cpp reuses token_embd)."""
    names = [n for n in tensor_names(model_dir) if "lm_head" not in n]
    text = sum(n.startswith("language_model.") for n in names)
    return text, len(names) - text


def check_gguf_pair(model_dir: str | Path, text_path: Path, mmproj_path: Path) -> tuple[dict, dict]:
    """Read both files back; raise ExportError unless they are what llama.cpp will load."""
    text, mmproj = inspect_gguf(text_path), inspect_gguf(mmproj_path)
    n_text, n_mmproj = expected_tensor_counts(model_dir)
    checks = [
        (text["architecture"] == TEXT_ARCH, f"{text_path.name}: architecture {text['architecture']!r}, "
                                            f"expected {TEXT_ARCH!r}"),
        (text["tensors"] == n_text, f"{text_path.name}: {text['tensors']} tensors, the checkpoint's "
                                    f"language model has {n_text}"),
        (text["has_chat_template"], f"{text_path.name}: no tokenizer.chat_template; save the "
                                    "processor with the merged model"),
        (mmproj["architecture"] == MMPROJ_ARCH and mmproj["type"] == "mmproj",
         f"{mmproj_path.name}: architecture {mmproj['architecture']!r} type {mmproj['type']!r}, "
         f"expected {MMPROJ_ARCH!r} mmproj"),
        (mmproj["projector_type"] == PROJECTOR_TYPE,
         f"{mmproj_path.name}: projector type {mmproj['projector_type']!r}, expected {PROJECTOR_TYPE!r}"),
        (mmproj["tensors"] == n_mmproj, f"{mmproj_path.name}: {mmproj['tensors']} tensors, the "
                                        f"checkpoint's vision tower and projector have {n_mmproj}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ExportError(message)
    for marker, kind in marker_token_types(text_path).items():
        if kind not in SPECIAL_TYPES:
            raise ExportError(f"{text_path.name}: {marker} is a {kind} token, so llama.cpp spells it out; "
                              "the merged tokenizer_config.json needs added_tokens_decoder (re-run merge)")
    return text, mmproj


def llama_cpp_layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention"
            for i in range(num_layers)]


def hparam_mismatches(text_path: str | Path, text_config) -> list[str]:
    """Where llama.cpp will run the text GGUF differently from the transformers config.

    The converter writes some hyperparameters and llama.cpp derives others (the layer pattern,
    the attention scale) from the architecture; each difference is one line.
    """
    import math

    import gguf

    reader = gguf.GGUFReader(str(text_path))
    arch = TEXT_ARCH
    rope = getattr(text_config, "rope_parameters", None) or {}
    full_rope = rope.get("full_attention", rope)
    sliding_rope = rope.get("sliding_attention", {})
    expected = {
        f"{arch}.block_count": text_config.num_hidden_layers,
        f"{arch}.embedding_length": text_config.hidden_size,
        f"{arch}.feed_forward_length": text_config.intermediate_size,
        f"{arch}.attention.head_count": text_config.num_attention_heads,
        f"{arch}.attention.head_count_kv": text_config.num_key_value_heads,
        f"{arch}.attention.key_length": text_config.head_dim,
        f"{arch}.attention.value_length": text_config.head_dim,
        f"{arch}.context_length": text_config.max_position_embeddings,
        f"{arch}.attention.sliding_window": text_config.sliding_window,
        f"{arch}.attention.layer_norm_rms_epsilon": text_config.rms_norm_eps,
        f"{arch}.rope.freq_base": full_rope.get("rope_theta"),
        f"{arch}.rope.freq_base_swa": sliding_rope.get("rope_theta"),
    }
    if full_rope.get("rope_type") == "linear":
        expected[f"{arch}.rope.scaling.factor"] = full_rope.get("factor")
    problems = []
    for key, want in expected.items():
        got = _field(reader, key)
        if want is None:
            continue
        if got is None or not math.isclose(float(got), float(want), rel_tol=1e-6):
            problems.append(f"{key} is {got}, config says {want}")
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    if layer_types:
        pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list):  # one bool per layer (convert_hooks.py writes it)
            runs = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        else:
            runs = llama_cpp_layer_types(len(layer_types))
        if runs != layer_types:
            problems.append(f"layer types: llama.cpp runs {runs}"
                            + ("" if isinstance(pattern, list) else " (Gemma 3's 5:1 pattern)")
                            + f", config says {layer_types}")
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and "<start_of_image>" in template and not wraps_media_marker(template):
        problems.append("chat template: llama.cpp's image lacks the blank lines the processor puts "
                        "around it (convert_hooks.py did not recognise the template)")
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B model).
    if text_config.num_hidden_layers != 62 and text_config.query_pre_attn_scalar != text_config.head_dim:
        problems.append(f"query_pre_attn_scalar is {text_config.query_pre_attn_scalar}; llama.cpp "
                        f"uses head_dim {text_config.head_dim}")
    return problems


def mmproj_mismatches(mmproj_path: str | Path, config, image_processor) -> list[str]:
    """Where llama.cpp's clip will see the vision tower differently from transformers: sizes,
    normalisation, and the pooling that sets the number of image tokens."""
    import math

    import gguf

    reader = gguf.GGUFReader(str(mmproj_path))
    vision = config.vision_config
    per_side = vision.image_size // vision.patch_size
    expected = {
        "clip.vision.image_size": vision.image_size,
        "clip.vision.patch_size": vision.patch_size,
        "clip.vision.embedding_length": vision.hidden_size,
        "clip.vision.feed_forward_length": vision.intermediate_size,
        "clip.vision.block_count": vision.num_hidden_layers,
        "clip.vision.attention.head_count": vision.num_attention_heads,
        "clip.vision.projection_dim": config.get_text_config().hidden_size,
        # llama.cpp pools Gemma 3's patch grid by 4 per side unless the file says otherwise.
        "clip.vision.projector.scale_factor": per_side // math.isqrt(config.mm_tokens_per_image),
    }
    problems = []
    for key, want in expected.items():
        got = _field(reader, key)
        if got is None and key == "clip.vision.projector.scale_factor":
            got = 4
        if got != want:
            problems.append(f"{key} is {got}, config says {want}")
    for key, want in (("clip.vision.image_mean", image_processor.image_mean),
                      ("clip.vision.image_std", image_processor.image_std)):
        got = _field(reader, key)
        if got is None or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, want)):
            problems.append(f"{key} is {got}, the processor says {list(want)}")
    return problems


def text_logit_difference(merged_dir: str | Path, text_path: str | Path) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the text GGUF loaded by transformers vs the
    merged model's language model, on the probe question's tokens.

    transformers 5.17 reads a gemma3 GGUF's weights faithfully but fills the hyperparameters it
    does not map (query_pre_attn_scalar, layer_types, rope scaling) with Gemma 3 27B defaults,
    so the merged model's own text config is passed in: this compares the weights, and
    ``hparam_mismatches`` compares the metadata.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    merged_dir, text_path = Path(merged_dir), Path(text_path)
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    config = copy.deepcopy(merged.config.get_text_config())
    with torch.inference_mode():
        want = merged(input_ids=ids).logits.float()
    del merged
    # The converter drops embedding rows past the tokenizer's vocabulary: compare the rows kept.
    import gguf

    n_vocab = len(gguf.GGUFReader(str(text_path)).fields["tokenizer.ggml.tokens"].data)
    config.vocab_size = n_vocab
    want = want[..., :n_vocab]
    from_gguf = AutoModelForCausalLM.from_pretrained(str(text_path.parent), gguf_file=text_path.name,
                                                     config=config, dtype=torch.float32)
    with torch.inference_mode():
        got = from_gguf(input_ids=ids).logits.float()
    return float((got - want).abs().max()), float(want.abs().max())


def export_gguf(merged_dir: str | Path, out_dir: str | Path, cfg: ExportConfig, system_prompt: str,
                *, converter: Optional[Path] = None) -> dict:
    """Convert ``merged_dir`` into ``out_dir`` (two GGUF files and the Modelfiles); returns the
    metrics. ``out_dir`` appears complete or not at all."""
    from transformers import AutoConfig

    from ..models.loading import load_processor
    from .ollama import write_modelfiles

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not (merged_dir / "config.json").is_file():
        raise ExportError(f"{merged_dir}/config.json not found; run the merge stage first")
    problems = layout_problems(merged_dir)
    if problems:
        raise ExportError(f"{merged_dir}: tensor {problems[0]!r} is not in the layout llama.cpp's "
                          f"converter reads ({', '.join(ORIGINAL_PREFIXES)}); re-run the merge stage")

    staging = fresh_staging(out_dir, f".{out_dir.name}.partial")
    text_path, mmproj_path = gguf_paths(staging, cfg.name)
    convert(merged_dir, text_path, cfg.outtype, converter=converter)
    staging_fault_point("export-text", staging)  # the fault tests: killed between the two files
    convert(merged_dir, mmproj_path, cfg.mmproj_outtype, mmproj=True, converter=converter)
    text, mmproj = check_gguf_pair(merged_dir, text_path, mmproj_path)
    write_modelfiles(staging, cfg.name, system_prompt, merged_dir=merged_dir,
                     ollama_version=cfg.ollama_version)

    metrics = {"outtype": cfg.outtype, "mmproj_outtype": cfg.mmproj_outtype,
               "text_tensors": text["tensors"], "text_bytes": text["bytes"],
               "mmproj_tensors": mmproj["tensors"], "mmproj_bytes": mmproj["bytes"]}
    config = AutoConfig.from_pretrained(str(merged_dir))
    image_processor = load_processor(merged_dir).image_processor
    mismatches = (hparam_mismatches(text_path, config.get_text_config())
                  + mmproj_mismatches(mmproj_path, config, image_processor))
    for line in mismatches:
        log.warning("llama.cpp will differ from transformers: %s", line)
    metrics["llama_cpp_mismatches"] = mismatches
    if cfg.verify:
        diff, scale = text_logit_difference(merged_dir, text_path)
        metrics.update(text_max_abs_logit_diff=diff, text_max_abs_logit=scale)
        log.info("text GGUF vs merged model: logits differ by at most %.3g (largest %.3g)", diff, scale)
        if diff > cfg.verify_rtol * scale:
            raise ExportError(f"{text_path.name}: logits differ from the merged model's by {diff:.3g} "
                              f"(largest {scale:.3g}, export.verify_rtol {cfg.verify_rtol})")

    replace_dir(staging, out_dir, "export")
    return metrics
