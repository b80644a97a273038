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

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from .config import ConfigError, require
from .provenance import code_signature, folder_signature
from .search_workers import SearchError, run_worker, trial_counts  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class SearchParam:
    """One searched hyperparameter (its key is a dotted path into `train:`, e.g. ``lora.r``)."""

    kind: Optional[Literal["float", "int", "categorical"]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    # float/int: sample on a log scale (exclusive with step).
    log: bool = False
    # float/int: sample on a grid low, low+step, ... (exclusive with log).
    step: Optional[float] = None
    choices: Optional[list[Any]] = None

    def validate(self, p: str) -> None:
        require(self.kind is not None, f"{p}.kind", "missing; choose float, int or categorical")
        if self.kind == "categorical":
            require(bool(self.choices), f"{p}.choices", "a categorical parameter needs a non-empty list")
            require(all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices),
                    f"{p}.choices", "choices must be numbers, strings, booleans or null")
            require(self.low is None and self.high is None and self.step is None and not self.log,
                    p, "a categorical parameter takes only choices (no low/high/step/log)")
            return
        require(self.choices is None, f"{p}.choices", f"only categorical parameters take choices, not {self.kind}")
        require(self.low is not None and self.high is not None, p, f"a {self.kind} parameter needs low and high")
        require(self.low <= self.high, f"{p}.low", f"must not exceed high ({self.high})")
        require(not (self.log and self.step is not None), p, "log and step exclude each other; pick one")
        require(not self.log or self.low > 0, f"{p}.low", "must be positive on a log scale")
        require(self.step is None or self.step > 0, f"{p}.step", "must be positive")
        if self.kind == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                require(value is None or float(value).is_integer(), f"{p}.{name}",
                        f"an int parameter needs whole numbers, got {value}")

    def grid(self) -> list:
        """Every value this parameter takes, for the grid sampler."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError("grid sampler: float parameters need a step (or use categorical choices)")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


def guide_search_space() -> dict[str, SearchParam]:
    """The guide's space: learning rate (log), accumulation, LoRA rank/alpha/dropout."""
    return {
        "learning_rate": SearchParam("float", 1e-6, 1e-4, log=True),
        "gradient_accumulation_steps": SearchParam("categorical", choices=[1, 2, 4, 8, 16]),
        "lora.r": SearchParam("categorical", choices=[16, 32]),
        "lora.alpha": SearchParam("categorical", choices=[16, 32, 64, 128]),
        "lora.dropout": SearchParam("float", 0.0, 0.1, step=0.01),
    }


SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")


@dataclasses.dataclass
class TuneConfig:
    """`tune:` — the Optuna search that picks `train:` values for the training stage."""

    # false: no search; best_params.json says so and training uses `train:` as it is.
    enabled: bool = True
    # The study's name in the storage; a key of everything that changes trial results (search
    # settings, `train:`, the model and data) is appended, so a changed input starts a new study
    # while an unchanged one resumes (raise n_trials and only the new trials run).
    study_name: str = "vqatune"
    # Any SQLAlchemy URL: sqlite:///path (one machine; relative to the repo root) or
    # postgresql://user@host/db for workers on several machines (password via PGPASSWORD/.pgpass).
    storage: str = "sqlite:///models/tune/study.db"
    # Complete + pruned trials the study needs, counted over all workers and all runs.
    n_trials: int = 20
    # Seconds after which a worker starts no new trial (null: no limit).
    timeout: Optional[float] = None
    # Failed trials tolerated (over all workers) before the search gives up; null: n_trials.
    max_failed_trials: Optional[int] = None
    # tpe: model-based, good with few trials (the guide's); random: baseline; cmaes: continuous
    # params only (categoricals are sampled at random); grid: every combination (floats need a step).
    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    seed: int = 0
    # Random trials before tpe/cmaes start modelling.
    sampler_startup_trials: int = 10
    # median: stops a trial worse than the median of earlier ones at the same evaluation;
    # hyperband: successive halving over the evaluations; none: every trial runs its budget.
    pruner: Literal["median", "hyperband", "none"] = "median"
    # median: completed trials before any is pruned, and evaluations a trial always gets.
    pruner_startup_trials: int = 5
    pruner_warmup_evals: int = 1
    # Budget of one trial: a share of the training split, a number of epochs over it (0.5 = half
    # an epoch) unless max_steps is set, and how many evenly spaced evaluations it reports (the
    # points where it can be pruned). Short budgets favour fast-converging settings.
    train_fraction: float = 0.1
    epochs: float = 1.0
    max_steps: Optional[int] = None
    evals_per_trial: int = 4
    # Rows of the evaluation split each evaluation uses (null: all).
    eval_rows: Optional[int] = None
    # What a trial returns: eval_loss (minimise) or another eval metric the trainer reports.
    objective: str = "eval_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    # A worker writes a heartbeat this often while a trial runs; a trial whose heartbeat is older
    # than grace_seconds belongs to a dead worker and is failed, so its slot is run again.
    heartbeat_seconds: int = 30
    grace_seconds: int = 120
    search_space: dict[str, SearchParam] = dataclasses.field(default_factory=guide_search_space)

    def validate(self, p: str) -> None:
        require(bool(self.study_name.strip()), f"{p}.study_name", "must be a non-empty name")
        require("://" in self.storage, f"{p}.storage",
                "must be a database URL such as sqlite:///models/tune/study.db or postgresql://user@host/db")
        require(self.n_trials >= 1, f"{p}.n_trials", "must be at least 1")
        require(self.timeout is None or self.timeout > 0, f"{p}.timeout", "must be positive seconds or null")
        require(self.max_failed_trials is None or self.max_failed_trials >= 1, f"{p}.max_failed_trials",
                "must be at least 1 or null")
        require(self.sampler_startup_trials >= 0, f"{p}.sampler_startup_trials", "must be 0 or more")
        require(self.pruner_startup_trials >= 0, f"{p}.pruner_startup_trials", "must be 0 or more")
        require(self.pruner_warmup_evals >= 0, f"{p}.pruner_warmup_evals", "must be 0 or more")
        require(0.0 < self.train_fraction <= 1.0, f"{p}.train_fraction", "must be in (0, 1]")
        require(self.epochs > 0, f"{p}.epochs", "must be positive (0.5 = half an epoch)")
        require(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps", "must be at least 1 or null")
        require(self.evals_per_trial >= 1, f"{p}.evals_per_trial", "must be at least 1")
        require(self.eval_rows is None or self.eval_rows >= 1, f"{p}.eval_rows", "must be at least 1 or null")
        require(self.objective.startswith("eval_"), f"{p}.objective",
                "must be an eval metric the trainer reports, such as eval_loss")
        require(self.heartbeat_seconds >= 1, f"{p}.heartbeat_seconds", "must be at least 1")
        require(self.grace_seconds > self.heartbeat_seconds, f"{p}.grace_seconds",
                f"must exceed heartbeat_seconds ({self.heartbeat_seconds})")
        require(bool(self.search_space), f"{p}.search_space", "must declare at least one parameter")
        if self.sampler == "grid":
            for key, spec in self.search_space.items():
                if spec.kind == "float" and spec.step is None:
                    raise ConfigError(f"{p}.search_space.{key}.step: the grid sampler needs a step "
                                      "for float parameters (or use categorical choices)")

    @property
    def failure_budget(self) -> int:
        return self.max_failed_trials or self.n_trials

    def grid_size(self) -> int:
        return math.prod(len(spec.grid()) for spec in self.search_space.values())

    @property
    def target_trials(self) -> int:
        """Trials to finish: n_trials, or fewer when a grid has fewer combinations."""
        return min(self.n_trials, self.grid_size()) if self.sampler == "grid" else self.n_trials


# --------------------------------------------------------------------------------------
# Study: storage, sampler, pruner
# --------------------------------------------------------------------------------------

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: since 2.9
        return optuna.storages.RDBStorage(
            cfg.storage, engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_seconds, grace_period=cfg.grace_seconds,
        )


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


# --------------------------------------------------------------------------------------
# The objective: one short training run per trial
# --------------------------------------------------------------------------------------

# Trials evaluate only where PruningCallback asks and keep no checkpoints.
_NEVER = 10**9


@contextlib.contextmanager
def _no_dataset_cache_files():
    """Keep ``datasets`` from writing cache files next to the data for this block.

    A trial's subset is a shuffle of the train split, and ``datasets`` writes a shuffle's indices
    beside the loaded dataset: into data/processed, the prepare stage's DVC output, which DVC
    would then see as modified. With caching off they go to a temporary folder instead.
    """
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


def trial_budget(cfg: TuneConfig) -> dict[str, Any]:
    """`train:` overrides every trial gets: its budget, and no checkpoints or early stopping."""
    budget = {"epochs": cfg.epochs, "max_steps": cfg.max_steps or -1, "load_best_model_at_end": False,
              "early_stopping_patience": 0, "eval_steps": _NEVER, "save_steps": _NEVER}
    if cfg.eval_rows is not None:
        budget["max_eval_rows"] = cfg.eval_rows
    return budget


def _pruning_callback_class():
    from transformers import TrainerCallback

    class PruningCallback(TrainerCallback):
        """Reports the objective at ``evals`` evenly spaced points of a trial and stops it when pruned.

        The step Optuna sees is the evaluation's index (1..evals), not the optimizer step: trials
        with more gradient accumulation take fewer optimizer steps over the same budget, and a
        pruner compares trials at equal steps. Raising TrialPruned here would skip the trainer's
        clean-up, so the callback only stops training and the objective raises afterwards.
        """

        def __init__(self, trial, objective: str, evals: int):
            self.trial, self.objective, self.evals = trial, objective, evals
            self.points: dict[int, int] = {}
            self.reported: set[int] = set()
            self.pruned_at: Optional[int] = None
            self.last_metrics: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.points = {max(1, round(state.max_steps * k / self.evals)): k for k in range(1, self.evals + 1)}

        def on_step_end(self, args, state, control, **kwargs):
            # The default flow saves a checkpoint at the last step; a trial has no use for one.
            control.should_save = False
            if state.global_step in self.points:
                control.should_evaluate = True
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.last_metrics = dict(metrics or {})
            index = self.points.get(state.global_step)
            if index is None or index in self.reported:
                return control
            if self.objective not in self.last_metrics:
                raise ConfigError(f"tune.objective: {self.objective} is not among the eval metrics "
                                  f"({', '.join(sorted(k for k in self.last_metrics if k.startswith('eval_')))})")
            self.reported.add(index)
            self.trial.report(float(self.last_metrics[self.objective]), index)
            if self.trial.should_prune():
                self.pruned_at = index
                control.should_training_stop = True
            return control

    return PruningCallback


def check_search_space(train_cfg, space: dict[str, SearchParam]) -> None:
    """Every searched key exists in `train:` and takes every value the search may draw."""
    from .training import apply_overrides

    for key, spec in space.items():
        values = spec.choices if spec.kind == "categorical" else [spec.low, spec.high]
        if spec.kind == "int":
            values = [int(v) for v in values]
        for value in values:
            apply_overrides(train_cfg, {key: value}, prefix="tune.search_space")


def training_objective(cfg: TuneConfig, train_cfg, model_dir, processed_dir, *,
                       trust_remote_code: bool = False, device: Optional[str] = None,
                       callbacks: Sequence = ()) -> Callable:
    """An Optuna objective that trains ``train_cfg`` with a trial's params on the trial budget.

    ``callbacks``: more TrainerCallbacks for every trial (logging, or a test's injected failure).
    """
    import tempfile

    import optuna
    from datasets import load_from_disk

    from .training import apply_overrides, run_training

    train_rows = load_from_disk(str(processed_dir))["train"].num_rows
    max_train_rows = None if cfg.train_fraction >= 1.0 else max(1, round(train_rows * cfg.train_fraction))
    budget = trial_budget(cfg)
    pruning_callback = _pruning_callback_class()

    def objective(trial):
        params = suggest(trial, cfg.search_space)
        trial_cfg = apply_overrides(train_cfg, {**budget, **params})
        callback = pruning_callback(trial, cfg.objective, cfg.evals_per_trial)
        with tempfile.TemporaryDirectory(prefix=f"vqatune-trial-{trial.number}-") as scratch, \
                _no_dataset_cache_files():
            result = run_training(trial_cfg, model_dir, processed_dir, None, checkpoint_dir=scratch,
                                  callbacks=[callback, *callbacks], max_train_rows=max_train_rows, resume=False,
                                  trust_remote_code=trust_remote_code, device=device)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("train_seconds", result.seconds)
        trial.set_user_attr("examples_per_s", result.examples_per_s)
        trial.set_user_attr("peak_memory_gib", result.peak_memory_gib)
        if callback.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at evaluation {callback.pruned_at} of {cfg.evals_per_trial}")
        return float(callback.last_metrics[cfg.objective])

    return objective


def study_name_for(cfg: TuneConfig, train_cfg, model_dir, processed_dir) -> str:
    """``study_name`` plus a key of every input that changes what a trial returns, the code included.

    `train:` values the budget or the search replace don't change a trial and stay out of the
    key, so tweaking one (train.learning_rate, say) resumes the study instead of restarting it;
    so do n_trials, timeout, storage and heartbeats: raise n_trials and only new trials run.
    """
    from .config import as_dict
    from .training import apply_overrides

    fixed = {key: spec.choices[0] if spec.kind == "categorical" else (int(spec.low) if spec.kind == "int" else spec.low)
             for key, spec in cfg.search_space.items()}
    key_cfg = apply_overrides(train_cfg, {**trial_budget(cfg), **fixed})
    # Trials train on one process each, whatever train.num_processes says for the train stage.
    train_key = {k: v for k, v in as_dict(key_cfg).items() if k != "num_processes"}
    inputs = {"code": code_signature(), "train": train_key, "model": folder_signature(model_dir),
              "data": folder_signature(processed_dir)}
    return f"{cfg.study_name}-{study_key(cfg, json.dumps(inputs, sort_keys=True, default=str))}"


def tune(cfg: TuneConfig, train_cfg, model_dir, processed_dir, *, worker: int = 0,
         trust_remote_code: bool = False, device: Optional[str] = None):
    """The search stage: join the study for these inputs, run trials until it is done, return it."""
    check_search_space(train_cfg, cfg.search_space)
    name = study_name_for(cfg, train_cfg, model_dir, processed_dir)
    objective = training_objective(cfg, train_cfg, model_dir, processed_dir,
                                   trust_remote_code=trust_remote_code, device=device)
    return run_search(cfg, name, objective, worker=worker)
