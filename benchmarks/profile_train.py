"""Where a training step of the project's path goes on MedGemma-4B shapes (one GPU).

The DDP benchmark showed a per-step cost that does not shrink with the batch (batch 16: 0.68 s,
batch 32: 0.92 s per step without checkpointing, against 0.37 s / 0.72 s in a plain loop of the
same model, benchmarks/results/proto_levers_h100.json). This measures, in one run:

- the data loader alone (the train collator over the prepared 896 px rows, N workers);
- ``run_training`` with ``torch.profiler`` over three steady steps: the top operators by
  self CPU time and by device time, and the step times.

    source benchmarks/device_setup.sh && python benchmarks/profile_train.py --out $OUT
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)

    import gpu_bench
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback

    from vqatune.collate import AnswerOnlyCollator
    from vqatune.model import load_processor
    from vqatune.training import run_training

    scale = dataclasses.replace(gpu_bench.TINY if args.tiny else gpu_bench.FULL, images=60 if not args.tiny else 12)
    dev, out, work = gpu_bench.tool_setup(args.out, args.work, scale, args.tiny)
    results = {"device": dev.name, "batch": args.batch}

    # The data loader alone.
    processor = load_processor(work / "model")
    train = load_from_disk(str(work / "processed"))["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                         collate_fn=AnswerOnlyCollator(processor), num_workers=scale.workers,
                                         pin_memory=dev.type == "cuda")
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for _ in range(min(12, len(loader) - 1)):
        next(it)
        n += 1
    results["loader_batches_per_s"] = n / (time.perf_counter() - t)
    results["loader_examples_per_s"] = results["loader_batches_per_s"] * args.batch
    print("loader", results, flush=True)
    del it, loader

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.times = None, {}

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 5:
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            dev.sync()
            self.times[state.global_step] = time.perf_counter()
            if state.global_step == 8 and self.prof is not None:
                self.prof.__exit__(None, None, None)

    cfg = gpu_bench.project_train_config(scale, gradient_checkpointing=False, batch_size=args.batch,
                                         eval_batch_size=args.batch, max_eval_rows=args.batch, max_steps=9)
    prof = Profile()
    run_training(cfg, work / "model", work / "processed", None, checkpoint_dir=work / "ckpt",
                 callbacks=[prof], resume=False)
    steps = sorted(prof.times)
    results["step_s"] = {s: round(prof.times[s] - prof.times[p], 3) for p, s in zip(steps, steps[1:])}
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    averages = prof.prof.key_averages()
    results["top_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    results["top_device"] = averages.table(sort_by=key, row_limit=25)
    (out / "profile_train.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["step_s"]), flush=True)
    print(results["top_cpu"])
    print(results["top_device"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
