"""DVC stage `tune`: search `train:` hyperparameters with Optuna; the best go to the train stage.

    python stages/tune.py --model models/base --data data/processed \
        --best-params models/best_params.json --metrics metrics/tune.json --plots plots/tune \
        [--params params.yaml] [--worker N]

The study lives in `tune.storage` (SQLite under models/tune/ by default, kept across runs): run
again after a kill and only the missing trials run. More workers on the same study, each on its
own GPU or machine, with the same params, model and data (they write nothing but trials):

    CUDA_VISIBLE_DEVICES=1 python stages/tune.py --worker 1

With `tune.enabled: false` nothing is searched and best_params.json says so.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vqatune.config import ConfigError, ModelConfig, load_params, section
from vqatune.outputs import fresh_staging, replace_dir, write_json, write_metrics
from vqatune.provenance import record
from vqatune.search.config import TuneConfig
from vqatune.search.objective import tune
from vqatune.search.report import best_params_record, disabled_outputs, search_metrics, write_plots
from vqatune.search.workers import SearchError, trial_counts
from vqatune.training.config import TrainConfig
from vqatune.training.distributed import interrupt_on_sigterm


def write_outputs(args, study, best: dict, metrics: dict, cfg: TuneConfig) -> None:
    """Plots (through a staging folder), then best_params.json, then the metrics, each renamed
    into place: a stage killed midway leaves no best_params.json or metrics that look done."""
    staging = fresh_staging(args.plots)
    write_plots(study, staging, objective=cfg.objective, seed=cfg.seed)
    replace_dir(staging, args.plots, "tune")
    write_json(args.best_params, best)
    write_metrics(args.metrics, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--best-params", default="models/best_params.json")
    parser.add_argument("--metrics", default="metrics/tune.json")
    parser.add_argument("--plots", default="plots/tune")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--worker", type=int, default=0,
                        help="N >= 1: an extra worker that only runs trials (seeds its sampler apart)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (how DVC and schedulers stop a stage) stops like Ctrl-C, failing only the running trial.
    interrupt_on_sigterm()
    start = time.perf_counter()

    try:
        params = load_params(args.params)
        cfg = section(params, "tune", TuneConfig)
        if not cfg.enabled:
            best, metrics = disabled_outputs()
            write_outputs(args, None, best, {**metrics, "provenance": record(params={"tune": cfg})}, cfg)
            print("tune: disabled (tune.enabled: false); training uses train: as it is")
            return 0
        train_cfg = section(params, "train", TrainConfig)
        trust = section(params, "model", ModelConfig).trust_remote_code
        study = tune(cfg, train_cfg, args.model, args.data, worker=args.worker, trust_remote_code=trust)
    except ConfigError as err:
        print(f"tune: {err}", file=sys.stderr)
        return 2
    except SearchError as err:
        print(f"tune: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tune: interrupted; finished trials are kept in the study, run again to finish it",
              file=sys.stderr)
        return 130

    counts = trial_counts(study)
    seconds = time.perf_counter() - start
    summary = (f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed, "
               f"{counts['abandoned']} abandoned (interrupted or dead worker) in {seconds:.0f} s")
    if args.worker:
        print(f"tune: worker {args.worker} done; study {study.study_name}: {summary}")
        return 0

    best = best_params_record(study)
    provenance = record(params={"tune": cfg, "train": train_cfg, "model.trust_remote_code": trust},
                        inputs=[args.model, args.data])
    write_outputs(args, study, best, {**search_metrics(study, cfg, seconds=seconds, storage_url=cfg.storage),
                                      "provenance": provenance}, cfg)
    print(f"tune: study {study.study_name}: {summary}; best {cfg.objective} {best['best_value']:.4f} "
          f"(trial {best['trial']}): {best['params']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
