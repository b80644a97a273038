"""The benchmarks' code paths, end to end on the tiny model on CPU, so they cannot rot.

Same functions as the device runs (benchmarks/gpu_bench.py): the guide's recipe, the loss-parity
runs, ``run_training``, the guide's one-at-a-time generation and ``generate_answers`` over the six
configurations, and its ``--profile-generation`` and ``--collate`` parts; benchmarks/ddp_bench.py
on CPU processes with its run options. Only the sizes (Scale TINY) and the device differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

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


def test_profile_generation_times_the_evaluate_path_and_its_levers(tmp_path):
    """gpu_bench.py --profile-generation: prefill vs decoding, adapter on/off/merged, smaller
    batches, and a profiler table, on the tiny model on CPU."""
    import gpu_bench

    gpu_bench.main(["--tiny", "--profile-generation", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "out" / "gpu_bench.json").exists()  # the part alone, not the benchmark
    gen = json.loads((tmp_path / "out" / "profile_generation.json").read_text())
    runs, rows, batch = gen["runs"], gpu_bench.TINY.gen_rows, gpu_bench.TINY.gen_batch
    assert set(runs) == {"tuned_prefill_only", "tuned", "base", "tuned_merged",
                         f"tuned_batch_{batch // 4}", f"tuned_batch_{batch // 2}"}
    assert all(run["examples_per_s"] > 0 for run in runs.values())
    # the batch size is the lever: the same rows in one batch, then in batches of a quarter / half
    assert runs["tuned"]["batches"] == -(-rows // batch)
    assert runs[f"tuned_batch_{batch // 4}"]["batches"] == -(-rows // (batch // 4))
    # merging the adapter into the weights changes no answer
    assert gen["merged_identical_share"] == 1.0
    assert gen["prefill_s_per_batch"] == runs["tuned_prefill_only"]["generate_s_per_batch"]
    assert "aten::" in gen["profile"]["top_cpu"] and gen["profile"]["wall_s"] > 0


def test_profile_eval_paths_times_each_attention_variant_with_its_parity(tmp_path):
    """benchmarks/profile_eval_paths.py: prefill and full generation per prompt mode for sdpa,
    grouped attention and compiled MLPs, the later variants' answers against sdpa's, and a
    profiler table per variant (tiny model, CPU)."""
    _run("profile_eval_paths.py", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    res = json.loads((tmp_path / "out" / "profile_eval_paths.json").read_text())
    assert list(res["variants"]) == ["sdpa", "sdpa_grouped", "grouped_mlp_compiled"]
    for name, variant in res["variants"].items():
        for mode in ("none", "static", "adaptive"):
            assert variant[mode]["full_s"] > 0 and variant[mode]["decode_steps"] >= 1
            if name != "sdpa":  # exact on CPU in fp32: the same answers as sdpa
                assert variant[mode]["answers_equal_first_variant"] == 1.0
        assert "aten::" in variant["profile_prefill"]["top_device"]


def test_collate_compares_pixels_and_image_keys_on_the_same_rows(tmp_path):
    """gpu_bench.py --collate: the processor on every image vs image keys, on the tiny processor."""
    import gpu_bench

    gpu_bench.main(["--tiny", "--collate", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    collate = json.loads((tmp_path / "out" / "collate.json").read_text())
    (result,) = collate["results"]
    rows = gpu_bench.TINY.train_batch
    assert collate["rows"] == rows and result["same_tokens"]  # the same token tensors either way
    assert result["keyed_values_bytes"] == rows * 2 * 8       # a keyed batch carries 2 int64 per row
    assert result["pixel_values_mb"] == round(rows * 3 * result["image_px"] ** 2 * 4 / 1e6, 1)
    assert result["pixel_s"] > 0 and result["keyed_s"] > 0


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
    assert ddp_bench.parse_run("1:no_compile,no_cudnn_sdpa") == (1, ("no_compile", "no_cudnn_sdpa"))


def test_ddp_bench_runs_one_gpus_levers_side_by_side(tmp_path):
    """ddp_bench.py --gpus 1 --runs 1:curve 1:lazy_features,curve: a training lever changed, one
    process each, reported against the first run (no scaling)."""
    out = tmp_path / "out"
    _run("ddp_bench.py", "--out", str(out), "--work", str(tmp_path / "work"), "--gpus", "1", "--skip-search",
         "--runs", "1:curve", "1:lazy_features,curve", "--batch", "2")
    results = json.loads((out / "ddp_bench.json").read_text())
    base, lazy = results["training"]["1:curve"], results["training"]["1:lazy_features,curve"]
    assert base["precompute_image_features"] and not lazy["precompute_image_features"]
    assert lazy["options"] == ["lazy_features", "curve"] and lazy["per_step_sync"]
    # the same batches either way, a loss logged at every step: precomputed features are the
    # features the steps compute, up to float rounding
    assert len(base["losses"]) == len(lazy["losses"]) == base["steps"]
    assert lazy["losses"] == pytest.approx(base["losses"], rel=1e-3)
    assert "scaling" not in results
    table = (out / "ddp_bench.md").read_text()
    assert "| vs 1:curve |" in table and "| 1:lazy_features,curve | 2 x 2 |" in table and "Scaling" not in table


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


def test_medgemma_tokenizer_has_the_real_vocabulary_size_ids_and_template(tmp_path):
    """benchmarks/medgemma.py's tokenizer: MedGemma's 262,145 pieces and special-token ids, a
    SentencePiece model whose filler ids are UNUSED pieces, and Gemma 3's chat format."""
    import medgemma
    from sentencepiece import sentencepiece_model_pb2 as pb

    processor = medgemma.build_processor(tmp_path, image_size=896, image_tokens=256)
    tok = processor.tokenizer
    assert len(tok) == medgemma.TOKENIZER_PIECES == 262_145
    assert {t: tok.convert_tokens_to_ids(t) for t in medgemma.TOKEN_IDS} == medgemma.TOKEN_IDS
    proto = pb.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == medgemma.TOKENIZER_PIECES
    assert proto.pieces[200_000].type == pb.ModelProto.SentencePiece.UNUSED
    assert proto.pieces[medgemma.FIRST_TEXT_ID].piece == "\n"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many polyps?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\n<start_of_image>How many polyps?<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 105] and 106 in ids and 255999 in ids and tok.unk_token_id not in ids
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_seq_length"] == 256


def test_e2e_overrides_apply_on_top_of_the_medgemma_profile(tmp_path):
    """benchmarks/e2e.py's -S-style overrides name real keys and pass validation after the profile."""
    import shutil

    import e2e
    import yaml

    from vqatune.cli.profile import apply_profile

    repo = tmp_path / "repo"
    shutil.copytree(e2e.REPO / "configs", repo / "configs")
    shutil.copy(e2e.REPO / "params.yaml", repo / "params.yaml")
    apply_profile("medgemma", repo / "params.yaml", repo)
    for extra in ({}, e2e.SMOKE):
        overrides = {k: v.format(work=tmp_path) if isinstance(v, str) else v
                     for k, v in {**e2e.OVERRIDES, **extra}.items()}
        e2e.apply_overrides(repo, overrides)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["model"]["id"] == f"{tmp_path}/medgemma-4b-random"
        assert params["tune"]["search_space"]["gradient_accumulation_steps"]["choices"] == [1, 2]
        assert params["tune"]["search_space"]["lora.r"]["choices"] == [16, 32]  # the profile's, kept
        assert params["train"]["lora"]["vision_tower"] is False and params["evaluate"]["batch_size"] == "auto"
    assert params["prepare"]["image_size"] == 224


def test_an_unknown_lever_stops_the_benchmark_before_it_starts(tmp_path, capsys):
    import gpu_bench

    with pytest.raises(SystemExit):
        gpu_bench.main(["--tiny", "--train-levers", "checkpointing_none,no_such_lever", "--out", str(tmp_path)])
    assert "no_such_lever" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


def test_benchmark_levers_and_unsloth_row_without_the_guide(tmp_path):
    """gpu_bench.py --skip-guide --levers --unsloth (issue 25's device run): the dequantize_base
    lever on and off, the generation levers with their parity, and the Unsloth row (on CPU: the
    reason it did not run), in the results and the table."""
    import gpu_bench

    gpu_bench.main(["--tiny", "--skip-guide", "--levers", "--unsloth", "--out", str(tmp_path / "out"),
                    "--work", str(tmp_path / "work")])
    results = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    tr, ev = results["training"], results["evaluation"]
    assert "guide" not in tr and "guide" not in ev and results["parity"]["training"] == {"skipped": "--skip-guide"}
    # CPU: auto leaves the nf4 layers as they are; the lever row dequantizes them once
    assert tr["project_default"]["dequantized_layers"] == 0
    assert tr["project_dequantize_on"]["dequantized_layers"] > 0 and tr["project_dequantize_on"]["examples_per_s"] > 0
    # the checkpointing levers and the 16 GB mode, each a measured row with its own setting
    assert tr["project_default"]["gradient_checkpointing"] == "auto"
    assert tr["project_checkpointing_all"]["gradient_checkpointing"] is True
    assert tr["project_checkpointing_none"]["gradient_checkpointing"] is False
    assert tr["project_16gb"]["dequantize_base"] is False and tr["project_16gb"]["examples_per_s"] > 0
    levers = ev["project"]["levers"]
    assert set(levers) == set(gpu_bench.GENERATION_LEVERS)
    assert all(lever["examples_per_s"] > 0 and lever["answers_equal_default"] == 1.0 for lever in levers.values())
    assert results["parity"]["generation"]["share_identical"] == 1.0
    assert set(results["parity"]["generation"]["levers"]) == set(levers)
    assert "not run" in results["unsloth"]["error"] and "unsloth_ratio" not in results
    assert results["train_examples_per_s"] > 0 and results["eval_examples_per_s_best"]["examples_per_s"] > 0
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "static_graphs" in table and "Unsloth" in table and "Loss parity: not run" in table


def test_vision_probe_scores_every_answer_against_its_majority(tmp_path, tiny_model_dir):
    """benchmarks/vision_probe.py on a few scenes: both probes for each answer, the majority share
    beside them, in [0, 1], and the table written."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(BENCH / "vision_probe.py"), "--model", str(tiny_model_dir),
                    "--out", str(tmp_path), "--scenes", "60"], check=True, env=env, timeout=600)
    res = json.loads((tmp_path / "vision_probe.json").read_text())
    assert set(res["probes"]) == {"polyp count", "largest polyp size class (0 = none)", "instrument count",
                                  "landmark cell (0 = none)", "source"}
    for row in res["probes"].values():
        assert 0 < row["majority"] <= 1
        assert 0 <= row["base"]["linear"] <= 1 and 0 <= row["base"]["tokens"] <= 1
    assert "| polyp count |" in (tmp_path / "vision_probe.md").read_text()


def test_the_benchmark_evaluates_with_the_medgemma_profile_settings():
    """gpu_bench's evaluation row is the MedGemma profile's ``evaluate:`` (at the benchmark's own
    batch, answer length and device): every key the profile sets, and its generation levers on."""
    import dataclasses

    import gpu_bench

    from vqatune.cli.profile import load_profile

    gpu_bench.DEV = gpu_bench.Device()
    bench = dataclasses.asdict(gpu_bench.medgemma_evaluate_config(gpu_bench.FULL))
    profile = load_profile("medgemma", BENCH.parent)["evaluate"]
    own = {"batch_size": gpu_bench.FULL.gen_batch, "max_new_tokens": gpu_bench.FULL.new_tokens,
           "device": gpu_bench.DEV.type, "cpu_threads": None}
    assert {k: bench[k] for k in own} == own
    differ = {k: (v, bench[k]) for k, v in profile.items() if k not in own and bench[k] != v}
    assert not differ, differ
    assert bench["grouped_attention"] and bench["share_image_prefix"]
    assert bench["cache_implementation"] == "static_graphs" and bench["quantization"] == "none"


def test_answer_probe_scores_each_question_at_every_layer(tmp_path, tiny_model_dir, processed_dir):
    """benchmarks/answer_probe.py on the small prepared set: for each question it finds enough rows
    of, the majority share, the model's first-token accuracy and a probe per layer, all in [0, 1]."""
    import os
    import subprocess

    subprocess.run([sys.executable, str(BENCH / "answer_probe.py"), "--model", str(tiny_model_dir),
                    "--data", str(processed_dir), "--params", str(BENCH.parent / "params.yaml"),
                    "--rows", "40", "--out", str(tmp_path)], check=True, env=dict(os.environ), timeout=600)
    res = json.loads((tmp_path / "answer_probe.json").read_text())
    assert res["questions"], "no question had 10 training rows"
    layers = 1 + json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for row in res["questions"].values():
        assert 0 < row["majority"] <= 1 and 0 <= row["model_first_token_right"] <= 1
        assert len(row["probe"]) == layers and all(v is None or 0 <= v <= 1 for v in row["probe"].values())
    assert any(v is not None for row in res["questions"].values() for v in row["probe"].values())
    assert "| question |" in (tmp_path / "answer_probe.md").read_text()


def test_embedded_sweep_trains_each_variant_and_scores_it(tmp_path, tiny_model_dir, processed_dir):
    """benchmarks/embedded_sweep.py on CPU: two variants of the train section, two steps each; each
    run's params carry its change (a searched key goes to best_params.json), and each is scored
    on the whole test split with per-category exact match in [0, 1]."""
    import subprocess

    runs = {"committed": {"train": {"max_steps": 2, "eval_steps": 1, "save_steps": 1, "max_eval_rows": 4}},
            "lm_only": {"train": {"max_steps": 2, "eval_steps": 1, "save_steps": 1, "max_eval_rows": 4,
                                  "learning_rate": 0.002, "lora.vision_tower": False, "lora.target_modules": "lm"}}}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    subprocess.run([sys.executable, str(BENCH / "embedded_sweep.py"), "--runs", str(tmp_path / "runs.json"),
                    "--model", str(tiny_model_dir), "--data", str(processed_dir),
                    "--params", str(BENCH.parent / "params.yaml"), "--best-params", str(tmp_path / "none.json"),
                    "--device", "cpu", "--parallel", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                   check=True, timeout=900)
    res = json.loads((tmp_path / "embedded_sweep.json").read_text())["runs"]
    assert set(res) == set(runs)
    for row in res.values():
        assert row["steps"] == 2, row
        scores = row["scores"]["none"]
        assert scores["rows"] > 0 and 0 <= scores["exact_match"] <= 1
        assert scores["per_category"] and all(0 <= v <= 1 for v in scores["per_category"].values())
    lm_only = yaml.safe_load((tmp_path / "work" / "lm_only" / "params.yaml").read_text())["train"]["lora"]
    assert lm_only["vision_tower"] is False and lm_only["target_modules"] == "lm"
    best = json.loads((tmp_path / "work" / "lm_only" / "best_params.json").read_text())["params"]
    assert best == {"learning_rate": 0.002}
    assert "| lm_only |" in (tmp_path / "embedded_sweep.md").read_text()


def test_tiny_tower_recipes_trains_each_variant_on_shared_scenes(tmp_path):
    import tiny_tower_recipes

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"tiny_image_size": 32,
                                                                     "tiny_vision_hidden_size": 16}}))
    (tmp_path / "v.json").write_text(json.dumps([{"scenes": 64, "epochs": 1}, {"scenes": 96, "epochs": 1,
                                                                                 "batch_size": 32}]))
    assert tiny_tower_recipes.main(["--variants", str(tmp_path / "v.json"), "--out", str(tmp_path / "r"),
                                    "--params", str(tmp_path / "params.yaml"), "--device", "cpu",
                                    "--workers", "1"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["scenes"], r["batch_size"]) for r in rows] == [(64, 64), (96, 32)]
    assert all(0 <= r["polyps"] <= 1 and r["seconds"] > 0 for r in rows)
    assert (tmp_path / "r.md").read_text().count("\n| 64 | 1 | 64 |") == 1
    with pytest.raises(SystemExit, match="unknown keys"):
        (tmp_path / "bad.json").write_text(json.dumps([{"scene_weight": 0.3}]))
        tiny_tower_recipes.main(["--variants", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r2"),
                                 "--params", str(tmp_path / "params.yaml"), "--device", "cpu"])
