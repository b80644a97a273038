"""The Hugging Face `evaluate` metric module (src/vqatune/evaluation/kvasir_vqa) loads offline from
its folder and scores exactly as the evaluate stage does: on the stage's own predictions (a
shrunk in-process run) and on the repo's committed run (metrics/predictions/*.jsonl, a DVC output
present after `dvc pull`, against metrics/eval.json). ~70 s on 2 shared cores."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Offline: nothing may reach the hub (set before `evaluate` is first imported).
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_evaluation import adapter_dir, stage_run  # noqa: E402,F401  (the stage, run once)
from vqatune.evaluation.metrics import (KVASIR_VQA_METRIC, METRIC_NAMES, make_bertscore,  # noqa: E402
                                        mean_scores, score_answers)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(KVASIR_VQA_METRIC))


def test_module_loads_offline_and_scores_with_the_project_functions(metric):
    predictions = ["< 5 mm", "red; pink", "Barrett's", "yes", ""]
    references = ["<5mm", "pink; red", "barretts", "no", ""]
    got = metric.compute(predictions=predictions, references=references, device="cpu")
    want = mean_scores(score_answers(predictions, references, make_bertscore(device="cpu")))
    assert got == want
    assert (got["exact_match"], got["set_exact_match"], got["n"]) == (0.6, 0.8, 5)
    no_bert = metric.compute(predictions=predictions, references=references, bertscore_model=None)
    assert no_bert["bertscore_f1"] is None and no_bert["token_f1"] == got["token_f1"]


def _configurations(predictions_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(predictions_dir.glob("*.jsonl"))}


def _stage_scores(eval_json: dict, name: str) -> dict:
    if name == "majority":
        return eval_json["majority"]
    model, mode = name.rsplit("_", 1)  # base_none, tuned_static, image_ablation_none
    return eval_json[model][mode]


def _assert_module_equals_stage(metric, predictions_dir: Path, eval_json: dict) -> int:
    configurations = _configurations(predictions_dir)
    assert {"base_none", "tuned_none", "majority"} <= set(configurations)
    for name, rows in configurations.items():
        got = metric.compute(predictions=[r["prediction"] for r in rows],
                             references=[r["reference"] for r in rows], device="cpu")
        stage = _stage_scores(eval_json, name)
        assert {m: got[m] for m in METRIC_NAMES} == {m: stage[m] for m in METRIC_NAMES}, name
        assert got["n"] == stage["n"] == len(rows)
    return len(configurations)


def test_module_scores_equal_the_stage_on_its_predictions(metric, stage_run):
    code, out, _ = stage_run
    assert code == 0
    eval_json = json.loads((out / "eval.json").read_text())
    assert _assert_module_equals_stage(metric, out / "predictions", eval_json) == 8


def test_module_scores_equal_the_committed_run(metric):
    predictions = REPO / "metrics" / "predictions"
    if not any(predictions.glob("*.jsonl")):
        pytest.skip("metrics/predictions is a DVC output: `dvc pull` (or `dvc repro evaluate`) first")
    eval_json = json.loads((REPO / "metrics" / "eval.json").read_text())
    assert _assert_module_equals_stage(metric, predictions, eval_json) == 8
