"""Training-step levers against the per-step CPU cost, side by side on one GPU (MedGemma-4B shapes).

benchmarks/profile_train.py showed the project's step at batch 16 CPU-bound on an H100: ~0.65 s
of CPU (about 10,000 kernel launches from Python) for ~0.44 s of GPU work. That is what keeps two
GPUs at batch 16 each from doubling one GPU at batch 32 (benchmarks/ddp_bench.py). Each variant
here is ``vqatune.training.run_training`` with the project's benchmark config and one change:

- ``lazy_features``: ``train.precompute_image_features`` off (features computed inside the first
  step that shows an image, as before 2026-11-27's fourth session);
- ``compile``: ``train.compile`` (regional ``torch.compile`` of the transformer layers);
- ``no_cudnn_sdpa``: PyTorch's cuDNN attention backend off (its per-call CPU cost was ~1 ms),
  so SDPA takes the memory-efficient kernel.
- ``bf16_residual``: ``train.fp32_residual`` off (the residual stream in bf16, as before
  2026-11-27's fifth session): what the fp32 stream costs.

Steps after ``--warmup`` are timed (synchronised), so compilation is not in the number.

    source benchmarks/device_setup.sh && python benchmarks/train_levers.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = {
    "base": {},
    "lazy_features": {"precompute_image_features": False},
    "no_cudnn_sdpa": {"cudnn_sdpa": False},
    "compile": {"compile": True},
    "compile_no_cudnn_sdpa": {"compile": True, "cudnn_sdpa": False},
    "bf16_residual": {"fp32_residual": False},
    "compile_bf16_residual": {"compile": True, "fp32_residual": False},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/profile_work")
    ap.add_argument("--runs", nargs="+", default=["base@16", "lazy_features@16", "compile@16", "compile@32",
                                                  "base@32", "no_cudnn_sdpa@16"],
                    help="variant@batch, variants: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)

    import gpu_bench
    import torch

    from vqatune.training import run_training

    scale = gpu_bench.TINY if args.tiny else gpu_bench.FULL
    dev, out, work = gpu_bench.tool_setup(args.out, args.work, scale, args.tiny)
    results = {"device": dev.name, "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
               "gradient_checkpointing": args.checkpointing, "runs": {}}
    for run in args.runs:
        variant, batch = run.split("@")
        lever = {"compile": False, **VARIANTS[variant]}  # train.compile's default is on with CUDA
        cudnn = lever.pop("cudnn_sdpa", True)
        if dev.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        cfg = gpu_bench.project_train_config(scale, gradient_checkpointing=args.checkpointing,
                                             batch_size=int(batch), eval_batch_size=int(batch),
                                             max_eval_rows=int(batch), max_steps=args.steps, **lever)
        timer = gpu_bench.StepTimer()
        dev.reset()
        started = time.perf_counter()
        try:
            result = run_training(cfg, work / "model", work / "processed", None, checkpoint_dir=work / "ckpt",
                                  callbacks=[timer], resume=False)
        except Exception as err:  # a lever that fails is reported, not fatal to the others
            results["runs"][run] = {"error": f"{type(err).__name__}: {err}"[:400]}
            print(run, results["runs"][run], flush=True)
            continue
        finally:
            if dev.type == "cuda":
                torch.backends.cuda.enable_cudnn_sdp(True)
        steps = sorted(timer.times)
        timed = [s for s in steps if s > args.warmup]
        seconds = timer.times[timed[-1]] - timer.times[args.warmup]
        step_times = [round(timer.times[s] - timer.times[p], 3) for p, s in zip(steps, steps[1:])]
        results["runs"][run] = {
            "examples_per_s": round(len(timed) * int(batch) / seconds, 2),
            "step_s": round(seconds / len(timed), 4), "step_times": step_times,
            "first_steps_s": round(timer.times[args.warmup] - started, 1),
            "peak_gib": result.peak_memory_gib,
            "losses": [round(h["loss"], 4) for h in result.log_history if "loss" in h][:args.steps]}
        print(run, {k: v for k, v in results["runs"][run].items() if k != "losses"}, flush=True)
        (out / "train_levers.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "train_levers.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
