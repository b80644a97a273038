"""CPU cost of one training batch's collation: images through the processor vs image keys.

With precomputed image features the training collator only needs each row's image *key*
(``AnswerOnlyCollator(image_keys=True)``); before, it ran the Gemma 3 processor on every image
of every batch just to find the cache entry. Both collators run here on the same rows, side by
side, on the builtin tiny model's processor: at its own image size (64 px) and at 896 px
(MedGemma's), the images resized to the processor's size first as the prepare stage does.
``fetch_s`` is the DataLoader worker's other per-batch cost: reading the rows from an Arrow
dataset, with and without the PNG-encoded image column (a keyed batch never needs it).

    PYTHONPATH=src python benchmarks/collate_bench.py --rows 32 --reps 5
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up: lazy imports, tokenizer caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="rows per batch")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 896], help="image sizes; 0 = the processor's own")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker has 1)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="collate_bench_") as tmp:
        results = _measure(args, Path(tmp))
    print(json.dumps({"rows": args.rows, "reps": args.reps, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "results": results}), flush=True)
    return 0


def _measure(args, work: Path) -> list[dict]:
    import torch
    from datasets import Dataset, load_from_disk
    from PIL import Image

    from vqatune.collate import AnswerOnlyCollator
    from vqatune.config import ModelConfig, PrepareConfig
    from vqatune.data.prepare import prepare_dataset
    from vqatune.model import load_processor
    from vqatune.prompts import PromptsConfig
    from vqatune.tiny_model import build_tiny_gemma3

    model_dir = build_tiny_gemma3(work / "model", ModelConfig())
    prepare_dataset(PrepareConfig(synthetic_images=max(8, args.rows // 4), seed=0), PromptsConfig(),
                    work / "processed")
    train = load_from_disk(str(work / "processed"))["train"]
    base_rows = [train[i % len(train)] for i in range(args.rows)]
    base = load_processor(model_dir)

    results = []
    for size in args.sizes:
        processor = base
        if size:
            processor = copy.deepcopy(base)
            processor.image_processor.size = {"height": size, "width": size}
        side = processor.image_processor.size["height"]
        rows = [{**row, "image": row["image"].convert("RGB").resize((side, side), Image.BILINEAR)} for row in base_rows]
        pixels = AnswerOnlyCollator(processor, "none", "right")
        keyed = AnswerOnlyCollator(processor, "none", "right", image_keys=True)
        pixel_batch, keyed_batch = pixels(rows), keyed(rows)
        assert all(torch.equal(pixel_batch[k], keyed_batch[k]) for k in ("input_ids", "labels", "token_type_ids"))
        stored = Dataset.from_list(rows)  # images stored PNG-encoded, as data/processed holds them
        no_image = stored.remove_columns("image")
        results.append({
            "image_px": side,
            "pixel_s": _median_s(lambda: pixels(rows), args.reps),
            "keyed_s": _median_s(lambda: keyed(rows), args.reps),
            "pixel_values_mb": round(pixel_batch["pixel_values"].numel() * 4 / 1e6, 1),
            "keyed_values_bytes": keyed_batch["pixel_values"].numel() * 8,
            "fetch_with_image_s": _median_s(lambda: [stored[i] for i in range(len(rows))], args.reps),
            "fetch_without_image_s": _median_s(lambda: [no_image[i] for i in range(len(rows))], args.reps),
        })
        results[-1]["speedup"] = round(results[-1]["pixel_s"] / max(results[-1]["keyed_s"], 1e-9), 1)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
