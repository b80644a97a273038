"""The training curves DVC plots: written from the trainer's log history through dvclive."""
from __future__ import annotations

import math
import shutil
from pathlib import Path


def write_curves(log_history: list[dict], plots_dir: str | Path) -> Path:
    """Train loss, eval loss and learning rate against step, through dvclive.

    Written from the trainer's log_history at the end rather than live: the history is restored
    with a checkpoint, so a resumed run still gets every step exactly once.
    """
    from dvclive import Live

    plots_dir = Path(plots_dir)
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    series = {"train/loss": "loss", "eval/loss": "eval_loss", "train/learning_rate": "learning_rate"}
    points: dict[tuple[int, str], float] = {}  # the final evaluate repeats the last step's: keep one
    for entry in log_history:
        for name, key in series.items():
            value = entry.get(key)
            if value is not None and math.isfinite(float(value)):
                points[(int(entry.get("step", 0)), name)] = float(value)
    with Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for (step, name), value in sorted(points.items()):
            live.step = step
            live.log_metric(name, value)
    return plots_dir
