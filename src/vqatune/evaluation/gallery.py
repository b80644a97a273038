"""The error gallery: a few of the tuned model's mistakes per question category, drawn as PNG grids
(image, question, reference, prediction) that ``dvc plots show`` renders beside the bar charts.

The rows come from the evaluate stage's predictions (exact match 0 = a mistake), in test-split
order, so the same evaluation always draws the same gallery.
"""
from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from typing import Optional

from ..prompts import PROMPT_MODES

# Mistakes drawn per category, and cells per grid row.
PER_CATEGORY = 6
COLUMNS = 3


def gallery_configuration(scores: dict) -> str:
    """The tuned configuration the gallery shows: the prompt mode with the best exact match
    (the first in PROMPT_MODES on a tie)."""
    best = max(PROMPT_MODES, key=lambda mode: (scores["tuned"][mode]["exact_match"] or 0.0,
                                               -PROMPT_MODES.index(mode)))
    return f"tuned_{best}"


def mistakes_by_category(rows: list[dict], per_category: int = PER_CATEGORY) -> dict[str, list[dict]]:
    """{category: the first ``per_category`` rows answered wrong}, categories sorted by name."""
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(row["category"], [])
        if not row["exact_match"] and len(found[row["category"]]) < per_category:
            found[row["category"]].append(row)
    return dict(sorted(found.items()))


def file_name(category: str) -> str:
    """A file name for a category (``yes/no`` -> ``errors_yes-no.png``)."""
    return "errors_" + (re.sub(r"[^A-Za-z0-9_.]+", "-", category).strip("-") or "none") + ".png"


def _wrap(label: str, text: str, width: int = 34, lines: int = 2) -> str:
    return textwrap.shorten(f"{label}: {text}", width=width * lines, placeholder="…") \
        if len(f"{label}: {text}") > width * lines else f"{label}: {text}"


def draw_grid(rows: list[dict], images: list, title: str, path: Path) -> Path:
    """One PNG: each row's image with its question, reference and prediction below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    columns = min(COLUMNS, n)
    lines = (n + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 4.1 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no mistakes in this category", ha="center", va="center")
    for ax, row, image in zip(axes.flat, rows, images):
        ax.imshow(image)
        text = "\n".join(textwrap.fill(_wrap(label, str(row[key])), 34)
                         for label, key in (("Q", "question"), ("reference", "reference"),
                                            ("prediction", "prediction")))
        ax.set_title(text, fontsize=8, loc="left", wrap=True)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_error_gallery(predictions: dict[str, list[dict]], scores: dict, data_dir: str | Path,
                        out_dir: str | Path, per_category: int = PER_CATEGORY,
                        configuration: Optional[str] = None) -> list[Path]:
    """``out_dir``/errors_<category>.png for each category of the test split (replaced as a whole):
    up to ``per_category`` mistakes of ``configuration`` (default: ``gallery_configuration``)."""
    from ..data.processed import load_prepared

    configuration = configuration or gallery_configuration(scores)
    test = load_prepared(data_dir)["test"]
    index = {img_id: i for i, img_id in reversed(list(enumerate(test["img_id"])))}
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    written = []
    for category, rows in mistakes_by_category(predictions[configuration], per_category).items():
        images = [test[index[r["img_id"]]]["image"].convert("RGB") for r in rows]
        title = f"{configuration}: mistakes on '{category}' questions (first {len(rows)})"
        written.append(draw_grid(rows, images, title, out_dir / file_name(category)))
    return written
