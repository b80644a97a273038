"""What a finished search leaves behind: the best params for the training stage, the search's
metrics, and its plots (data files for ``dvc plots`` and PNGs drawn from the same rows)."""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
IMPORTANCES_CSV = "importances.csv"
HISTORY_PNG = "history.png"
IMPORTANCES_PNG = "importances.png"


def best_params_record(study) -> dict:
    """``models/best_params.json``: the best complete trial's params (dotted `train:` keys)."""
    best = _best_trial(study)
    if best is None:
        return {"searched": False, "params": {}}
    return {"searched": True, "params": dict(best.params), "best_value": best.value,
            "trial": best.number, "study": study.study_name}


def disabled_outputs() -> tuple[dict, dict]:
    """(best params, metrics) when `tune.enabled` is false: same files, nothing searched."""
    return {"searched": False, "params": {}}, {"searched": False}


def _best_trial(study):
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    return min(complete, key=lambda t: (sign * t.value, t.number))


def search_metrics(study, cfg, *, seconds: float, storage_url: str) -> dict:
    """``metrics/tune.json``: best value and trial, trial counts by state, memory, time."""
    from sqlalchemy.engine import make_url

    from .workers import trial_counts

    trials = study.get_trials(deepcopy=False)
    best = _best_trial(study)
    rss = [t.user_attrs["rss_mib"] for t in trials if "rss_mib" in t.user_attrs]
    gpu = [t.user_attrs["gpu_allocated_mib"] for t in trials if "gpu_allocated_mib" in t.user_attrs]
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    reasons = Counter(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat)")
                      for t in trials if t.state.name == "FAIL" and not t.user_attrs.get("surplus"))
    metrics = {
        "searched": True,
        "study": study.study_name,
        "storage": make_url(storage_url).render_as_string(hide_password=True),
        "objective": cfg.objective,
        "direction": cfg.direction,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "target_trials": cfg.target_trials,
        **{f"trials_{state}": count for state, count in trial_counts(study).items()},
        "seconds": round(seconds, 1),
        "trial_seconds_mean": round(sum(durations) / len(durations), 2) if durations else None,
        # Process memory after each trial's model was freed: flat when nothing leaks.
        "rss_mib_first_trial": rss[0] if rss else None,
        "rss_mib_last_trial": rss[-1] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "fail_reasons": dict(reasons.most_common(5)),
    }
    if gpu:
        metrics["gpu_allocated_mib_max"] = max(gpu)
    return metrics


def history_rows(study) -> list[dict]:
    """One row per finished trial in number order, with the best complete value so far."""
    minimize = study.direction.name == "MINIMIZE"
    best: Optional[float] = None
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state.name not in ("COMPLETE", "PRUNED", "FAIL") or trial.user_attrs.get("surplus"):
            continue
        if trial.state.name == "COMPLETE":
            if best is None or (trial.value < best if minimize else trial.value > best):
                best = trial.value
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            # A pruned trial's value is its last reported evaluation.
            "value": trial.value if trial.value is not None else "",
            "best_value": best if best is not None else "",
            "seconds": round(trial.duration.total_seconds(), 2) if trial.duration else "",
            "rss_mib": trial.user_attrs.get("rss_mib", ""),
        })
    return rows


def importance_rows(study, seed: int = 0) -> list[dict]:
    """Parameter importances (fANOVA) over complete trials; empty with fewer than two."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return []
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as err:  # e.g. every trial drew the same values
        log.warning("parameter importances not computed: %s", err)
        return []
    return [{"param": name, "importance": round(value, 6)} for name, value in importances.items()]


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_plots(study, plots_dir: str | Path, *, objective: str = "eval_loss", seed: int = 0) -> None:
    """history/importances as CSV (for ``dvc plots``) and PNG; ``study`` None: search disabled."""
    plots_dir = Path(plots_dir)
    history = history_rows(study) if study is not None else []
    importances = importance_rows(study, seed) if study is not None else []
    _write_csv(plots_dir / HISTORY_CSV, history, ["trial", "state", "value", "best_value", "seconds", "rss_mib"])
    _write_csv(plots_dir / IMPORTANCES_CSV, importances, ["param", "importance"])
    note = "search disabled (tune.enabled: false)" if study is None else None
    _history_png(plots_dir / HISTORY_PNG, history, objective, note)
    _importances_png(plots_dir / IMPORTANCES_PNG, importances,
                     note or "fewer than two complete trials with differing params")


# Drawn by hand from the CSV rows rather than with optuna.visualization.matplotlib, so the PNG
# shows exactly the numbers `dvc plots` shows, and a disabled search still gets a (blank) figure.
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _history_png(path: Path, rows: list[dict], objective: str, note: Optional[str]) -> None:
    plt, fig, ax = _figure()
    styles = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:orange")}
    for state, (marker, colour) in styles.items():
        points = [(r["trial"], r["value"]) for r in rows if r["state"] == state and r["value"] != ""]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=f"{state} trial")
    best = [(r["trial"], r["best_value"]) for r in rows if r["best_value"] != ""]
    if best:
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    failed = [r["trial"] for r in rows if r["state"] == "fail"]
    for number in failed:
        ax.axvline(number, color="grey", alpha=0.3, linewidth=1)
    if failed:
        ax.plot([], [], color="grey", alpha=0.3, label="failed trial")
    if note or not rows:
        ax.text(0.5, 0.5, note or "no finished trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("Optimisation history")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(plt, fig, path)


def _importances_png(path: Path, rows: list[dict], empty_note: str) -> None:
    plt, fig, ax = _figure()
    if rows:
        ordered = list(reversed(rows))
        ax.barh([r["param"] for r in ordered], [r["importance"] for r in ordered], color="tab:blue")
        ax.set_xlabel("importance (fANOVA, share of objective variance)")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_title("Hyperparameter importances")
    _save(plt, fig, path)
