"""The objective of the search: one short training run per trial, on a budget, reporting its eval
loss at evenly spaced evaluations so a pruner can stop it; and the study's name, which keys every
input that changes what a trial returns (the training code included)."""
from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Optional, Sequence

from ..config import ConfigError, as_dict
from ..faults import fault_armed, kill_now
from ..provenance import code_signature, folder_signature
from ..training.config import apply_overrides
from .config import SearchParam, TuneConfig
from .study import run_search, study_key, suggest

# The module whose import closure is the code a trial executes (the search's objective and the
# training it runs): its files go into the study's key, the CLI's and evaluation's do not.
SEARCH_ENTRY = "vqatune.search.objective"


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
            if index == 1 and fault_armed("trial-eval", self.trial.number):
                kill_now()  # the fault tests: a search killed mid-trial
            if self.trial.should_prune():
                self.pruned_at = index
                control.should_training_stop = True
            return control

    return PruningCallback


def check_search_space(train_cfg, space: dict[str, SearchParam]) -> None:
    """Every searched key exists in `train:` and takes every value the search may draw."""
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
    from ..data.processed import load_prepared
    from ..training.run import run_training

    train_rows = load_prepared(processed_dir)["train"].num_rows
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
    fixed = {key: spec.choices[0] if spec.kind == "categorical" else (int(spec.low) if spec.kind == "int" else spec.low)
             for key, spec in cfg.search_space.items()}
    key_cfg = apply_overrides(train_cfg, {**trial_budget(cfg), **fixed})
    # Trials train on one process each, whatever train.num_processes says for the train stage.
    train_key = {k: v for k, v in as_dict(key_cfg).items() if k != "num_processes"}
    inputs = {"code": code_signature(SEARCH_ENTRY), "train": train_key, "model": folder_signature(model_dir),
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
