"""DVC stage `export`: convert the merged model with llama.cpp's converter into `<name>.gguf`
(language model) and `mmproj-<name>.gguf` (vision tower + projector), check both, and write
the Ollama Modelfiles beside them.

    python stages/export.py --merged models/merged --out models/gguf \
        --metrics metrics/export.json [--data data/processed] \
        [--predictions metrics/predictions] [--params params.yaml]

With llama-cpp-python importable ($VQATUNE_LLAMA_CPP_PYTHON, or this Python), the exported pair
answers `export.agreement_rows` test rows through llama.cpp, compared with the evaluate stage's
predictions: gguf_agreement in the metrics.

The converter comes from the pinned llama-cpp-python sdist (`make install`, or installed here
on first use: `python -m vqatune.export.converter`).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from vqatune.config import ConfigError, InputError, load_params, section
from vqatune.evaluation.config import EvaluateConfig
from vqatune.export.converter import ConverterError
from vqatune.export.agreement import NOT_IMPORTABLE, llama_cpp_python, measure_agreement, not_measured
from vqatune.export.gguf import ExportConfig, ExportError, export_gguf, gguf_paths
from vqatune.outputs import disk_full, write_metrics
from vqatune.prompts import PromptsConfig
from vqatune.provenance import record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", default="models/merged")
    parser.add_argument("--out", default="models/gguf")
    parser.add_argument("--metrics", default="metrics/export.json")
    parser.add_argument("--data", default="data/processed", help="the test images (prepare)")
    parser.add_argument("--predictions", default="metrics/predictions", help="the evaluate stage's")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        cfg = section(params, "export", ExportConfig)
        prompts = section(params, "prompts", PromptsConfig)
        max_new_tokens = section(params, "evaluate", EvaluateConfig).max_new_tokens
        start = time.perf_counter()
        stats = export_gguf(args.merged, args.out, cfg, prompts.static)
    except (ConfigError, ConverterError, ExportError) as err:
        if disk_full(err) is not None:
            raise  # the converter ran out of space: exit_on_disk_full's one line, exit 1
        print(f"export: {err}", file=sys.stderr)
        return 2
    stats["seconds"] = round(time.perf_counter() - start, 1)
    # GGUF vs evaluated answers: the same test rows through llama.cpp, the trained prompt mode.
    python = llama_cpp_python() if cfg.agreement_rows else None
    if not cfg.agreement_rows:
        stats.update(not_measured("export.agreement_rows is 0"))
    elif python is None:
        stats.update(not_measured(NOT_IMPORTABLE))
    else:
        text_path, mmproj_path = gguf_paths(args.out, cfg.name)
        try:
            stats.update(measure_agreement(python, text_path, mmproj_path, Path(args.merged),
                                           Path(args.data), Path(args.predictions), prompts,
                                           cfg.agreement_rows, max_new_tokens))
        except (InputError, RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"export: agreement not measured: {err}", file=sys.stderr)
            stats.update(not_measured(f"llama.cpp run failed: {str(err).strip().splitlines()[-1][:300]}"))
    # The declared data and model inputs (dvc.yaml); which predictions file the agreement read is
    # in the stats above.
    stats["provenance"] = record(params={"export": cfg, "prompts": prompts,
                                         "evaluate.max_new_tokens": max_new_tokens},
                                 inputs=[args.merged, args.data])
    write_metrics(args.metrics, stats)
    diff = stats.get("text_max_abs_logit_diff")
    if stats.get("gguf_agreement") is not None:
        print(f"export: llama.cpp answers {stats['gguf_agreement']:.1%} of {stats['gguf_agreement_n']} "
              f"test rows as evaluated ({stats['gguf_agreement_predictions']})")
    print(f"export: {args.out}/{cfg.name}.gguf ({cfg.outtype}, {stats['text_tensors']} tensors) + "
          f"mmproj-{cfg.name}.gguf ({stats['mmproj_tensors']} tensors) + Modelfile"
          + (f"; text logits within {diff:.3g} of the merged model" if diff is not None else ""))
    return 0


if __name__ == "__main__":
    from vqatune.outputs import exit_on_disk_full

    sys.exit(exit_on_disk_full("export", main, {"--out": "models/gguf"}))
