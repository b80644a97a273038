"""The evaluation's pictures: the six configurations against the majority baseline, overall and
per question category (seaborn PNGs), and the rows DVC renders with ``dvc plots show/diff``."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional

from ..outputs import write_atomic
from ..prompts import PROMPT_MODES
from .config import ABLATION, MAJORITY, MODELS
from .metrics import METRIC_NAMES
# The headline metrics, in the order the bars appear.
PLOTTED_METRICS = ("exact_match", "set_f1", "token_f1", "rougeL", "bertscore_f1")
# The image ablation's bar: the tuned model (mode none) on blank images.
ABLATION_LABEL = "tuned/none, blank images"


def _palette(n_configurations: int):
    """Blues for base, oranges for tuned, grey for the image ablation."""
    import seaborn as sns

    colours = sns.color_palette("Blues", 4)[1:] + sns.color_palette("Oranges", 4)[1:]
    return colours + [(0.55, 0.55, 0.55)] * (n_configurations - len(colours))


def configuration_rows(scores: dict) -> list[dict]:
    """One row per configuration (``base/none`` ... ``tuned/adaptive``, ``majority``)."""
    rows = []
    for model in MODELS:
        for mode in PROMPT_MODES:
            leaf = scores[model][mode]
            rows.append({"configuration": f"{model}/{mode}", "model": model, "prompt_mode": mode,
                         **{m: leaf.get(m) for m in METRIC_NAMES}})
    if ABLATION in scores:
        rows.append({"configuration": ABLATION_LABEL, "model": ABLATION, "prompt_mode": "none",
                     **{m: scores[ABLATION]["none"].get(m) for m in METRIC_NAMES}})
    rows.append({"configuration": MAJORITY, "model": MAJORITY, "prompt_mode": "-",
                 **{m: scores[MAJORITY].get(m) for m in METRIC_NAMES}})
    return rows


def category_rows(by_category: dict) -> list[dict]:
    """One row per (configuration, category)."""
    rows = []
    leaves = [(f"{m}/{mode}", by_category[m][mode]) for m in MODELS for mode in PROMPT_MODES]
    if ABLATION in by_category:
        leaves.append((ABLATION_LABEL, by_category[ABLATION]["none"]))
    leaves.append((MAJORITY, by_category[MAJORITY]))
    for configuration, per_category in leaves:
        for category, leaf in per_category.items():
            rows.append({"configuration": configuration, "category": category,
                         **{m: leaf.get(m) for m in METRIC_NAMES}, "n": leaf["n"]})
    return rows


def _long(rows: list[dict], metrics: tuple[str, ...], id_columns: tuple[str, ...]) -> "pd.DataFrame":
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.melt(id_vars=list(id_columns), value_vars=list(metrics), var_name="metric",
                      value_name="score").dropna(subset=["score"])


def _majority_marks(ax, groups: list[str], values: dict[str, Optional[float]], width: float = 0.8):
    """A dashed line across each group's bars at the majority baseline's score."""
    labelled = False
    for i, group in enumerate(groups):
        value = values.get(group)
        if value is None:
            continue
        ax.hlines(value, i - width / 2, i + width / 2, colors="black", linestyles="--", linewidth=1.5,
                  label=None if labelled else "majority baseline", zorder=5)
        labelled = True


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


def plot_configurations(scores: dict, path: str | Path) -> Path:
    """Grouped bars: each metric side by side for the six configurations, majority marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = configuration_rows(scores)
    metrics = tuple(m for m in PLOTTED_METRICS if scores[MAJORITY].get(m) is not None
                    or any(r[m] is not None for r in rows))
    shown = [r for r in rows if r["model"] != MAJORITY]
    frame = _long(shown, metrics, ("configuration",))
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(11, 5))
    palette = _palette(len(shown))
    sns.barplot(frame, x="metric", y="score", hue="configuration", order=list(metrics),
                palette=palette, ax=ax)
    _majority_marks(ax, list(metrics), {m: scores[MAJORITY].get(m) for m in metrics})
    n = scores[MAJORITY]["n"]
    ax.set(ylim=(0, 1.05), xlabel="", ylabel="score",
           title=f"Base vs tuned under each prompt mode, and on blank images ({n} test questions)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_by_category(by_category: dict, path: str | Path, metric: str = "exact_match") -> Path:
    """``metric`` per question category for the six configurations, majority marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = category_rows(by_category)
    categories = sorted({r["category"] for r in rows})
    shown = [r for r in rows if r["configuration"] != MAJORITY]
    frame = _long(shown, (metric,), ("configuration", "category"))
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(categories)), 5))
    palette = _palette(len({r["configuration"] for r in shown}))
    sns.barplot(frame, x="category", y="score", hue="configuration", order=categories,
                palette=palette, ax=ax)
    majority = {c: leaf.get(metric) for c, leaf in by_category[MAJORITY].items()}
    _majority_marks(ax, categories, majority)
    counts = {c: leaf["n"] for c, leaf in by_category[MAJORITY].items()}
    labels = [textwrap.fill(c.replace("_", " "), 12) + f"\n(n={counts.get(c, 0)})" for c in categories]
    ax.set_xticks(range(len(categories)), labels)
    ax.set(ylim=(0, 1.05), xlabel="", ylabel=metric, title=f"{metric} by question category")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def write_plot_data(scores: dict, by_category: dict, out_dir: str | Path) -> list[Path]:
    """The data files ``dvc.yaml`` declares as plots (one JSON list each)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in (("configurations.json", configuration_rows(scores)),
                       ("by_category.json", category_rows(by_category))):
        written.append(write_atomic(out_dir / name, json.dumps(rows, indent=1) + "\n"))
    return written
