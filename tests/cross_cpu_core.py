"""The training and evaluation core of the embedded run, small, printing one JSON line of digests.

Run by tests/test_cpu_numerics.py in fresh processes under simulated CPUs (environment variables
that make torch, oneDNN and MKL take another CPU's code paths):

    python tests/cross_cpu_core.py MODEL_DIR PROCESSED_DIR WORK_DIR
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import vqatune  # noqa: F401  (first: pins the CPU numerics before torch runs anything)
from vqatune.config import load_params, section
from vqatune.evaluation.config import EvaluateConfig
from vqatune.evaluation.run import evaluate_models
from vqatune.training.config import TrainConfig, apply_overrides
from vqatune.training.run import run_training

REPO = Path(__file__).resolve().parents[1]
SMALL = {"max_steps": 6, "batch_size": 4, "eval_batch_size": 8, "eval_steps": 3, "save_steps": 3,
         "logging_steps": 1, "max_eval_rows": 8, "warmup": 0.0, "early_stopping_patience": 0}
MACHINE_KEYS = {"examples_per_s", "peak_memory_gib", "seconds"}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main(model_dir: str, processed_dir: str, work: str) -> None:
    import torch
    from safetensors.torch import load_file

    from vqatune.cpu_numerics import numerics_label

    work_dir = Path(work)
    params = load_params(REPO / "params.yaml")
    train_cfg = apply_overrides(section(params, "train", TrainConfig), SMALL)
    result = run_training(train_cfg, model_dir, processed_dir, work_dir / "adapter",
                          checkpoint_dir=work_dir / "checkpoints", resume=False)
    tensors = load_file(str(work_dir / "adapter" / "adapter_model.safetensors"))
    # A digest of nothing would compare equal on any CPU: the run must really have trained.
    assert result.steps == SMALL["max_steps"] and tensors, (result.steps, len(tensors))
    adapter = digest(b"".join(tensors[k].contiguous().view(torch.uint8).numpy().tobytes()
                              for k in sorted(tensors)))
    eval_cfg = dataclasses.replace(section(params, "evaluate", EvaluateConfig), subset_size=8,
                                   max_new_tokens=8)
    report = evaluate_models(model_dir, work_dir / "adapter", processed_dir, eval_cfg, progress=False)
    answers = {name: [row["prediction"] for row in rows] for name, rows in report.predictions.items()}
    # Every score of every configuration; timings and memory are the machine's, not the run's.
    scores = {model: {mode: {k: v for k, v in values.items() if k not in MACHINE_KEYS}
                      for mode, values in report.scores[model].items()} for model in ("base", "tuned")}
    print(json.dumps({
        "numerics": numerics_label(),
        "adapter": adapter,
        "losses": [repr(x["loss"]) for x in result.log_history if "loss" in x],
        "eval_loss": repr(result.metrics()["eval_loss"]),
        "answers": digest(json.dumps(answers, sort_keys=True).encode()),
        "scores": digest(json.dumps(scores, sort_keys=True).encode()),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
