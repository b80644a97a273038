"""The evaluation stage end to end on the tiny model: eval.json's shape, the base configurations
really are the base model, the tuned ones really use the adapter, every output is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vqatune.models import loading as model_module
from vqatune.config import ConfigError, build
from vqatune.evaluation.config import EvaluateConfig
from vqatune.evaluation.run import evaluation_rows, prompt_messages
from vqatune.generation.generate import generate_answers
from vqatune.evaluation.metrics import METRIC_NAMES
from conftest_stages import load_stage

REPO = Path(__file__).resolve().parents[1]
SUBSET = 10


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero weights, so tuned answers differ."""
    import torch

    from vqatune.models.loading import load_base_model
    from vqatune.models.lora import LoraSettings, attach_lora

    peft_model = attach_lora(load_base_model(tiny_model_dir, device="cpu"), LoraSettings(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:      # peft starts B at zero: the adapter would be a no-op
                param.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def _load_stage():
    return load_stage("evaluate")


@pytest.fixture(scope="module")
def stage_run(tiny_model_dir, adapter_dir, processed_dir, tmp_path_factory):
    """The stage script run once, in-process, counting how often a base model is loaded."""
    out = tmp_path_factory.mktemp("eval")
    params = out / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"trust_remote_code": False},
        "evaluate": {"subset_size": SUBSET, "batch_size": 4, "max_new_tokens": 4, "seed": 3},
    }))
    loads = []
    original = model_module.load_base_model

    def counting_load(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    model_module.load_base_model = counting_load
    try:
        code = _load_stage().main([
            "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--data", str(processed_dir),
            "--metrics", str(out / "eval.json"), "--by-category", str(out / "eval_by_category.json"),
            "--predictions", str(out / "predictions"), "--plots", str(out / "plots"),
            "--params", str(params)])
    finally:
        model_module.load_base_model = original
    return code, out, loads


def _predictions(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]


def test_eval_json_has_the_promised_shape(stage_run):
    code, out, _ = stage_run
    assert code == 0
    scores = json.loads((out / "eval.json").read_text())
    leaf_keys = {"exact_match", "set_f1", "token_f1", "rougeL", "bertscore_f1", "n"}
    for model in ("base", "tuned"):
        assert set(scores[model]) == {"none", "static", "adaptive"}
        for mode, leaf in scores[model].items():
            assert leaf_keys <= set(leaf), (model, mode)
            assert leaf["n"] == SUBSET
            assert all(0.0 <= leaf[m] <= 1.0 for m in METRIC_NAMES)
            assert leaf["examples_per_s"] > 0 and leaf["peak_memory_gib"] > 0
    assert leaf_keys <= set(scores["majority"]) and scores["majority"]["n"] == SUBSET
    # The image ablation: the tuned model, mode none, on blank images; the same score keys.
    assert set(scores["image_ablation"]) == {"none"}
    assert set(scores["image_ablation"]["none"]) == set(scores["tuned"]["none"])
    assert scores["image_ablation"]["none"]["n"] == SUBSET
    assert scores["generation"]["test_rows"] == SUBSET
    # Each test image's pixels were made once for all six configurations; the rest reused them.
    # The ablation processes one blank per image size (never a real image's cached pixels).
    timing = scores["generation"]["timing"]
    distinct = len({r["img_id"] for r in _predictions(out, "base_none")})
    assert distinct < SUBSET, "the subset must repeat an image for the reuse to show"
    assert timing["rows"] == 7 * SUBSET and timing["images_processed"] == distinct + 1
    assert timing["images_reused"] == 7 * SUBSET - distinct - 1
    assert timing["generate_s"] > 0 and timing["total_s"] >= timing["generate_s"]

    by_category = json.loads((out / "eval_by_category.json").read_text())
    for model in ("base", "tuned"):
        for mode in ("none", "static", "adaptive"):
            assert sum(leaf["n"] for leaf in by_category[model][mode].values()) == SUBSET
    assert sum(leaf["n"] for leaf in by_category["majority"].values()) == SUBSET
    assert sum(leaf["n"] for leaf in by_category["image_ablation"]["none"].values()) == SUBSET


def test_eval_json_is_recomputed_from_the_prediction_files(stage_run):
    """Every configuration's exact match (overall and per category) follows from its per-row
    predictions file: the scores describe exactly the answers that were written."""
    from vqatune.evaluation.metrics import exact_match

    _, out, _ = stage_run
    scores = json.loads((out / "eval.json").read_text())
    by_category = json.loads((out / "eval_by_category.json").read_text())
    leaves = {f"{m}_{mode}": (scores[m][mode], by_category[m][mode])
              for m in ("base", "tuned") for mode in ("none", "static", "adaptive")}
    leaves["image_ablation_none"] = (scores["image_ablation"]["none"], by_category["image_ablation"]["none"])
    leaves["majority"] = (scores["majority"], by_category["majority"])
    for name, (overall, per_category) in leaves.items():
        rows = _predictions(out, name)
        assert len(rows) == overall["n"]
        assert all(r["exact_match"] == exact_match(r["prediction"], r["reference"]) for r in rows), name
        assert overall["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / len(rows), abs=1e-4)
        for category, leaf in per_category.items():
            mine = [r["exact_match"] for r in rows if r["category"] == category]
            assert leaf["n"] == len(mine)
            assert leaf["exact_match"] == pytest.approx(sum(mine) / len(mine), abs=1e-4), (name, category)


def test_image_ablation_replaces_the_pixels(processed_dir, tiny_model_dir):
    """BlankImages hands out uniform images of each test image's size, which the processor turns
    into all-zero pixels, under keys no real image has."""
    import numpy as np
    from datasets import load_from_disk

    from vqatune.evaluation.run import BlankImages, _LazyImages

    test = load_from_disk(str(processed_dir))["test"]
    images = _LazyImages(test.select(range(5)))
    blank = BlankImages(images)
    processor = model_module.load_processor(tiny_model_dir)
    assert len(blank) == 5 and set(blank.keys()).isdisjoint(test["img_id"])
    for i in range(5):
        real, empty = np.asarray(images[i]), np.asarray(blank[i])
        assert empty.shape == real.shape and (empty == empty.flat[0]).all()
        assert real.std() > 10, "the real image has content the ablation removes"
        pixels = processor.image_processor([blank[i]], return_tensors="pt")["pixel_values"]
        assert pixels.abs().max().item() < 0.01


def test_every_output_is_written(stage_run):
    _, out, _ = stage_run
    names = {p.stem for p in (out / "predictions").glob("*.jsonl")}
    assert names == ({f"{m}_{mode}" for m in ("base", "tuned") for mode in ("none", "static", "adaptive")}
                     | {"image_ablation_none", "majority"})
    row = _predictions(out, "tuned_static")[0]
    assert {"img_id", "question", "category", "reference", "prediction"} <= set(row)
    for name in ("configurations.png", "by_category.png", "configurations.json", "by_category.json"):
        assert (out / "plots" / name).stat().st_size > 0
    rows = json.loads((out / "plots" / "configurations.json").read_text())
    assert [r["configuration"] for r in rows] == [
        "base/none", "base/static", "base/adaptive", "tuned/none", "tuned/static", "tuned/adaptive",
        "tuned/none, blank images", "majority"]
    assert not list(out.rglob("*.tmp*"))


def test_base_model_loaded_once_and_adapter_switched(stage_run, tiny_model_dir, processed_dir):
    _, out, loads = stage_run
    assert len(loads) == 1
    # The base configurations equal a plain base model without any adapter ...
    from datasets import load_from_disk

    test = load_from_disk(str(processed_dir))["test"]
    test = test.select(evaluation_rows(test, SUBSET, seed=3))
    plain = model_module.load_base_model(tiny_model_dir, device="cpu")
    processor = model_module.load_processor(tiny_model_dir)
    expected = generate_answers(plain, processor, [prompt_messages(m) for m in test["messages_static"]],
                                list(test["image"]), batch_size=4, max_new_tokens=4)
    base = _predictions(out, "base_static")
    assert [r["prediction"] for r in base] == expected
    assert [r["img_id"] for r in base] == test["img_id"]
    # ... and the tuned ones answer differently: the adapter is on.
    tuned = _predictions(out, "tuned_static")
    assert [r["prediction"] for r in tuned] != expected


def test_tuned_configurations_run_merged_and_answer_as_the_attached_adapter(stage_run, tiny_model_dir,
                                                                           adapter_dir, processed_dir):
    """evaluate.merge_adapter (null: on with an unquantized base): the tuned configurations run
    after the base ones on the adapter merged into the weights, and answer what the attached
    (unmerged) adapter answers."""
    from datasets import load_from_disk

    _, out, _ = stage_run
    assert json.loads((out / "eval.json").read_text())["generation"]["merged_adapter"] is True
    test = load_from_disk(str(processed_dir))["test"]
    test = test.select(evaluation_rows(test, SUBSET, seed=3))
    attached, processor = model_module.load_tuned_model(tiny_model_dir, adapter_dir, device="cpu")
    assert not any(getattr(m, "merged", False) for m in attached.modules())
    expected = generate_answers(attached, processor,
                                [prompt_messages(m) for m in test["messages_none"]], list(test["image"]),
                                batch_size=4, max_new_tokens=4)
    assert [r["prediction"] for r in _predictions(out, "tuned_none")] == expected


def test_majority_baseline_predicts_training_majority(stage_run, processed_dir):
    from collections import Counter

    from datasets import load_from_disk

    from vqatune.evaluation.metrics import answer_set

    _, out, _ = stage_run
    train = load_from_disk(str(processed_dir))["train"]
    for row in _predictions(out, "majority"):
        counts = Counter("; ".join(sorted(answer_set(a)))
                         for q, a in zip(train["question"], train["answer"]) if q == row["question"])
        assert counts[row["prediction"]] == max(counts.values()), row


def test_subset_is_seeded_and_ordered():
    data = list(range(50))
    a, b = evaluation_rows(data, 10, seed=1), evaluation_rows(data, 10, seed=1)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert evaluation_rows(data, 10, seed=2) != a
    assert evaluation_rows(data, None, seed=1) == data
    assert evaluation_rows(data, 500, seed=1) == data


def test_prompt_messages_drop_the_answer_turn():
    stored = [{"role": "user", "content": [{"type": "text", "text": "Is there text?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert prompt_messages(stored) == stored[:1]
    with pytest.raises(ValueError, match="rerun prepare"):
        prompt_messages(stored[:1])


@pytest.mark.parametrize("raw, key", [
    ({"subset_size": 0}, "evaluate.subset_size"),
    ({"batch_size": 0}, "evaluate.batch_size"),
    ({"quantization": "2bit"}, "evaluate.quantization"),
    ({"max_new_token": 25}, "evaluate.max_new_token"),
    ({"cache_implementation": "hybrid"}, "evaluate.cache_implementation"),
    ({"grouped_attention": True, "attn_implementation": "eager"}, "evaluate.grouped_attention"),
])
def test_bad_params_stop_with_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(EvaluateConfig, raw, "evaluate")


def test_shipped_params_are_valid():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = build(EvaluateConfig, params["evaluate"], "evaluate")
    # Room for the longest reference: all nine cells, 38 tokens for the tiny tokenizer.
    assert cfg.subset_size is None and cfg.max_new_tokens == 40


def test_missing_adapter_is_one_line(tiny_model_dir, processed_dir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  subset_size: 2\n")
    code = _load_stage().main(["--base", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"),
                               "--data", str(processed_dir), "--params", str(params),
                               "--metrics", str(tmp_path / "eval.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "adapter_config.json not found" in err and "\n" not in err
    assert not (tmp_path / "eval.json").exists()
