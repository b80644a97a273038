"""DVC stage `merge`: fuse the LoRA adapter into the base model (reloaded unquantized) and save
it, with processor and tokenizer, in the checkpoint layout llama.cpp's converter reads.

    python stages/merge.py --base models/base --adapter models/adapter --out models/merged \
        --metrics metrics/merge.json [--params params.yaml]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vqatune.config import ConfigError, ModelConfig, load_params, section
from vqatune.export.merge import MergeConfig, MergeError, merge_adapter
from vqatune.outputs import write_metrics
from vqatune.provenance import record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--adapter", default="models/adapter")
    parser.add_argument("--out", default="models/merged")
    parser.add_argument("--metrics", default="metrics/merge.json")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        cfg = section(params, "merge", MergeConfig)
        trust = section(params, "model", ModelConfig).trust_remote_code
        start = time.perf_counter()
        stats = merge_adapter(args.base, args.adapter, args.out, cfg, trust_remote_code=trust)
    except (ConfigError, MergeError) as err:
        print(f"merge: {err}", file=sys.stderr)
        return 2
    stats["seconds"] = round(time.perf_counter() - start, 1)
    stats["provenance"] = record(params={"merge": cfg, "model.trust_remote_code": trust},
                                 inputs=[args.base, args.adapter])
    write_metrics(args.metrics, stats)
    diff = stats.get("probe_max_abs_logit_diff")
    print(f"merge: {args.adapter} + {args.base} -> {args.out} ({stats['dtype']}, "
          f"{stats['parameters']:,} parameters, tied embeddings: {stats['tied_embeddings']}"
          + (f", probe logits within {diff:.3g}" if diff is not None else "") + ")")
    return 0


if __name__ == "__main__":
    from vqatune.outputs import exit_on_disk_full

    sys.exit(exit_on_disk_full("merge", main, {"--out": "models/merged"}))
