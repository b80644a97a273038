"""Peak GPU memory of a params profile's train and evaluate stages on MedGemma-4B shapes.

Random weights of the real architecture (medgemma4b_config.json), synthetic Kvasir-like data at
the profile's image size, then the product's run_training and evaluate_models, as the stages call
them. On a GPU machine (see offline_gpu_setup.sh):

    source benchmarks/offline_gpu_setup.sh && python benchmarks/profile_memory.py --out results/ \
        --profile medgemma-16gb --images 120

Writes profile_memory.json. BERTScore runs with its packaged model unless --no-bertscore.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import vqatune  # noqa: F401  (first: pins the CPU numerics)
import torch
import yaml
from medgemma import build_random_medgemma

from vqatune.cli.profile import apply_profile
from vqatune.config import PrepareConfig, section
from vqatune.data.prepare import prepare_dataset
from vqatune.evaluation import run as evaluation_run
from vqatune.evaluation.config import EvaluateConfig
from vqatune.prompts import PromptsConfig
from vqatune.training.config import TrainConfig, apply_overrides
from vqatune.training.run import run_training

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="medgemma-16gb")
    ap.add_argument("--images", type=int, default=120, help="synthetic images (~9 QA each)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-bertscore", action="store_true", help="score without BERTScore's model")
    args = ap.parse_args()
    out, work = Path(args.out), Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    apply_profile(args.profile, work / "params.yaml", REPO)
    params = yaml.safe_load((work / "params.yaml").read_text())

    model_dir = build_random_medgemma(work / "model")
    prepare = dataclasses.replace(section(params, "prepare", PrepareConfig), source="synthetic",
                                  synthetic_images=args.images)
    prepare_dataset(prepare, section(params, "prompts", PromptsConfig), work / "data")

    train = apply_overrides(section(params, "train", TrainConfig),
                            {"max_steps": args.steps, "eval_steps": max(args.steps // 2, 1), "save_steps": 10**6,
                             "max_eval_rows": 64, "logging_steps": 1})
    torch.cuda.reset_peak_memory_stats()
    trained = run_training(train, model_dir, work / "data", work / "adapter", checkpoint_dir=work / "ck")
    torch.cuda.empty_cache()

    if args.no_bertscore:
        evaluation_run.make_bertscore = lambda *a, **k: (lambda p, r: [0.0] * len(p))
    report = evaluation_run.evaluate_models(model_dir, work / "adapter", work / "data",
                                            section(params, "evaluate", EvaluateConfig), progress=False)
    generation = report.scores["generation"]
    result = {
        "card": torch.cuda.get_device_name(), "profile": args.profile, "torch": torch.__version__,
        "train": {"batch": train.batch_size, "optimizer": train.optimizer,
                  **{k: trained.metrics()[k] for k in ("peak_memory_gib", "examples_per_s", "steps", "train_rows")}},
        "evaluate": {k: generation.get(k) for k in ("batch_size", "batch_size_from", "gib_per_row", "budget_gib",
                                                     "peak_memory_gib", "examples_per_s", "test_rows")},
        "bertscore": not args.no_bertscore,
    }
    (out / "profile_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
