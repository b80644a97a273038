"""DVC stage `base_model`: put the base model named by `model.id` at models/base.

    python stages/base_model.py --out models/base [--params params.yaml]
"""
from __future__ import annotations

import argparse
import logging
import sys

from vqatune.config import ConfigError, ModelConfig, load_params, section
from vqatune.models.base import materialise_base_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/base")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = section(load_params(args.params), "model", ModelConfig)
        out = materialise_base_model(cfg, args.out)
    except ConfigError as err:
        print(f"base_model: {err}", file=sys.stderr)
        return 2
    print(f"base model '{cfg.id}' -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
