"""The GPU benchmark's code path, end to end on the tiny model on CPU, so it cannot rot.

Same functions as the device run (benchmarks/gpu_bench.py): the guide's recipe, the loss-parity
runs, ``run_training``, the guide's one-at-a-time generation and ``generate_answers`` over the six
configurations; only the sizes (Scale TINY) and the device differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
    assert parity["generation"]["share_identical"] == 1.0
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "train_speedup" in table and "| train: guide recipe" in table
