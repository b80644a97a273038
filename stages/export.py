"""DVC stage `export`: convert the merged model with llama.cpp's converter into `<name>.gguf`
(language model) and `mmproj-<name>.gguf` (vision tower + projector), check both, and write
the Ollama Modelfiles beside them.

    python stages/export.py --merged models/merged --out models/gguf \
        --metrics metrics/export.json [--params params.yaml]

The converter comes from the pinned llama-cpp-python sdist (`make install`, or installed here
on first use: `python -m vqatune.export.converter`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vqatune.config import ConfigError, load_params, section
from vqatune.export.converter import ConverterError
from vqatune.export.agreement import NOT_IMPORTABLE, llama_cpp_python, not_measured
from vqatune.export.gguf import ExportConfig, ExportError, export_gguf
from vqatune.outputs import disk_full, write_metrics
from vqatune.prompts import PromptsConfig
from vqatune.provenance import record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", default="models/merged")
    parser.add_argument("--out", default="models/gguf")
    parser.add_argument("--metrics", default="metrics/export.json")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        cfg = section(params, "export", ExportConfig)
        prompts = section(params, "prompts", PromptsConfig)
        start = time.perf_counter()
        stats = export_gguf(args.merged, args.out, cfg, prompts.static)
    except (ConfigError, ConverterError, ExportError) as err:
        if disk_full(err) is not None:
            raise  # the converter ran out of space: exit_on_disk_full's one line, exit 1
        print(f"export: {err}", file=sys.stderr)
        return 2
    stats["seconds"] = round(time.perf_counter() - start, 1)
    stats["provenance"] = record(params={"export": cfg, "prompts.static": prompts.static}, inputs=[args.merged])
    # GGUF vs evaluated answers: this stage reads neither evaluation's predictions nor the test
    # images, so it records why the rate is not here; tests/test_export.py measures it.
    stats.update(not_measured(NOT_IMPORTABLE if llama_cpp_python() is None else
                              "measured by tests/test_export.py::test_gguf_answers_like_the_evaluated_model"))
    write_metrics(args.metrics, stats)
    diff = stats.get("text_max_abs_logit_diff")
    print(f"export: {args.out}/{cfg.name}.gguf ({cfg.outtype}, {stats['text_tensors']} tensors) + "
          f"mmproj-{cfg.name}.gguf ({stats['mmproj_tensors']} tensors) + Modelfile"
          + (f"; text logits within {diff:.3g} of the merged model" if diff is not None else ""))
    return 0


if __name__ == "__main__":
    from vqatune.outputs import exit_on_disk_full

    sys.exit(exit_on_disk_full("export", main, {"--out": "models/gguf"}))
