"""The GPU benchmark's code path, end to end on the tiny model on CPU, so it cannot rot.

Same functions as the device run (benchmarks/gpu_bench.py): the guide's recipe, the loss-parity
runs, ``run_training``, the guide's one-at-a-time generation and ``generate_answers`` over the six
configurations; only the sizes (Scale TINY) and the device differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path):
    import gpu_bench

    gpu_bench.main(["--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    results = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert results["device"] == "cpu"
    for key in ("train_speedup", "eval_speedup"):
        assert results[key] > 0
    tr, ev = results["training"], results["evaluation"]
    assert tr["guide"]["examples_per_s"] > 0 and tr["project_default"]["examples_per_s"] > 0
    # the project run went through run_training with the image cache, and its loss fell
    losses = tr["project_default"]["losses"]
    assert len(losses) == gpu_bench.TINY.train_steps and losses[-1] < losses[0]
    assert ev["project"]["examples"] == 6 * gpu_bench.TINY.gen_rows
    # each distinct test image went through the vision tower once, for all six configurations
    assert ev["project"]["vision_forwards"] < ev["project"]["examples"] / 6
    # ... and through the processor once: the other rows and configurations reused its pixels
    timing = ev["project"]["timing"]
    assert timing["images_processed"] == ev["project"]["vision_forwards"]
    assert timing["images_processed"] + timing["images_reused"] == ev["project"]["examples"]
    assert timing["generate_s"] > 0
    # parity: the same batches give the same curve within reseeding noise (fp32 on CPU: equal),
    # and batched answers equal one-at-a-time answers
    parity = results["parity"]
    assert len(parity["training"]["guide"]) == len(parity["training"]["project"]) == gpu_bench.TINY.parity_steps
    assert parity["training"]["within_noise"]
    # the upcast variant (the guide's fp32 upcast on the project's path) ran on the same batches
    assert len(parity["training"]["project_fp32_upcast"]) == gpu_bench.TINY.parity_steps
    assert parity["generation"]["share_identical"] == 1.0
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "train_speedup" in table and "| train: guide recipe" in table


def _run(script: str, *args: str) -> None:
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(BENCH / script), "--tiny", *args], check=True, env=env,
                   cwd=BENCH.parent, timeout=600)


def test_profilers_and_the_lever_script_run_on_the_tiny_model(tmp_path):
    """The device-session tools (profiles, training levers) on the tiny model on CPU."""
    work = str(tmp_path / "work")
    _run("train_levers.py", "--out", str(tmp_path / "levers"), "--work", work, "--runs", "base@2",
         "lazy_features@2", "--steps", "3", "--warmup", "1")
    levers = json.loads((tmp_path / "levers" / "train_levers.json").read_text())
    assert set(levers["runs"]) == {"base@2", "lazy_features@2"}
    for run in levers["runs"].values():
        assert "error" not in run and run["examples_per_s"] > 0 and len(run["losses"]) == 3
    # the same batches either way: precomputed features are the features the steps compute, up to
    # float rounding (the vision tower sees other batch compositions)
    assert levers["runs"]["base@2"]["losses"] == pytest.approx(levers["runs"]["lazy_features@2"]["losses"], rel=1e-3)

    _run("profile_generate.py", "--out", str(tmp_path / "gen"), "--work", work, "--rows", "4", "--batch", "2",
         "--new-tokens", "3")
    gen = json.loads((tmp_path / "gen" / "profile_generate.json").read_text())
    assert {"tuned", "base", "tuned_merged", "tuned_prefill_only"} <= set(gen["runs"])
    assert gen["merged_identical_share"] == 1.0 and "aten::" in gen["profile"]["top_cpu"]

    _run("profile_train.py", "--out", str(tmp_path / "train"), "--work", work, "--batch", "2")
    train = json.loads((tmp_path / "train" / "profile_train.json").read_text())
    assert train["loader_examples_per_s"] > 0 and train["step_s"] and "aten::" in train["top_cpu"]


def test_ddp_bench_runs_its_variants_on_cpu_processes(tmp_path):
    """benchmarks/ddp_bench.py on two CPU processes: the run specs, the profile of every process,
    the fp32-stream switch, and the timed window that ends before the profiled steps."""
    import ddp_bench

    out = tmp_path / "out"
    _run("ddp_bench.py", "--out", str(out), "--work", str(tmp_path / "work"), "--gpus", "2", "--skip-search",
         "--runs", "1", "2:profile", "--batch", "2")
    results = json.loads((out / "ddp_bench.json").read_text())
    one, two = results["training"]["1"], results["training"]["2:profile"]
    assert (one["processes"], two["processes"]) == (1, 2) and two["options"] == ["profile"]
    # --batch 2 with the default accumulation 2: global 4, 2 x 2 on one process, 2 on each of two.
    assert one["global_batch"] == two["global_batch"] == 4
    assert (one["per_process_batch"], one["accumulation_steps"]) == (2, 2) and two["per_process_batch"] == 2
    # Nothing compiles on CPU: every timed step is a steady one.
    assert one["steps_with_compilation"] == [] and one["steady_examples_per_s"] > 0 and one["median_step_s"] > 0
    assert isinstance(one["gc_s"], dict) and all(t >= 0.01 for t in one["gc_s"].values())
    assert "profile" not in one and set(two["profile"]) == {"0", "1"}
    first, last = ddp_bench.PROFILE_STEPS["tiny"]
    for prof in two["profile"].values():
        assert prof["steps"] == last - first + 1 and prof["wall_s_per_step"] > 0
        assert "aten::" in prof["top_cpu"]
    assert two["timed_steps"].endswith(f"..{first - 2}")  # the window stops before the profiled steps
    assert results["curves"]["max_abs_diff"] < 1e-3      # same batches, dropout off: the same curve
    assert "| 2:profile | 2 x 1 |" in (out / "ddp_bench.md").read_text()
    with pytest.raises(SystemExit, match="options from"):
        ddp_bench.parse_run("2:fast")
    assert ddp_bench.parse_run("2:profile,bf16_stream") == (2, ("profile", "bf16_stream"))


def test_collate_bench_compares_the_two_collators_on_the_same_rows():
    """benchmarks/collate_bench.py (pixel vs image-key collation) on the tiny processor."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(BENCH / "collate_bench.py"), "--rows", "4", "--reps", "1",
                          "--sizes", "0"], check=True, env=env, cwd=BENCH.parent, timeout=600,
                         capture_output=True, text=True).stdout
    (result,) = json.loads(out.strip().splitlines()[-1])["results"]
    # the script asserts the token tensors equal; the keyed batch carries 2 int64 per row
    assert result["keyed_values_bytes"] == 4 * 2 * 8
    assert result["pixel_values_mb"] == round(4 * 3 * result["image_px"] ** 2 * 4 / 1e6, 1)
    assert result["pixel_s"] > 0 and result["keyed_s"] > 0


def test_ddp_bench_gc_pauses_are_charged_to_the_step_in_progress():
    import gc

    import ddp_bench

    pauses = ddp_bench.GcPauses()

    class State:
        global_step = 3

    try:
        pauses.on_step_end(None, State, None)  # step 3 ended: step 4 is in progress
        gc.collect()
        gc.collect()
    finally:
        pauses.on_train_end(None, State, None)
    assert set(pauses.seconds) == {4} and pauses.seconds[4] > 0
    assert pauses._on_gc not in gc.callbacks
