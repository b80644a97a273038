"""`tune:` of params.yaml: the search space, the sampler and pruner, and one trial's budget."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

from ..config import ConfigError, require


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
