"""The merge stage: fused weights give the same logits as base + adapter, saved in the layout
llama.cpp's converter reads, with tied embeddings, processor and tokenizer.model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest_adapters import make_perturbed_adapter
from conftest_stages import load_stage
from vqatune.export.merge import (ORIGINAL_PREFIXES, MergeConfig, MergeError, checkpoint_dtype,
                                  layout_problems, merge_adapter, probe_inputs, probe_logits,
                                  tensor_names)

ROOT = Path(__file__).resolve().parents[1]
# float32 merge: what remains is summation order, ~1e-6 on logits of ~0.7.
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_perturbed_adapter(tiny_model_dir, tmp_path_factory.mktemp("merge") / "adapter")


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory):
    """models/merged and metrics/merge.json as the stage writes them (merge.dtype: float32)."""
    work = tmp_path_factory.mktemp("merged")
    params = work / "params.yaml"
    params.write_text("merge:\n  dtype: float32\n  device: cpu\n")
    out, metrics = work / "merged", work / "merge.json"
    code = load_stage("merge").main(["--base", str(tiny_model_dir), "--adapter", str(adapter_dir),
                                 "--out", str(out), "--metrics", str(metrics), "--params", str(params)])
    assert code == 0
    return out, json.loads(metrics.read_text())


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()


def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, adapter_dir, merged):
    from peft import PeftModel

    from vqatune.models.loading import load_processor

    merged_dir, _ = merged
    processor = load_processor(merged_dir)
    inputs = probe_inputs(processor)  # an image and a question: both towers and the projector
    base_logits = probe_logits(_load(tiny_model_dir), inputs)
    with_adapter = probe_logits(PeftModel.from_pretrained(_load(tiny_model_dir), str(adapter_dir)), inputs)
    fused = probe_logits(_load(merged_dir), inputs)

    # The adapter matters (else the comparison below proves nothing) ...
    assert (with_adapter - base_logits).abs().max() > 1e-2
    # ... and the merged checkpoint, reloaded from disk, reproduces it.
    assert (fused - with_adapter).abs().max() < FP32_TOLERANCE


def test_merged_checkpoint_is_what_the_converter_reads(tiny_model_dir, merged):
    merged_dir, metrics = merged
    names = tensor_names(merged_dir)
    assert layout_problems(merged_dir) == []
    assert all(n.startswith(ORIGINAL_PREFIXES) for n in names)
    assert any(n.startswith("vision_tower.vision_model.embeddings.") for n in names)
    assert not any("lora_" in n or "modules_to_save" in n or "base_layer" in n for n in names)
    # Tied: one matrix saved, and the reloaded head is the embedding matrix itself.
    assert not any(n.endswith("lm_head.weight") for n in names)
    model = _load(merged_dir)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert metrics["tied_embeddings"] is True
    # Processor, SentencePiece model and chat template travel with the weights.
    assert (merged_dir / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()
    assert (merged_dir / "processor_config.json").is_file()
    assert "<start_of_turn>" in (merged_dir / "chat_template.jinja").read_text()
    # The added tokens are listed where llama.cpp's converter looks for them.
    added = json.loads((merged_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {"<start_of_turn>", "<end_of_turn>", "<image_soft_token>"} <= {t["content"] for t in added.values()}
    assert metrics["dtype"] == "float32" and metrics["tensors"] == len(names)
    assert metrics["probe_max_abs_logit_diff"] < FP32_TOLERANCE


def test_bfloat16_merge_is_the_float32_merge_rounded(tiny_model_dir, adapter_dir, merged, tmp_path):
    """merge.dtype bfloat16 fuses and checks in float32, then rounds: the probe sees no rounding
    (a random 34-layer MedGemma-4B amplified bf16's to 10% of the largest logit), and every saved
    tensor is the float32 merge's, rounded to bf16."""
    from safetensors.torch import load_file

    stats = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "merged", MergeConfig(dtype="bfloat16"))
    bf16 = load_file(str(tmp_path / "merged" / "model.safetensors"))
    fp32 = load_file(str(merged[0] / "model.safetensors"))
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert bf16.keys() == fp32.keys()
    for name, tensor in fp32.items():
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    assert stats["dtype"] == "bfloat16"
    assert stats["probe_max_abs_logit_diff"] < FP32_TOLERANCE


def test_auto_dtype_is_the_checkpoints(tiny_model_dir, tmp_path):
    assert checkpoint_dtype(tiny_model_dir) == "float32"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    config["text_config"]["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path) == "bfloat16"


def test_adapter_that_unties_embeddings_is_refused(tiny_model_dir, adapter_dir, tmp_path):
    untied = tmp_path / "adapter"
    shutil.copytree(adapter_dir, untied)
    config = json.loads((untied / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head", "embed_tokens"]
    (untied / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="peft #2777"):
        merge_adapter(tiny_model_dir, untied, tmp_path / "merged", MergeConfig())
    assert not (tmp_path / "merged").exists()


def test_missing_adapter_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    code = load_stage("merge").main(["--base", str(tiny_model_dir), "--adapter", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "merged"), "--metrics", str(tmp_path / "m.json"),
                                 "--params", str(ROOT / "params.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "adapter_config.json not found" in err and "train stage" in err
    assert not (tmp_path / "merged").exists()


def test_unknown_merge_key_stops_before_loading(tiny_model_dir, adapter_dir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("merge:\n  dtype: int4\n")
    code = load_stage("merge").main(["--base", str(tiny_model_dir), "--adapter", str(adapter_dir),
                                 "--out", str(tmp_path / "merged"), "--metrics", str(tmp_path / "m.json"),
                                 "--params", str(params)])
    assert code == 2 and "merge.dtype" in capsys.readouterr().err
