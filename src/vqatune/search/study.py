"""Hyperparameter search with Optuna around the training stage.

Each trial builds the model, trains it on a small budget, reports its eval loss to Optuna at a few
evenly spaced evaluations (so a pruner can stop it early) and frees everything again. The study
lives in a database (SQLite under ``models/tune/`` by default, or any SQLAlchemy URL such as
PostgreSQL) so that several worker processes, on one machine or many, can share it and a killed
search resumes with every finished trial kept.

Unlike the guide: no trainer is evaluated after deletion, a trial that raises (CUDA OOM included)
is recorded failed with its reason and the study goes on, and process/GPU memory is measured after
every trial.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

from ..config import InputError
from .config import SearchParam, TuneConfig
from .workers import SearchError, run_worker, trial_counts

log = logging.getLogger(__name__)


# Fields that change neither which trials run nor what they return: a change to them resumes the
# same study instead of starting a new one.
_RESUMABLE_FIELDS = ("enabled", "study_name", "storage", "n_trials", "timeout", "max_failed_trials",
                     "heartbeat_seconds", "grace_seconds")


def study_key(cfg: TuneConfig, inputs: str) -> str:
    """A short hash of the search settings and ``inputs`` (a key of `train:`, model and data)."""
    search = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_FIELDS}
    blob = json.dumps({"search": search, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def open_storage(cfg: TuneConfig):
    """The RDB storage, with heartbeats so a dead worker's trial is failed and rerun."""
    import optuna
    from sqlalchemy.engine import make_url

    url = make_url(cfg.storage)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write to one file: wait for its lock rather than fail at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # A trial can hold its connection idle for hours while it trains.
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import DatabaseError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: since 2.9
        try:
            return optuna.storages.RDBStorage(
                cfg.storage, engine_kwargs=engine_kwargs,
                heartbeat_interval=cfg.heartbeat_seconds, grace_period=cfg.grace_seconds,
            )
        except DatabaseError as err:
            if url.get_backend_name() != "sqlite":
                raise
            # A truncated or overwritten study file (a kill mid-write on a bad disk, a copy cut
            # short): SQLite says "database disk image is malformed" / "file is not a database".
            reason = str(getattr(err, "orig", err)).splitlines()[0]
            raise InputError(f"{url.database} is not a readable SQLite study ({reason}); restore "
                             f"a copy of it, or move it aside to start the search over "
                             f"(its finished trials are lost)") from None


def make_sampler(cfg: TuneConfig, seed: int):
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler_startup_trials)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.sampler_startup_trials)
    grid = {key: spec.grid() for key, spec in cfg.search_space.items()}
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(cfg: TuneConfig):
    """Pruners see evaluation indices 1..evals_per_trial as steps (see PruningCallback)."""
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_evals)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.evals_per_trial)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, name: str, *, worker: int = 0):
    """Create or join the study ``name``; every worker calls this with the same arguments."""
    import optuna

    storage = open_storage(cfg)
    # Workers must not draw the same random start-up trials, and neither must a resumed run
    # repeat the first run's draws: offset the seed by worker index and trials already stored.
    existing = next((s.n_trials for s in optuna.get_all_study_summaries(storage) if s.study_name == name), 0)
    sampler = make_sampler(cfg, cfg.seed + 1000 * worker + existing)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                               pruner=make_pruner(cfg), direction=cfg.direction, load_if_exists=True)


def suggest(trial, space: dict[str, SearchParam]) -> dict[str, Any]:
    """Draw every parameter of ``space`` for ``trial``; keys stay dotted (``lora.r``)."""
    values = {}
    for key, spec in space.items():
        if spec.kind == "categorical":
            values[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.kind == "int":
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high),
                                            step=int(spec.step or 1), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return values


def run_search(cfg: TuneConfig, study_name: str, objective: Callable, *, worker: int = 0):
    """Join (or create) the study, run this worker's share of it, and return the study.

    Raises SearchError (one line) when the study ends without a single complete trial.
    """
    study = open_study(cfg, study_name, worker=worker)
    log.info("study %s: %d trials to finish, worker %d joining", study_name, cfg.target_trials, worker)
    ran = run_worker(study, cfg, objective)
    counts = trial_counts(study)
    log.info("worker %d ran %d trial(s); study has %s", worker, ran, counts)
    if counts["complete"] == 0:
        reasons = [t.user_attrs["fail_reason"] for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get("error")]
        if counts["failed"] and not counts["pruned"]:
            raise SearchError(f"all {counts['failed']} trials failed; last reason: {reasons[-1]}")
        raise SearchError(f"no trial completed ({counts['pruned']} pruned, {counts['failed']} failed); "
                          "raise tune.timeout or tune.pruner_startup_trials")
    return study
