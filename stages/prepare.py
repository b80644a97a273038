"""DVC stage `prepare`: load QA rows, decode and resize images, drop and count bad rows,
categorise questions, build chat messages per prompt mode, split by image id.

    python stages/prepare.py --out data/processed --metrics metrics/prepare.json [--params params.yaml]
"""
from __future__ import annotations

import argparse
import logging
import sys

from vqatune.config import ConfigError, ModelConfig, PrepareConfig, load_params, section
from vqatune.data.prepare import prepare_dataset
from vqatune.outputs import write_metrics
from vqatune.prompts import PromptsConfig
from vqatune.provenance import record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/processed")
    parser.add_argument("--metrics", default="metrics/prepare.json")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        cfg = section(params, "prepare", PrepareConfig)
        prompts = section(params, "prompts", PromptsConfig)
        trust = section(params, "model", ModelConfig).trust_remote_code
        stats = prepare_dataset(cfg, prompts, args.out, trust_remote_code=trust)
        stats["provenance"] = record(params={"prepare": cfg, "prompts": prompts, "model.trust_remote_code": trust},
                                     outputs=[args.out])
    except ConfigError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    write_metrics(args.metrics, stats)
    print(f"prepare: {stats['rows_in']} rows in -> {stats['rows_out']} "
          f"({stats['dropped_total']} dropped) in {stats['seconds']} s ({stats['rows_per_s']} rows/s)")
    return 0


if __name__ == "__main__":
    from vqatune.outputs import exit_on_disk_full

    sys.exit(exit_on_disk_full("prepare", main, {"--out": "data/processed"}))
