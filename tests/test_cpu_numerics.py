"""One numeric path on every x86 CPU (vqatune.cpu_numerics).

The first tests make this machine look like a CPU with AVX512-BF16 to bitsandbytes, whatever it
really has: each 4-bit layer then starts with the packed-path flag on, as on such a CPU, and the
product must still load, evaluate, train and generate on the one path every CPU takes, with the
numbers of a CPU without the feature. The last test runs the training and evaluation core under
two simulated CPUs and asks for the same bits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqatune.config import load_params, section
from vqatune.data.kvasir import QUESTIONS
from vqatune.evaluation.config import EvaluateConfig
from vqatune.evaluation.run import load_for_evaluation
from vqatune.generation.generate import generate_answers, prompt_texts
from vqatune.models.loading import load_base_model, load_processor
from vqatune.prompts import PromptsConfig, build_messages
from vqatune.training.config import TrainConfig, apply_overrides
from vqatune.training.run import run_training

REPO = Path(__file__).resolve().parents[1]


def _four_bit_layers(model):
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def simulate_avx512_bf16(monkeypatch) -> None:
    """bitsandbytes sees a CPU with AVX512-BF16: new 4-bit layers turn their packed path on."""
    import bitsandbytes.functional as functional
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(functional, "has_avx512bf16", lambda: True)


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    simulate_avx512_bf16(monkeypatch)


def _image_inputs(model_dir, n: int = 2):
    processor = load_processor(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    messages = [build_messages(QUESTIONS[i], "none", PromptsConfig()) for i in range(n)]
    return processor, messages, images


def test_a_4bit_load_quantizes_the_absmax_by_one_rule_on_every_cpu(tiny_model_dir):
    """Double quantization (each nf4 block's absmax to 8 bits) follows bitsandbytes' own CUDA and
    torch rule (nearest code by midpoints) on the CPU, not its CPU library's code choice, which
    differs by CPU (0.15% of codes on an AMD EPYC with AVX512-BF16). Checked on the loaded
    model's layers against that rule computed here from the checkpoint's weights."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from vqatune.cpu_numerics import portable_quantize_blockwise
    from vqatune.models.tiny import original_layout_key

    model = load_base_model(tiny_model_dir, quantization="4bit", dtype="float32", device="cpu")
    weights = {}
    for shard in Path(tiny_model_dir).glob("model*.safetensors"):
        weights.update(load_file(str(shard)))
    checked = 0
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or state.state2 is None:
            continue
        key = original_layout_key(name + ".weight")
        dense = weights[key].float()
        # nf4 step (torch in bitsandbytes on every CPU): each 64-block's absmax, then double quantized
        absmax = dense.reshape(-1, state.blocksize).abs().max(-1).values
        codes, scale = portable_quantize_blockwise(absmax - state.offset, state.state2.code, state.state2.blocksize)
        assert torch.equal(state.absmax.reshape(-1), codes.reshape(-1)), name
        assert torch.equal(state.state2.absmax, scale), name
        checked += 1
    assert checked >= 10
    # and the op itself, on values near the codes' midpoints where a code choice can differ
    code = F.create_dynamic_map(signed=True)
    mid = ((code[:-1] + code[1:]) / 2).repeat(16)
    values = torch.cat([mid * (1 + 1e-7), mid * (1 - 1e-7), torch.randn(4096)])
    got, scale = torch.ops.bitsandbytes.quantize_blockwise.default(values, code, 256)
    want, want_scale = portable_quantize_blockwise(values, code, 256)
    assert torch.equal(got, want) and torch.equal(scale, want_scale)
    # the rule itself, known by hand: in a block whose absmax is 1 (no rounding in the scaling), a
    # value just above the midpoint of codes i and i+1 gets i+1, just below gets i
    i = torch.arange(255)
    mid = (code[:-1] + code[1:]) / 2
    block = torch.cat([mid * (1 + 1e-6), mid * (1 - 1e-6)]).clamp(-0.999, 0.999)
    block = torch.cat([block, torch.tensor([1.0])])
    codes, _ = portable_quantize_blockwise(block, code, block.numel())
    above = torch.where(mid > 0, i + 1, i)   # |x| grows away from 0: above a positive midpoint
    below = torch.where(mid > 0, i, i + 1)   # is the upper code, above a negative one the lower
    inside = (mid * (1 + 1e-6)).abs() < 0.999
    assert torch.equal(codes[:255][inside].long(), above[inside])
    assert torch.equal(codes[255:510][inside].long(), below[inside])


def test_the_simulated_cpu_really_turns_the_packed_path_on(tiny_model_dir, avx512_bf16_cpu):
    """Guards the simulation itself: bitsandbytes' own layer takes the flag from has_avx512bf16.
    If a bitsandbytes upgrade renames it, this fails and cpu_numerics must follow."""
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(64, 64, quant_type="nf4")
    assert layer.support_avx512bf16_for_cpu is True


def test_4bit_eval_forward_on_an_avx512_bf16_cpu_matches_a_cpu_without_it(tiny_model_dir, monkeypatch):
    processor, messages, images = _image_inputs(tiny_model_dir)
    inputs = processor(text=prompt_texts(processor, messages), images=[[im] for im in images],
                       return_tensors="pt", padding=True, add_special_tokens=False)

    def logits():
        model = load_base_model(tiny_model_dir, quantization="4bit", compute_dtype="float32", device="cpu")
        layers = _four_bit_layers(model)
        assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
        model.eval()
        with torch.no_grad():  # what the Trainer's eval loss, evaluation and `ask` do
            out = model(**inputs).logits
        assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                       for layer in layers)
        return out

    without_feature = logits()
    simulate_avx512_bf16(monkeypatch)
    with_feature = logits()
    assert torch.equal(with_feature, without_feature)


def test_4bit_training_with_eval_loss_on_an_avx512_bf16_cpu(tiny_model_dir, processed_dir, tmp_path,
                                                             avx512_bf16_cpu):
    """The Trainer's eval (model.eval(), no grad) is where the packed path crashed the search."""
    params = load_params(REPO / "params.yaml")
    cfg = apply_overrides(section(params, "train", TrainConfig),
                          {"max_steps": 2, "batch_size": 4, "eval_batch_size": 8, "eval_steps": 1,
                           "save_steps": 2, "logging_steps": 1, "max_eval_rows": 8, "warmup": 0.0,
                           "early_stopping_patience": 0})
    assert cfg.quantization == "4bit"
    result = run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "adapter",
                          checkpoint_dir=tmp_path / "checkpoints")
    assert result.eval_loss_start is not None and np.isfinite(result.eval_loss)
    assert result.steps == 2


def test_4bit_generation_on_an_avx512_bf16_cpu_matches_a_cpu_without_it(tiny_model_dir, processed_dir,
                                                                       tmp_path, monkeypatch):
    """Evaluation and `vqatune ask` with a 4-bit base: same answers with and without the feature."""
    params = load_params(REPO / "params.yaml")
    cfg = apply_overrides(section(params, "train", TrainConfig),
                          {"max_steps": 1, "batch_size": 4, "eval_steps": 1, "save_steps": 1,
                           "max_eval_rows": 4, "warmup": 0.0, "early_stopping_patience": 0})
    run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "adapter", checkpoint_dir=tmp_path / "c")
    eval_cfg = dataclasses.replace(section(params, "evaluate", EvaluateConfig), quantization="4bit")
    _, messages, images = _image_inputs(tiny_model_dir, n=3)

    def answers():
        model, processor = load_for_evaluation(tiny_model_dir, tmp_path / "adapter", eval_cfg)
        assert not any(layer.support_avx512bf16_for_cpu for layer in _four_bit_layers(model))
        return generate_answers(model, processor, messages, images, batch_size=2, max_new_tokens=6)

    without_feature = answers()
    simulate_avx512_bf16(monkeypatch)
    assert answers() == without_feature


# Environment variables that make this machine compute like another x86-64 CPU: torch's ATen
# kernels at another instruction set, oneDNN and MKL capped to SSE4, glibc's libm without its
# AVX2/FMA variants. An inherited MKL_CBWR is a user's choice the pin must override too.
OLDER_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
             "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "AUTO",
             "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX2_Usable,-FMA_Usable"}


def _core(tiny_model_dir, processed_dir, work: Path, env: dict) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in OLDER_CPU and k != "VQATUNE_CPU_NUMERICS"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cross_cpu_core.py"), str(tiny_model_dir),
                           str(processed_dir), str(work)], env={**environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_and_evaluation_give_the_same_bits_on_two_simulated_cpus(tiny_model_dir, processed_dir,
                                                                          tmp_path):
    runs = {"this cpu": {}, "older cpu": OLDER_CPU,
            "this cpu, native numerics": {"VQATUNE_CPU_NUMERICS": "native"},
            "older cpu, native numerics": {**OLDER_CPU, "VQATUNE_CPU_NUMERICS": "native"}}
    with ThreadPoolExecutor(2) as pool:  # two processes at a time: CI has 2 cores
        futures = {name: pool.submit(_core, tiny_model_dir, processed_dir, tmp_path / str(i), env)
                   for i, (name, env) in enumerate(runs.items())}
        out = {name: f.result() for name, f in futures.items()}

    # Pinned (the default): the same adapter bytes, losses, answers and scores on both CPUs.
    assert out["this cpu"]["numerics"] == out["older cpu"]["numerics"] == "portable"
    assert out["this cpu"] == out["older cpu"]
    native = out["this cpu, native numerics"]["numerics"]
    if native == "native (DEFAULT)":
        pytest.skip("this CPU has no vector instruction set above DEFAULT to compare against")
    # The control: without the pin the two simulated CPUs do compute differently, so the
    # equality above is the pin's doing, not a simulation that changed nothing.
    assert out["older cpu, native numerics"]["numerics"] == "native (DEFAULT)"
    assert out["this cpu, native numerics"]["adapter"] != out["older cpu, native numerics"]["adapter"]


def test_a_late_import_says_the_numerics_are_not_pinned():
    """peft (like transformers' model classes) runs a torch kernel on import: ATen has chosen by
    then, so vqatune must say so rather than claim a portable run."""
    code = ("import logging; logging.basicConfig()\nimport peft\nimport vqatune\n"
            "from vqatune.cpu_numerics import numerics_label\nprint(numerics_label())")
    environ = {k: v for k, v in os.environ.items() if k not in OLDER_CPU and k != "VQATUNE_CPU_NUMERICS"}
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("native (")
    assert "CPU numerics not pinned: import vqatune before torch runs anything" in done.stderr
