"""Where the project's generation time goes on MedGemma-4B shapes (one GPU), and what the levers
left in ``model.generate`` are worth.

The GPU benchmark spent 49.9 of 55.6 s inside ``model.generate`` for 2,304 answers (batch 192,
bf16, unmerged LoRA, dynamic KV cache): ~160 ms per forward, far above what the weights, the KV
cache and the FLOPs of one decoding step need. This measures, on the evaluate stage's own path
(``vqatune.generation.generate_answers``, image features cached, pixels made once):

- prefill vs decoding: the same rows with 1 and with ``--new-tokens`` new tokens;
- adapter on / off (peft's LoRA wrappers) / merged into the bf16 weights;
- batch size;
- ``torch.profiler`` over one batch: top operators by self CPU time and by device time, and the
  share of the wall time the GPU was busy.

    source benchmarks/device_setup.sh && python benchmarks/profile_generate.py --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/profile_work")
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=25)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)

    import gpu_bench
    import torch

    from vqatune.generation import generate_answers
    from vqatune.model import LoraSettings, attach_lora, load_base_model, load_processor
    from vqatune.speed import ImagePixelCache, maybe_install_image_feature_cache

    scale = dataclasses.replace(gpu_bench.TINY if args.tiny else gpu_bench.FULL, gen_rows=args.rows)
    dev, out, work = gpu_bench.tool_setup(args.out, args.work, scale, args.tiny)
    results: dict = {"device": dev.name, "rows": args.rows, "batch": args.batch, "new_tokens": args.new_tokens}

    def save():
        (out / "profile_generate.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    # The evaluate stage's model: bf16 base, the project's LoRA (mlp, r16) with non-zero B so
    # the adapter really changes the function, image features cached.
    processor = load_processor(work / "model")
    base = load_base_model(work / "model", quantization="none", dtype="bfloat16" if dev.type == "cuda" else "float32",
                           attn_implementation="sdpa", device=dev.type)
    model = attach_lora(base, LoraSettings())
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    model.eval()
    maybe_install_image_feature_cache(model, training=False)
    test, messages, images = gpu_bench.evaluation_inputs(work / "processed", scale)
    rows = len(messages["none"])
    msgs, keys = messages["none"], test["img_id"]
    pixel_cache = ImagePixelCache()
    generate_answers(model, processor, msgs[:2], [images[0], images[1]], batch_size=2, max_new_tokens=2)

    def timed(label, *, batch=args.batch, new_tokens=args.new_tokens, context=contextlib.nullcontext):
        stats = {}
        dev.sync()
        t = time.perf_counter()
        with context():
            answers = generate_answers(model, processor, msgs, images, batch_size=batch, max_new_tokens=new_tokens,
                                       image_keys=keys, pixel_cache=pixel_cache, stats=stats)
        dev.sync()
        seconds = time.perf_counter() - t
        entry = {"seconds": round(seconds, 3), "examples_per_s": round(rows / seconds, 2),
                 "generate_s": round(stats["generate_s"], 3), "batches": stats["batches"],
                 "generate_s_per_batch": round(stats["generate_s"] / stats["batches"], 4),
                 "peak_gib": dev.peak_gib()}
        results.setdefault("runs", {})[label] = entry
        print(label, entry, flush=True)
        save()
        return answers

    dev.reset()
    timed("tuned_prefill_only", new_tokens=1)  # also fills the pixel and feature caches
    timed("tuned_prefill_only", new_tokens=1)
    tuned = timed("tuned")
    timed("base", context=model.disable_adapter)
    runs = results["runs"]
    per_step = (runs["tuned"]["generate_s_per_batch"] - runs["tuned_prefill_only"]["generate_s_per_batch"]) \
        / max(args.new_tokens - 1, 1)
    results["decode_step_s"] = round(per_step, 4)
    results["prefill_s_per_batch"] = runs["tuned_prefill_only"]["generate_s_per_batch"]

    # Profile one batch of the tuned model.
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    n = min(args.batch, rows)
    dev.sync()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        generate_answers(model, processor, msgs[:n], [images[i] for i in range(n)], batch_size=n,
                         max_new_tokens=8, image_keys=keys[:n], pixel_cache=pixel_cache)
        dev.sync()
        wall = time.perf_counter() - t
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages) / 1e6 if dev.type == "cuda" else None
    results["profile"] = {"wall_s": round(wall, 3), "device_busy_s": busy,
                          "top_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=30),
                          "top_device": averages.table(sort_by=device_key, row_limit=30)}
    save()
    print(results["profile"]["top_cpu"])
    print(results["profile"]["top_device"])

    # Levers: merged adapter, larger batch.
    model.merge_adapter()
    merged = timed("tuned_merged")
    results["merged_identical_share"] = sum(a == b for a, b in zip(merged, tuned)) / rows
    model.unmerge_adapter()
    for batch in (96, 384):
        if batch <= rows:
            timed(f"tuned_batch_{batch}", batch=batch)
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
