"""DVC stage `evaluate`: answer the test split with the base and the tuned model under each prompt
mode (six configurations), score them and the majority-answer baseline, draw the comparison.

    python stages/evaluate.py --base models/base --adapter models/adapter --data data/processed \\
        --metrics metrics/eval.json --by-category metrics/eval_by_category.json \\
        --predictions metrics/predictions --plots plots/eval [--params params.yaml]
"""
from __future__ import annotations

import argparse
import logging
import sys

from vqatune.config import ConfigError, ModelConfig, load_params, section
from vqatune.evaluation.config import EvaluateConfig
from vqatune.evaluation.gallery import write_error_gallery
from vqatune.evaluation.plots import plot_by_category, plot_configurations, write_plot_data
from vqatune.evaluation.run import evaluate_models, write_predictions
from vqatune.outputs import fresh_staging, replace_dir, write_metrics
from vqatune.provenance import record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="models/base", help="the base model folder")
    parser.add_argument("--adapter", default="models/adapter", help="the LoRA adapter folder")
    parser.add_argument("--data", default="data/processed", help="prepared DatasetDict (train, test)")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--by-category", default="metrics/eval_by_category.json")
    parser.add_argument("--predictions", default="metrics/predictions", help="one JSONL per configuration")
    parser.add_argument("--plots", default="plots/eval", help="PNGs and the data dvc plots renders")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        params = load_params(args.params)
        cfg = section(params, "evaluate", EvaluateConfig)
        trust = section(params, "model", ModelConfig).trust_remote_code
        report = evaluate_models(args.base, args.adapter, args.data, cfg, trust_remote_code=trust)
    except (ConfigError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2

    # Outputs: predictions and plots first, the metrics last, so a run killed midway leaves no
    # eval.json that looks complete.
    # Each folder is written to a staging sibling renamed into place (outputs.replace_dir).
    write_predictions(report.predictions, args.predictions)
    plots = fresh_staging(args.plots)
    write_plot_data(report.scores, report.by_category, plots)
    plot_configurations(report.scores, plots / "configurations.png")
    plot_by_category(report.by_category, plots / "by_category.png")
    write_error_gallery(report.predictions, report.scores, args.data, plots / "errors")
    replace_dir(plots, args.plots, "evaluate-plots")
    write_metrics(args.by_category, report.by_category)
    provenance = record(params={"evaluate": cfg, "model.trust_remote_code": trust},
                        inputs=[args.base, args.adapter, args.data])
    write_metrics(args.metrics, {**report.scores, "provenance": provenance})

    s, gen = report.scores, report.scores["generation"]
    print("evaluate: exact match  " + "  ".join(
        f"{model}/{mode} {s[model][mode]['exact_match']:.3f}"
        for model in ("base", "tuned") for mode in ("none", "static", "adaptive"))
        + f"  blank images (tuned/none) {s['image_ablation']['none']['exact_match']:.3f}"
        + f"  majority {s['majority']['exact_match']:.3f}")
    print(f"evaluate: {gen['examples']} answers in {gen['seconds']} s ({gen['examples_per_s']} examples/s) "
          f"on {gen['device']}, peak {gen['peak_memory_gib']} GiB ({gen['memory_measure']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
