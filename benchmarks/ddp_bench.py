"""Scale out on one machine: DDP training on 1 vs N GPUs, and search workers pinned one per GPU.

Same world as benchmarks/gpu_bench.py (random-weight MedGemma-4B, Kvasir-like QA at 896 px), same
training set-up as its project run (nf4 QLoRA, sdpa, checkpointing, image cache, LoRA on the
MLP), through the train stage's own code: ``vqatune.training.run_training`` started by
``accelerate launch`` with the committed configs/accelerate/ddp.yaml, at the same global batch
and seed on 1 and on N processes. LoRA dropout is off so the two curves differ only by the order
of the gradient sums (all-reduce vs one backward); the CPU test tests/test_distributed.py shows
that difference is ~1e-7 in fp32.

Then the search: N ``stages/tune.py`` workers, each pinned to its GPU with CUDA_VISIBLE_DEVICES,
share one SQLite study until it has ``n_trials`` trials; each trial records its worker's GPU.

    source benchmarks/offline_gpu_setup.sh && python benchmarks/ddp_bench.py --out $OUT --gpus 2

``--runs`` runs variants of the training side by side (``PROCESSES:OPTION,...``): a profile of
every process (``1:profile``: where one GPU's step goes), or one training lever changed
(``1:no_compile``, ``1:lazy_features``, ``1:no_cudnn_sdpa``, ``1:bf16_stream``, ...; see
``--help``). Writes ``ddp_bench.json`` and ``ddp_bench.md``. ``--plot results.json`` draws the
two loss curves to a PNG (run where matplotlib is installed). ``--tiny`` runs it all on CPU
processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
log = logging.getLogger("ddp_bench")

# 30 steps: the one- and two-GPU runs (each with ~1.5 min of compilation first) fit one device
# call of 10 minutes; the session-5 run with 40 steps and a bigger world did not.
TRAIN_STEPS = {"full": 30, "tiny": 6}
TIMED_FROM = {"full": 6, "tiny": 1}
# ``:profile`` runs: torch.profiler over these optimizer steps on every process; the timed window
# then ends before them (the profiler slows the steps it records).
PROFILE_STEPS = {"full": (23, 26), "tiny": (4, 5)}
RUN_OPTIONS = ("profile", "curve", "bf16_stream", "gc_unfrozen", "ddp_optimizer", "no_compile", "lazy_features",
               "no_cudnn_sdpa")
SEARCH_TRIALS = {"full": 4, "tiny": 2}


# --------------------------------------------------------------------------- one training run

def profiler_callback(first: int, last: int, device_type: str):
    """Trainer callback: ``torch.profiler`` from optimizer step ``first`` through ``last``."""
    import torch
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        def __init__(self):
            self.prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first - 1 and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if device_type == "cuda" else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == last and self.prof is not None:
                self.prof.__exit__(None, None, None)

    return _Profile()


def profile_summary(prof, device_type: str, steps: int) -> dict:
    """Per-step CPU and device time of the profiled steps, and the top operators of each."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()
    device_key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    # Kernels only: an operator (aten::mm, nccl:all_reduce) also carries its kernels' device
    # time, so summing every event counts each kernel twice (the table's own total does this);
    # record_function regions (DistributedDataParallel.forward, record_param_comms) show on the
    # device side too, as user annotations spanning their kernels.
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and not e.key.startswith(("nccl:", "record_param_comms", "DistributedDataParallel"))]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    nccl_us = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower())
    return {"steps": steps, "device_kernel_s_per_step": round(kernel_us / 1e6 / steps, 4),
            "nccl_kernel_s_per_step": round(nccl_us / 1e6 / steps, 4),
            "top_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=30),
            "top_device": averages.table(sort_by=device_key, row_limit=30)}


def train_one(work: Path, name: str, tiny: bool, result_path: Path, checkpointing: bool = True,
              compile: bool = True, accumulation: int = 1, options: tuple[str, ...] = (),
              batch: int | None = None) -> None:
    """Inside ``accelerate launch``: the gpu_bench project run, global batch fixed, dropout off.

    The global batch is ``batch`` (default: gpu_bench's) x ``accumulation``; the train stage's own rule
    (``distributed.split_global_batch``) decides what each process runs. ``options``: ``profile``
    (torch.profiler over PROFILE_STEPS on every process), ``bf16_stream`` (train.fp32_residual off),
    ``gc_unfrozen`` (without the training's ``gc.freeze()`` after its first step), ``ddp_optimizer``
    (Dynamo's DDPOptimizer on, as before 2026-11-28: it cut each compiled layer at DDP's bucket
    edges), ``curve`` (a loss logged and a device sync at every step, as every run before
    2026-11-28 did; otherwise the stage's logging interval, and the timer syncs only at the timed
    window's edges: a sync per optimizer step costs the DDP run, whose step is half one GPU's rows,
    twice as often); training levers, one changed from the stage's default: ``no_compile``
    (train.compile off: no regional torch.compile of the layers), ``lazy_features``
    (train.precompute_image_features off: each image's features computed in the first step that
    shows it), ``no_cudnn_sdpa`` (PyTorch's cuDNN attention backend off, so SDPA takes the
    memory-efficient kernel; CUDA only)."""
    import gpu_bench
    import torch

    from vqatune.training import distributed
    from vqatune.training.config import TrainConfig
    from vqatune.training.run import run_training

    if "ddp_optimizer" in options:  # Dynamo's DDPOptimizer back on (speed turns it off)
        import torch._dynamo

        from vqatune.models import compile as speed
        compile_modules = speed._compile_modules

        def with_ddp_optimizer(*args, **kwargs):
            compiled = compile_modules(*args, **kwargs)
            torch._dynamo.config.optimize_ddp = True
            return compiled
        speed._compile_modules = with_ddp_optimizer
    if "gc_unfrozen" in options:  # the training without its gc.freeze() after the first step
        from transformers import TrainerCallback

        from vqatune.models import compile as speed
        speed.freeze_gc_after_warmup = TrainerCallback  # a callback that does nothing
    gpu_bench.DEV = gpu_bench.Device()
    if gpu_bench.DEV.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "no_cudnn_sdpa" in options:
            torch.backends.cuda.enable_cudnn_sdp(False)
    size = "tiny" if tiny else "full"
    scale = gpu_bench.TINY if tiny else gpu_bench.FULL
    if batch:
        scale = dataclasses.replace(scale, train_batch=batch)
    cfg = gpu_bench.project_train_config(scale, lora_dropout=0.0,
                                         max_steps=TRAIN_STEPS[size], gradient_checkpointing=checkpointing,
                                         # None: the stage's default (on with CUDA)
                                         compile=None if compile and "no_compile" not in options else False,
                                         gradient_accumulation_steps=accumulation,
                                         fp32_residual="bf16_stream" not in options,
                                         precompute_image_features="lazy_features" not in options)
    first = TIMED_FROM[size]
    profiled = PROFILE_STEPS[size] if "profile" in options else None
    per_step = "curve" in options
    if not per_step:
        # The train stage's default interval (three losses in the tiny run's six steps).
        cfg.logging_steps = min(TrainConfig.logging_steps, TRAIN_STEPS[size] // 3)
    last = profiled[0] - 2 if profiled else TRAIN_STEPS[size]
    sync_at = {first, last} | ({profiled[0] - 1, profiled[1]} if profiled else set())
    timer = gpu_bench.StepTimer(None if per_step else sync_at)
    compiles = CompileCounter()
    gc_pauses = GcPauses()
    callbacks = [timer, compiles, gc_pauses]
    if profiled:
        callbacks.append(profiler_callback(*profiled, gpu_bench.DEV.type))
    gpu_bench.DEV.reset()
    result = run_training(cfg, work / "model", work / "processed", work / f"adapter_{name}",
                          checkpoint_dir=work / f"ckpt_{name}", callbacks=callbacks, resume=False)
    profile = None
    if profiled:
        profile = profile_summary(callbacks[-1].prof, gpu_bench.DEV.type, profiled[1] - profiled[0] + 1)
        profile["wall_s_per_step"] = round((timer.times[profiled[1]] - timer.times[profiled[0] - 1])
                                           / profile["steps"], 4)
        rank = os.environ.get("RANK", "0")
        result_path.with_name(f"{result_path.stem}_profile_rank{rank}.json").write_text(json.dumps(profile, indent=2))
    timed = [s for s in sorted(timer.times) if first < s <= last]
    # Steps in which any process compiled (a recompile is a one-off stall of 1-4 s, at a step that
    # depends on the batch, and every process waits for it): left out of the steady-state
    # figures, kept in examples_per_s.
    compiled = {s for s in timed if compiles.frames.get(s, 0) > compiles.frames.get(s - 1, 0)}
    if distributed.world_size() > 1:
        import torch.distributed as dist

        gathered = [None] * distributed.world_size()
        dist.all_gather_object(gathered, sorted(compiled))
        compiled = set().union(*map(set, gathered))
    compiled = sorted(compiled)
    if not distributed.is_main_process():
        return
    seconds = timer.times[timed[-1]] - timer.times[first]
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    per_process, steps = distributed.split_global_batch(cfg.batch_size, cfg.gradient_accumulation_steps,
                                                        distributed.world_size())
    ordered = sorted(timer.times)
    step_s = {s: round(timer.times[s] - timer.times[p], 3) for p, s in zip(ordered, ordered[1:])}
    steady = [step_s[s] for s in timed if s not in compiled]
    logged = [h for h in result.log_history if "loss" in h and "eval_loss" not in h]
    result_path.write_text(json.dumps({
        "processes": distributed.world_size(), "device": result.device,
        "examples_per_s": len(timed) * global_batch / seconds, "timed_steps": f"{first + 1}..{timed[-1]}",
        "median_step_s": statistics.median(step_s[s] for s in timed),
        # False: steps between the window's edges are not synchronised (their times are the CPU's
        # view; the window's total is exact).
        "per_step_sync": per_step,
        "steps_with_compilation": compiled,
        # Python's garbage collector's pauses in the main process, per step (>= 10 ms only).
        "gc_s": {s: round(t, 3) for s, t in sorted(gc_pauses.seconds.items()) if t >= 0.01},
        "steady_examples_per_s": len(steady) * global_batch / sum(steady) if steady else None,
        "global_batch": global_batch, "gradient_checkpointing": checkpointing,
        "compile": result.compiled_layers > 0,
        "precompute_image_features": cfg.precompute_image_features, "per_process_batch": per_process,
        "accumulation_steps": steps, "step_s": step_s,
        "peak_gib_main_process": result.peak_memory_gib, "precision": result.precision,
        "losses": [h["loss"] for h in logged], "loss_steps": [h["step"] for h in logged],
        "logging_steps": cfg.logging_steps, "eval_loss": result.eval_loss, "steps": result.steps,
        "options": list(options), "fp32_residual": result.fp32_residual,
    }, indent=2) + "\n")


# --------------------------------------------------------------------------- the driver

def CompileCounter():
    """Trainer callback: Dynamo's count of compiled frames after each optimizer step."""
    from transformers import TrainerCallback

    class _Count(TrainerCallback):
        def __init__(self):
            self.frames = {}

        def on_step_end(self, args, state, control, **kwargs):
            from torch._dynamo.utils import counters

            self.frames[state.global_step] = counters["frames"]["ok"]

    return _Count()


def GcPauses():
    """Trainer callback: seconds the garbage collector paused this process in each optimizer step
    (gc.callbacks), to tell a collection from other one-off stalls."""
    import gc

    from transformers import TrainerCallback

    class _Gc(TrainerCallback):
        def __init__(self):
            self.seconds, self._step, self._start = {}, 0, None
            gc.callbacks.append(self._on_gc)

        def _on_gc(self, phase, info):
            if phase == "start":
                self._start = time.perf_counter()
            elif self._start is not None:
                step = self._step + 1  # the step in progress
                self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - self._start
                self._start = None

        def on_step_end(self, args, state, control, **kwargs):
            self._step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            gc.callbacks.remove(self._on_gc)

    return _Gc()


def parse_options(text: str) -> tuple[str, ...]:
    """``"profile,bf16_stream"`` -> ("profile", "bf16_stream"); unknown options refused."""
    options = tuple(o for o in text.split(",") if o)
    unknown = [o for o in options if o not in RUN_OPTIONS]
    if unknown:
        raise SystemExit(f"unknown run option(s) {', '.join(unknown)}: choose options from {', '.join(RUN_OPTIONS)}")
    return options


def parse_run(spec: str) -> tuple[int, tuple[str, ...]]:
    """``"2"`` or ``"2:profile,bf16_stream"`` -> (processes, options)."""
    processes, _, opts = spec.partition(":")
    if not processes.isdigit():
        raise SystemExit(f"run {spec!r}: expected PROCESSES[:OPTION,...] with options from {', '.join(RUN_OPTIONS)}")
    return int(processes), parse_options(opts)


def launch_training(work: Path, processes: int, tiny: bool, env: dict, checkpointing: bool = True,
                    compile: bool = True, accumulation: int = 1, options: tuple[str, ...] = (),
                    batch: int | None = None) -> dict:
    from vqatune.training.distributed import launch_command

    tag = "_".join([str(processes), *options])
    result = work / f"train_{tag}.json"
    command = launch_command(Path(__file__), ["_train", "--work", str(work), "--name", f"p{tag}",
                                              "--result", str(result)] + (["--tiny"] if tiny else [])
                             + ([] if checkpointing else ["--no-checkpointing"]) + ([] if compile else ["--no-compile"])
                             + ["--accumulation", str(accumulation)] + (["--batch", str(batch)] if batch else [])
                             + (["--options", ",".join(options)] if options else []),
                             processes, config_file=REPO / "configs/accelerate/ddp.yaml")
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    out = json.loads(result.read_text())
    out["wall_s"] = round(time.perf_counter() - start, 1)
    profiles = sorted(work.glob(f"train_{tag}_profile_rank*.json"))
    if profiles:
        out["profile"] = {p.stem.rsplit("_rank", 1)[1]: json.loads(p.read_text()) for p in profiles}
    return out


def search_params(work: Path, tiny: bool) -> Path:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"].update({"storage": f"sqlite:///{work / 'study.db'}", "n_trials": SEARCH_TRIALS["tiny" if tiny else "full"],
                           "sampler_startup_trials": 2, "pruner": "none", "max_steps": 4 if tiny else 8,
                           "evals_per_trial": 1, "eval_rows": 8 if tiny else 16, "study_name": "ddp-bench"})
    params["train"].update({"batch_size": 4 if tiny else 16, "eval_batch_size": 8 if tiny else 16,
                            "cache_image_features": True, "epochs": 1, "max_steps": -1,
                            "optimizer": "adamw_torch"})
    params["train"]["lora"].update({"target_modules": "mlp", "vision_tower": False, "modules_to_save": []})
    # The search space without gradient accumulation: a trial of 8 steps x 16 accumulations would
    # be the whole split; the rest is the committed space (tiny-model learning rates; harmless).
    params["tune"]["search_space"].pop("gradient_accumulation_steps", None)
    path = work / "tune_params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_search_workers(work: Path, gpus: int, tiny: bool, env: dict) -> dict:
    """``gpus`` workers of stages/tune.py, worker i on GPU i, one SQLite study; worker 0 writes."""
    params = search_params(work, tiny)
    procs = []
    start = time.perf_counter()
    for worker in range(gpus):
        worker_env = {**env, "CUDA_VISIBLE_DEVICES": str(worker)} if not tiny else dict(env)
        command = [sys.executable, str(REPO / "stages/tune.py"), "--model", str(work / "model"), "--data",
                   str(work / "processed"), "--params", str(params), "--worker", str(worker),
                   "--best-params", str(work / f"best_{worker}.json"), "--metrics", str(work / f"tune_{worker}.json"),
                   "--plots", str(work / f"tune_plots_{worker}")]
        procs.append(subprocess.Popen(command, cwd=REPO, env=worker_env))
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - start

    import optuna

    storage = f"sqlite:///{work / 'study.db'}"
    trials = []
    for name in optuna.get_all_study_names(storage):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            trials.append({"number": t.number, "state": t.state.name, "value": t.value,
                           "device": t.user_attrs.get("device"), "pid": (t.user_attrs.get("worker") or {}).get("pid"),
                           "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                           if t.datetime_complete and t.datetime_start else None})
    by_device: dict[str, int] = {}
    for t in trials:
        if t["state"] in ("COMPLETE", "PRUNED"):
            by_device[t["device"]] = by_device.get(t["device"], 0) + 1
    return {"workers": gpus, "exit_codes": codes, "wall_s": round(seconds, 1), "trials": trials,
            "finished_by_device": by_device,
            "n_trials": SEARCH_TRIALS["tiny" if tiny else "full"],
            "finished": sum(by_device.values()),
            "outputs_written_by_worker_0": (work / "best_0.json").exists()}


def compare_curves(one: list[float], many: list[float]) -> dict:
    diffs = [abs(a - b) for a, b in zip(one, many)]
    return {"steps": len(diffs), "mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs),
            "mean_loss": sum(one) / len(one)}


def write_report(results: dict, out: Path) -> None:
    """The table of runs; with a one- and an N-process run, their scaling and curves. Without
    (one GPU's levers, or N-process variants only), each run against the first run's rate."""
    runs = results["training"]
    one_key = next((k for k, r in runs.items() if r["processes"] == 1), next(iter(runs)))
    one, scaling = runs[one_key], "scaling" in results
    lines = [f"Card: {results['device']} x {results['gpus']} (one host). MedGemma-4B shapes, random weights, "
             f"896 px; nf4 QLoRA, sdpa, gradient checkpointing {'on' if one.get('gradient_checkpointing', True) else 'off'}, "
             f"image cache, LoRA on the MLP, global batch {one['global_batch']}.",
             "", f"| processes | per-process batch x accumulation | examples/s | {'scaling' if scaling else 'vs ' + one_key} | median s/step | "
                 "examples/s without compiling steps (steps left out) | peak GiB (main) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for key in results["training"]:
        r = results["training"][key]
        steady = r.get("steady_examples_per_s")
        lines.append(f"| {key} | {r['per_process_batch']} x {r.get('accumulation_steps', 1)} | "
                     f"{r['examples_per_s']:.2f} | "
                     f"{r['examples_per_s'] / one['examples_per_s']:.2f}x | {r['median_step_s']:.3f} | "
                     + (f"{steady:.2f} ({r['steps_with_compilation']})" if steady else "-")
                     + f" | {r['peak_gib_main_process']:.1f} | {r['wall_s']} |")
    logging = one.get("logging_steps", 1)
    lines += ["", (f"Timing: the timer syncs the device only at the window's edges; losses logged every "
                   f"{logging} steps (the stage's interval), so the median column is the CPU's view."
                   if not one.get("per_step_sync", True) else
                   "Timing: a device sync and a logged loss at every step (the `curve` option).")]
    c = results.get("curves")
    if scaling and c:
        lines += ["", f"Loss curves over {c['steps']} logged losses, every {logging} step(s) (same batches, dropout off): "
                      f"mean |1 - {results['gpus']}| "
                      f"{c['mean_abs_diff']:.4f}, max {c['max_abs_diff']:.4f} (mean loss {c['mean_loss']:.3f}).",
                  f"Scaling {results['scaling']:.2f}x (target 1.8x): {'met' if results['scaling'] >= 1.8 else 'NOT met'}; "
                  f"medians of the step times {results['scaling_medians']:.2f}x"
                  + (f"; steps without a compilation {results['scaling_steady']:.2f}x." if "scaling_steady" in results else ".")]
    s = results.get("search")
    if s:
        lines += ["", f"Search: {s['workers']} workers (one per GPU, CUDA_VISIBLE_DEVICES) on one SQLite study: "
                      f"{s['finished']} of {s['n_trials']} trials finished in {s['wall_s']} s; by device: "
                      f"{s['finished_by_device']}; exit codes {s['exit_codes']}."]
    text = "\n".join(lines) + "\n"
    (out / "ddp_bench.md").write_text(text)
    print(text)


def plot(results_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    runs = results["training"].values()
    for processes, style in ((1, "-o"), (results["gpus"], "--x")):
        r = next(r for r in runs if r["processes"] == processes)
        ax.plot(r.get("loss_steps") or range(1, len(r["losses"]) + 1), r["losses"], style, markersize=3,
                label=f"{r['processes']} GPU(s), batch {r['per_process_batch']} per process")
    ax.set_xlabel("optimizer step (global batch %d)" % r["global_batch"])
    ax.set_ylabel("training loss")
    ax.set_title(f"DDP vs one GPU, same batches ({results['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "_train"])
    ap.add_argument("--out", help="folder for ddp_bench.json / .md")
    ap.add_argument("--work", help="scratch folder (model, data, adapters); default: <out>/../ddp_work")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="builtin tiny model, CPU processes (smoke run)")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="gradient checkpointing off (more memory, no recompute)")
    ap.add_argument("--no-compile", action="store_true",
                    help="train.compile off (its default, null, compiles the layers with CUDA)")
    ap.add_argument("--accumulation", type=int, default=2,
                    help="one GPU's accumulation steps: the global batch is --batch x this (the stage "
                         "cuts accumulation first on N GPUs); 1 halves the per-process batch instead")
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per micro-batch on one GPU (default: gpu_bench's, 32 at full scale); "
                         "the world grows to hold all steps in one epoch")
    ap.add_argument("--runs", nargs="+", metavar="PROCESSES[:OPTIONS]",
                    help="training runs in order (default: 1 and --gpus); options, comma-separated: "
                         "profile (torch.profiler over a few steps on every process), curve (a "
                         "device sync and a logged loss at every step), bf16_stream "
                         "(train.fp32_residual off), gc_unfrozen (no gc.freeze() after step 1), ddp_optimizer "
                         "(Dynamo's DDPOptimizer on: layers cut at DDP's buckets), no_compile (train.compile "
                         "off), lazy_features (train.precompute_image_features off), no_cudnn_sdpa (cuDNN "
                         "attention off); e.g. --runs 2:profile 2:bf16_stream 1:profile, or one GPU's "
                         "levers: --gpus 1 --runs 1 1:no_compile 1:lazy_features")
    ap.add_argument("--options", default="", help=argparse.SUPPRESS)
    ap.add_argument("--name")
    ap.add_argument("--result")
    ap.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"), help="draw the loss curves and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.plot:
        plot(Path(args.plot[0]), Path(args.plot[1]))
        return 0
    if args.mode == "_train":
        train_one(Path(args.work), args.name, args.tiny, Path(args.result), not args.no_checkpointing, not args.no_compile,
                  args.accumulation, parse_options(args.options), args.batch)
        return 0

    import gpu_bench
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or "/tmp/ddp_work")
    work.mkdir(parents=True, exist_ok=True)
    # Every timed step inside one epoch, as on a real split (Kvasir-VQA: ~800 steps of 64 per
    # epoch). An epoch's first step waits for the loader's first batches (~3.5 s on the H100 box),
    # and its ragged last batch is split differently on 1 and N processes (accelerate pads the
    # last round with rows from the start), which gpu_bench's 800-row world crossed three times
    # in 40 steps of 64 (results/ddp_bench_h100x2_accumulation.md: curves apart from step 13).
    # 340 images: ~2,700 train rows (~9 QA per image) for 30 steps of 64.
    scale = gpu_bench.TINY if args.tiny else dataclasses.replace(gpu_bench.FULL, images=340, test_size=0.1)
    from vqatune.training.config import TrainConfig

    kept = 1 - TrainConfig.eval_fraction  # share of the train rows the training trains on
    if args.batch:
        scale = dataclasses.replace(scale, train_batch=args.batch)
    if not args.tiny:
        # ~8.2 train rows per image at test_size 0.1 (340 images: 2,779 rows), of which the
        # training holds out train.eval_fraction's images for its eval loss.
        needed = TRAIN_STEPS["full"] * scale.train_batch * args.accumulation
        scale = dataclasses.replace(scale, images=max(scale.images, math.ceil(needed * 1.05 / kept * 340 / 2779)))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "gpus": args.gpus, "torch": torch.__version__, "scale": dataclasses.asdict(scale)}

    def save():
        (out / "ddp_bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    if not (work / "model").exists():
        _, _, results["world"] = gpu_bench.build_world(work, scale, args.tiny)
    from datasets import load_from_disk

    rows = load_from_disk(str(work / "processed"))["train"].num_rows
    needed = TRAIN_STEPS["tiny" if args.tiny else "full"] * (scale.train_batch * args.accumulation)
    results["train_rows"] = rows
    if rows * kept < needed:  # less the images held out for the eval loss
        log.warning("~%d training rows < %d: the timed steps cross an epoch boundary", rows * kept, needed)
    results["training"] = {}
    for spec in args.runs or ["1", str(args.gpus)]:
        processes, options = parse_run(spec)
        run = launch_training(work, processes, args.tiny, env, not args.no_checkpointing, not args.no_compile,
                              args.accumulation, options, args.batch)
        results["training"][spec] = run
        save()
        log.info("%s: %s", spec, {k: v for k, v in run.items() if k not in ("losses", "profile")})
        for rank, prof in run.get("profile", {}).items():
            log.info("%s rank %s: wall %.3f s/step, device kernels %.3f s/step (nccl %.3f)\n%s\n%s", spec, rank,
                     prof["wall_s_per_step"], prof["device_kernel_s_per_step"], prof["nccl_kernel_s_per_step"],
                     prof["top_cpu"], prof["top_device"])
    one = next((r for r in results["training"].values() if r["processes"] == 1), None)
    many = next((r for r in results["training"].values() if r["processes"] == args.gpus), None)
    if one is None or many is None or args.gpus == 1:  # variants side by side, no scaling
        save()
        write_report(results, out)
        return 0
    results["scaling"] = many["examples_per_s"] / one["examples_per_s"]
    results["scaling_medians"] = one["median_step_s"] / many["median_step_s"]
    if one["steady_examples_per_s"] and many["steady_examples_per_s"]:
        results["scaling_steady"] = many["steady_examples_per_s"] / one["steady_examples_per_s"]
    results["curves"] = compare_curves(one["losses"], many["losses"])
    save()
    if not args.skip_search:
        results["search"] = run_search_workers(work, args.gpus, args.tiny, env)
        save()
    write_report(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
