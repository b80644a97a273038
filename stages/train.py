"""DVC stage `train`: fine-tune a LoRA adapter on the base model with TRL's SFTTrainer.

    python stages/train.py --model models/base --data data/processed \
        --best-params models/best_params.json --out models/adapter --metrics metrics/train.json \
        --plots metrics/train_curves --checkpoints models/train_checkpoints [--params params.yaml] [--fresh]

On several GPUs (`train.num_processes`, or VQATUNE_NUM_PROCESSES; `auto` = all of them) the
script starts itself again under `accelerate launch --config_file configs/accelerate/ddp.yaml`
(DDP, same global batch) and only the main process writes outputs.

Hyperparameters: `train:` in params.yaml, overridden by the search stage's best_params.json when
it searched. A killed run resumes from its last checkpoint in --checkpoints when run again
(--fresh starts over). Ctrl-C saves the adapter so far to `<out>.partial/` and exits 130, so DVC
never records an interrupted run as done.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from vqatune.config import ConfigError, ModelConfig, as_dict, load_params, section
from vqatune.models.metadata import write_training_metadata
from vqatune.outputs import replace_dir, write_metrics
from vqatune.provenance import environment, record
from vqatune.training import distributed
from vqatune.training.card import model_card
from vqatune.training.config import TrainConfig, apply_overrides, load_hyperparameters
from vqatune.training.curves import write_curves
from vqatune.training.run import TrainingInterrupted, run_training

ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"


def _write_card(adapter_dir: Path, model_cfg, train_cfg, metrics, source, partial) -> None:
    card = model_card(base_model=model_cfg.id, dataset="data/processed", train_params=as_dict(train_cfg),
                      metrics=metrics, environment=environment(), hyperparameter_source=source,
                      partial=partial)
    (adapter_dir / "README.md").write_text(card)
    # How the adapter was trained, for `vqatune ask`'s default prompt mode (merge copies it on).
    write_training_metadata(adapter_dir, prompt_mode=train_cfg.prompt_mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--best-params", default="models/best_params.json")
    parser.add_argument("--out", default="models/adapter")
    parser.add_argument("--metrics", default="metrics/train.json")
    parser.add_argument("--plots", default="metrics/train_curves")
    parser.add_argument("--checkpoints", default="models/train_checkpoints")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints of an earlier run")
    args = parser.parse_args(argv)
    # Under a multi-process launch only the main process logs progress (the others: warnings).
    quiet = distributed.in_launch() and not distributed.is_main_process()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # DVC and schedulers stop a stage with SIGTERM: treat it like Ctrl-C (save partial, exit non-zero).
    distributed.interrupt_on_sigterm()

    try:
        params = load_params(args.params)
        model_cfg = section(params, "model", ModelConfig)
        train_cfg = section(params, "train", TrainConfig)
        overrides, source = load_hyperparameters(args.best_params)
        train_cfg = apply_overrides(train_cfg, overrides)
    except ConfigError as err:
        print(f"train: {err}", file=sys.stderr)
        return 2

    out, tmp, partial_dir = Path(args.out), Path(f"{args.out}.tmp"), Path(f"{args.out}.partial")
    if not distributed.in_launch():
        for stale in (tmp, partial_dir):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            processes = distributed.resolve_num_processes(train_cfg.num_processes)
        except ConfigError as err:
            print(f"train: {err}", file=sys.stderr)
            return 2
        if processes > 1:
            # One command for DVC: this script again, once per GPU, under accelerate's launcher.
            return distributed.relaunch(Path(__file__), argv if argv is not None else sys.argv[1:],
                                        processes, config_file=ACCELERATE_CONFIG)
    try:
        result = run_training(train_cfg, args.model, args.data, tmp, checkpoint_dir=args.checkpoints,
                              resume=not args.fresh, trust_remote_code=model_cfg.trust_remote_code)
    except ConfigError as err:
        print(f"train: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if not distributed.is_main_process():
            return 130
        metrics = {**stop.result.metrics(), "hyperparameter_source": source}
        _write_card(tmp, model_cfg, train_cfg, metrics, source, partial=True)
        tmp.rename(partial_dir)
        print(f"train: interrupted at step {stop.result.steps}; partial adapter in {partial_dir}. "
              f"Run the stage again to resume from {stop.result.checkpoint_dir}.", file=sys.stderr)
        return 130

    if not distributed.is_main_process():
        return 0  # the main process writes the adapter, curves, card and metrics
    metrics = {**result.metrics(), "hyperparameter_source": source, "hyperparameters": overrides,
               "model_id": model_cfg.id,
               "provenance": record(params={"train": train_cfg, "model.id": model_cfg.id,
                                            "model.trust_remote_code": model_cfg.trust_remote_code},
                                    inputs=[args.model, args.data, args.best_params])}
    _write_card(tmp, model_cfg, train_cfg, metrics, source, partial=False)
    write_curves(result.log_history, args.plots)
    replace_dir(tmp, out, "train")
    write_metrics(args.metrics, metrics)
    print(f"train: {result.steps} steps, {result.epochs} epochs in {result.seconds} s "
          f"({result.examples_per_s} examples/s, peak {result.peak_memory_gib} GiB, {result.device}, "
          f"{result.quantization}); eval loss {result.eval_loss_start} -> {result.eval_loss}; "
          f"trainable {result.trainable_params:,} ({100 * result.trainable_share:.2f}%)"
          f"{'; resumed from step %d' % result.resumed_from_step if result.resumed else ''}")
    return 0


if __name__ == "__main__":
    from vqatune.outputs import exit_on_disk_full

    sys.exit(exit_on_disk_full("train", main, {"--out": "models/adapter", "--checkpoints": "models/train_checkpoints"}))
