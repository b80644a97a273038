"""The data behind `vqatune serve`'s "Explore the evaluation" tab: the evaluate stage's predictions,
per-category scores and plots, and the test split's images. Reads files only; loads no model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

ALL = "all"
RESULTS = (ALL, "right", "wrong")
# Gallery items shown at once (the whole test split of the real set is ~12k rows).
SHOWN = 48
TABLE_METRICS = ("n", "exact_match", "set_f1", "token_f1", "rougeL", "bertscore_f1")


class Evaluation:
    """``metrics/predictions/*.jsonl``, ``metrics/eval_by_category.json``, ``plots/eval/*.png`` and the
    test split of ``data/processed``; ``error`` says what is missing (then nothing else is set)."""

    def __init__(self, metrics_dir: str | Path = "metrics", data_dir: str | Path = "data/processed",
                 plots_dir: str | Path = "plots/eval"):
        self.error: Optional[str] = None
        self.predictions: dict[str, list[dict]] = {}
        self.by_category: dict = {}
        self.categories: list[str] = []
        metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
        folder = metrics_dir / "predictions"
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        by_category = metrics_dir / "eval_by_category.json"
        if not files or not by_category.is_file() or not (Path(data_dir) / "dataset_dict.json").is_file():
            self.error = (f"No evaluation yet ({folder}, {by_category} or {data_dir} is missing): "
                          "run `dvc repro` first.")
            return
        for path in files:
            with path.open(encoding="utf-8") as fh:
                self.predictions[path.stem] = [json.loads(line) for line in fh if line.strip()]
        self.by_category = json.loads(by_category.read_text())
        self.categories = sorted({r["category"] for rows in self.predictions.values() for r in rows})
        self.plots = [p for p in (plots_dir / "configurations.png", plots_dir / "by_category.png")
                      if p.is_file()]
        self._data_dir = str(data_dir)
        self._test = None
        self._index: dict[str, int] = {}

    @property
    def configurations(self) -> list[str]:
        """base_none ... tuned_adaptive, then majority (the order of the plots)."""
        from ..evaluation.config import MODELS, configuration_name
        from ..prompts import PROMPT_MODES

        order = {configuration_name(m, p): i for i, (m, p) in enumerate(
            (m, p) for m in MODELS for p in PROMPT_MODES)}
        return sorted(self.predictions, key=lambda name: (order.get(name, len(order)), name))

    def image(self, img_id: str):
        """The test image as the model saw it (prepare's resized RGB)."""
        if self._test is None:
            from datasets import load_from_disk

            self._test = load_from_disk(self._data_dir)["test"]
            self._index = {k: i for i, k in reversed(list(enumerate(self._test["img_id"])))}
        return self._test[self._index[img_id]]["image"].convert("RGB")

    def rows(self, configuration: str, category: str = ALL, result: str = ALL) -> list[dict]:
        """The configuration's rows of one category (or all), right, wrong or both."""
        out = []
        for row in self.predictions.get(configuration, []):
            if category != ALL and row["category"] != category:
                continue
            if result != ALL and bool(row["exact_match"]) != (result == "right"):
                continue
            out.append(row)
        return out

    def category_table(self, configuration: str) -> list[list]:
        """[category, n, exact_match, ...] rows of eval_by_category.json for one configuration."""
        model, _, mode = configuration.partition("_")
        leaf = self.by_category.get(model, {})
        leaf = leaf.get(mode, {}) if mode else leaf
        return [[category] + [_round(scores.get(m)) for m in TABLE_METRICS]
                for category, scores in sorted(leaf.items())]


def _round(value):
    return round(value, 3) if isinstance(value, float) else value


def caption(row: dict) -> str:
    mark = "right" if row["exact_match"] else "wrong"
    return (f"[{mark}] {row['question']} | reference: {row['reference']} | "
            f"prediction: {row['prediction']}")


def summary(rows: list[dict], configuration: str, category: str, result: str) -> str:
    right = sum(bool(r["exact_match"]) for r in rows)
    shown = min(len(rows), SHOWN)
    return (f"**{configuration}**, category {category}, {result}: {len(rows)} rows "
            f"({right} right, {len(rows) - right} wrong); showing {shown}.")
