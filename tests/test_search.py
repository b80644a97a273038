"""The Optuna search: config validation, workers sharing one study (SQLite and a real PostgreSQL
server), resume after a kill, failed trials, pruning and memory on the tiny model, outputs."""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest

from vqatune.config import ConfigError, build, load_params, section
from vqatune.search.config import TuneConfig
from vqatune.search.objective import study_name_for, training_objective
from vqatune.search.study import open_study, run_search, suggest
from vqatune.search.workers import SearchError, trial_counts
from vqatune.search.report import best_params_record, search_metrics

from conftest_search import finish, start_worker

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def tune_cfg(tmp_path, **overrides) -> TuneConfig:
    raw = {"storage": f"sqlite:///{tmp_path}/study.db", "n_trials": 4, "sampler": "random",
           "pruner": "none", "heartbeat_seconds": 1, "grace_seconds": 3, **overrides}
    return build(TuneConfig, raw, "tune")


def quadratic(cfg, seconds=0.0):
    """A stand-in objective: cheap, deterministic in its params, optionally slow."""

    def objective(trial):
        params = suggest(trial, cfg.search_space)
        time.sleep(seconds)
        return (params["lora.dropout"] - 0.03) ** 2 + params["learning_rate"]

    return objective


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

def test_repo_params_tune_section_is_valid_and_small():
    cfg = section(load_params(REPO / "params.yaml"), "tune", TuneConfig)
    assert cfg.storage.startswith("sqlite:///models/tune/")
    # The embedded search is a few trials on a quarter of the rows (less barely leaves the untrained
    # loss): a few minutes on CPU.
    assert cfg.n_trials <= 6 and cfg.train_fraction * cfg.epochs <= 0.25 and cfg.eval_rows <= 32
    assert set(cfg.search_space) == {"learning_rate", "gradient_accumulation_steps", "lora.r",
                                     "lora.alpha", "lora.dropout"}


def test_default_space_is_the_guides():
    space = TuneConfig().search_space
    assert (space["learning_rate"].low, space["learning_rate"].high, space["learning_rate"].log) == (1e-6, 1e-4, True)
    assert space["gradient_accumulation_steps"].choices == [1, 2, 4, 8, 16]
    assert space["lora.r"].choices == [16, 32] and space["lora.alpha"].choices == [16, 32, 64, 128]
    assert space["lora.dropout"].grid() == pytest.approx([i / 100 for i in range(11)])


@pytest.mark.parametrize("raw, message", [
    ({"samplr": "tpe"}, r"tune\.samplr: unknown key"),
    ({"sampler": "bayes"}, r"tune\.sampler: 'bayes' is not allowed; choose one of 'tpe'"),
    ({"pruner": "asha"}, r"tune\.pruner: 'asha' is not allowed"),
    ({"n_trials": 0}, r"tune\.n_trials: must be at least 1"),
    ({"train_fraction": 0}, r"tune\.train_fraction: must be in \(0, 1\]"),
    ({"storage": "models/tune/study.db"}, r"tune\.storage: must be a database URL"),
    ({"objective": "accuracy"}, r"tune\.objective: must be an eval metric"),
    ({"grace_seconds": 10, "heartbeat_seconds": 30}, r"tune\.grace_seconds: must exceed"),
    ({"search_space": {"lora.r": {"kind": "int", "low": 8}}}, r"tune\.search_space\.lora\.r: a int parameter needs low and high"),
    ({"search_space": {"lora.r": {"choices": [8]}}}, r"tune\.search_space\.lora\.r\.kind: missing"),
    ({"search_space": {"lr": {"kind": "float", "low": 0, "high": 1, "log": True}}}, r"lr\.low: must be positive on a log scale"),
    ({"search_space": {"lr": {"kind": "float", "low": 1, "high": 0}}}, r"lr\.low: must not exceed high"),
    ({"search_space": {"lr": {"kind": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}}}, r"log and step exclude"),
    ({"search_space": {"r": {"kind": "int", "low": 1.5, "high": 4}}}, r"r\.low: an int parameter needs whole numbers"),
    ({"search_space": {"r": {"kind": "categorical", "choices": [[1, 2]]}}}, r"r\.choices: choices must be numbers"),
    ({"search_space": {"r": {"kind": "float", "low": 1, "high": 2, "choices": [1]}}}, r"r\.choices: only categorical"),
    ({"sampler": "grid"}, r"tune\.search_space\.learning_rate\.step: the grid sampler needs a step"),
])
def test_bad_tune_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        section({"tune": raw}, "tune", TuneConfig)


def test_the_study_name_changes_with_what_trials_depend_on_and_nothing_else(tmp_path, monkeypatch):
    from vqatune.training.config import TrainConfig

    model, data = tmp_path / "model", tmp_path / "data" / "train"
    model.mkdir()
    data.mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 64}')
    (data / "state.json").write_text('{"_fingerprint": "abc"}')
    train, cfg = TrainConfig(), TuneConfig()
    name = study_name_for(cfg, train, model, data.parent)
    assert name.startswith("vqatune-")

    def renamed(**tune_changes) -> str:
        return study_name_for(build(TuneConfig, tune_changes, "tune"), train, model, data.parent)

    # Resumable: more trials, another storage, a searched or budget-set train value, a datasets cache file.
    assert renamed(n_trials=50, timeout=60.0, storage="sqlite:///elsewhere.db") == name
    assert study_name_for(cfg, build(TrainConfig, {"learning_rate": 1e-3, "epochs": 3.0}, "train"),
                          model, data.parent) == name
    (data / "cache-0123abcd.arrow").write_bytes(b"indices")
    assert study_name_for(cfg, train, model, data.parent) == name
    # A new study: what a trial does or returns changed.
    assert renamed(epochs=0.5) != name and renamed(sampler="random") != name
    assert study_name_for(cfg, build(TrainConfig, {"batch_size": 2}, "train"), model, data.parent) != name
    (data / "state.json").write_text('{"_fingerprint": "def"}')
    assert study_name_for(cfg, train, model, data.parent) != name
    (data / "state.json").write_text('{"_fingerprint": "abc"}')
    assert study_name_for(cfg, train, model, data.parent) == name
    # Other code: its trials' numbers may not be this code's.
    monkeypatch.setattr("vqatune.search.objective.code_signature", lambda entry: "other")
    assert study_name_for(cfg, train, model, data.parent) != name


def test_grid_sampler_runs_each_combination_once(tmp_path):
    space = {"lora.dropout": {"kind": "float", "low": 0.0, "high": 0.02, "step": 0.01},
             "lora.r": {"kind": "categorical", "choices": [16, 32]}}
    cfg = tune_cfg(tmp_path, sampler="grid", n_trials=50, search_space=space)
    assert cfg.target_trials == 6  # 3 x 2 combinations, not 50

    def objective(trial):
        return sum(suggest(trial, cfg.search_space).values())

    study = run_search(cfg, "grid", objective)
    combos = {(t.params["lora.dropout"], t.params["lora.r"]) for t in study.trials}
    assert len(study.trials) == 6 and len(combos) == 6


# --------------------------------------------------------------------------------------
# Failures, resume and workers sharing a study
# --------------------------------------------------------------------------------------

def test_failed_trials_are_recorded_with_their_reason_and_the_study_goes_on(tmp_path):
    import torch

    cfg = tune_cfg(tmp_path, n_trials=3)
    good = quadratic(cfg)

    def objective(trial):
        if trial.number in (0, 2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return good(trial)

    study = run_search(cfg, "oom", objective)
    assert trial_counts(study) == {"complete": 3, "pruned": 0, "failed": 2, "abandoned": 0, "surplus": 0,
                                   "running": 0, "waiting": 0}
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.user_attrs["fail_reason"] for t in failed] == \
        ["OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"] * 2
    # Memory is measured after every trial, failed ones included.
    assert all(t.user_attrs["rss_mib"] > 0 for t in study.trials)
    metrics = search_metrics(study, cfg, seconds=1.0, storage_url=cfg.storage)
    assert metrics["trials_failed"] == 2 and metrics["fail_reasons"] == {failed[0].user_attrs["fail_reason"]: 2}


def test_when_every_trial_fails_the_search_stops_with_one_line(tmp_path):
    cfg = tune_cfg(tmp_path, n_trials=3)

    def objective(trial):
        raise ValueError("labels are all -100: no answer tokens in the batch")

    with pytest.raises(SearchError) as err:
        run_search(cfg, "doomed", objective)
    message = str(err.value)
    assert "\n" not in message
    assert message == "all 3 trials failed; last reason: ValueError: labels are all -100: no answer tokens in the batch"


def test_ctrl_c_stops_the_worker_and_the_trial_is_abandoned_not_failed(tmp_path):
    cfg = tune_cfg(tmp_path, n_trials=3)
    good = quadratic(cfg)

    def objective(trial):
        if trial.number == 1:
            raise KeyboardInterrupt
        return good(trial)

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, "interrupted", objective)
    study = optuna.load_study(study_name="interrupted", storage=cfg.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C or SIGTERM)"
    assert trial_counts(study)["abandoned"] == 1 and trial_counts(study)["failed"] == 0
    # Started again, it runs only the two missing trials.
    assert trial_counts(run_search(cfg, "interrupted", good))["complete"] == 3


def assert_exactly_shared(storage, n_trials, workers):
    study = optuna.load_study(study_name="shared", storage=storage)
    counts = trial_counts(study)
    assert counts["complete"] + counts["pruned"] == n_trials, counts
    assert counts["running"] == 0 and counts["failed"] == 0, counts
    owners = {t.user_attrs["worker"]["pid"] for t in study.trials if t.state.name == "COMPLETE"}
    assert owners == {w.pid for w in workers}, "every worker should have run trials"
    return study


def test_two_local_workers_share_a_sqlite_study_and_finish_exactly_n_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    # Create the study first so the two workers do not race to create the schema.
    open_study(tune_cfg(tmp_path), "shared")
    workers = [start_worker(tmp_path, storage, 7, 0.4, worker) for worker in (0, 1)]
    for proc in workers:
        finish(proc)
    assert_exactly_shared(storage, 7, workers)


def test_a_killed_search_resumes_keeping_finished_trials_and_runs_only_the_rest(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    # A long heartbeat grace: the dead worker must be recognised by its pid, not by waiting.
    first = start_worker(tmp_path, storage, 5, 1.0, 0, grace_seconds=600)
    deadline = time.monotonic() + 90
    while True:
        time.sleep(0.3)
        assert time.monotonic() < deadline and first.poll() is None, "worker ended before the kill"
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            continue
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        if states.count("COMPLETE") >= 2 and states[-1] == "RUNNING":
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed = optuna.load_study(study_name="shared", storage=storage)
    before = {t.number: t.value for t in killed.trials if t.state.name == "COMPLETE"}
    assert [t.state.name for t in killed.trials].count("RUNNING") == 1

    second = start_worker(tmp_path, storage, 5, 0.1, 0, grace_seconds=600)
    finish(second)
    study = optuna.load_study(study_name="shared", storage=storage)
    complete = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert len(complete) == 5 and all(complete[n] == v for n, v in before.items())
    # The killed worker's running trial is failed (without waiting for its heartbeat to go
    # stale) and only the remainder ran in the second process.
    dead = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(dead) == 1 and "died mid-trial" in dead[0].user_attrs["fail_reason"]
    assert trial_counts(study)["abandoned"] == 1 and trial_counts(study)["failed"] == 0
    rerun = [t for t in study.trials if t.user_attrs["worker"]["pid"] == second.pid]
    assert len(rerun) == 5 - len(before) and all(t.state.name == "COMPLETE" for t in rerun)


# --------------------------------------------------------------------------------------
# A real PostgreSQL server (conftest.postgres_url): what workers on several machines would share
# --------------------------------------------------------------------------------------

def test_two_workers_share_a_study_on_a_real_postgresql_server(tmp_path, postgres_url):
    cfg = build(TuneConfig, {"storage": postgres_url}, "tune")
    open_study(cfg, "shared")
    workers = [start_worker(tmp_path, postgres_url, 6, 0.4, worker) for worker in (0, 1)]
    for proc in workers:
        finish(proc)
    assert_exactly_shared(postgres_url, 6, workers)
    # The trials really live in the server's tables.
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        states = dict(conn.execute(sqlalchemy.text("SELECT state, count(*) FROM trials GROUP BY state")).all())
    engine.dispose()
    assert states.get("COMPLETE") == 6


# --------------------------------------------------------------------------------------
# The tiny model: pruning really happens, and trials leak no memory
# --------------------------------------------------------------------------------------

def live_models() -> int:
    import warnings

    import torch

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch objects warns
        return sum(1 for obj in gc.get_objects()
                   if isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("ForConditionalGeneration"))


class OomOnTrial:
    """A TrainerCallback that raises CUDA's out-of-memory error in the middle of one trial."""

    def __init__(self, number: int):
        self.number, self.calls = number, 0

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def on_train_begin(self, *args, **kwargs):
        self.calls += 1

    def on_step_end(self, *args, **kwargs):
        import torch

        if self.calls == self.number + 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_tiny_trials_prune_early_fail_cleanly_and_leak_no_memory(tmp_path, tiny_model_dir, processed_dir):
    import torch

    from vqatune.training.config import TrainConfig

    torch.set_num_threads(1)
    train = build(TrainConfig, {"quantization": "none", "batch_size": 1, "eval_batch_size": 4,
                                "gradient_checkpointing": False}, "train")
    cfg = tune_cfg(tmp_path, n_trials=4, pruner="median", pruner_startup_trials=1, pruner_warmup_evals=0,
                   max_steps=4, evals_per_trial=2, eval_rows=4,
                   search_space={"learning_rate": {"kind": "categorical", "choices": [1e-2, 1e-7]}})
    study = open_study(cfg, "tiny")
    # A learning rate that moves the loss, then one that cannot: the second is worse than the
    # median at the first evaluation and must stop there, halfway through its steps. The third
    # runs out of (simulated) CUDA memory mid-training: failed, freed, and the study goes on.
    for lr in (1e-2, 1e-7, 1e-2, 1e-2, 1e-2):
        study.enqueue_trial({"learning_rate": lr})
    train_trial = training_objective(cfg, train, tiny_model_dir, processed_dir, callbacks=[OomOnTrial(2)])
    models_alive = []

    def objective(trial):
        models_alive.append(live_models())  # what the trials before this one left behind
        return train_trial(trial)

    study = run_search(cfg, "tiny", objective)
    trials = study.trials
    assert [t.state.name for t in trials[:3]] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[2].user_attrs["fail_reason"] == "OutOfMemoryError: CUDA out of memory (simulated)"
    counts = trial_counts(study)
    assert counts["complete"] + counts["pruned"] == 4 and counts["failed"] == 1 and len(trials) == 5
    assert list(trials[0].intermediate_values) == [1, 2] and trials[0].user_attrs["steps"] == 4
    assert list(trials[1].intermediate_values) == [1] and trials[1].user_attrs["steps"] == 2
    assert trials[1].intermediate_values[1] > trials[0].intermediate_values[1]
    # Every model was freed after its trial, and the process did not grow trial over trial
    # (the first trial pays one-off allocations: imports, the allocator's arenas).
    assert models_alive == [0, 0, 0, 0, 0] and live_models() == 0
    rss = [t.user_attrs["rss_mib"] for t in trials]
    assert rss[-1] - rss[1] < 24, f"process memory grew over trials: {rss} MiB"
    best = best_params_record(study)
    assert best["searched"] and best["params"] == {"learning_rate": 1e-2}


# --------------------------------------------------------------------------------------
# The stage: outputs for the training stage, dvc metrics and plots
# --------------------------------------------------------------------------------------

def run_stage(tmp_path, tune_params, model="models/base", data="data/processed", extra=()):
    import yaml

    sys.path.insert(0, str(REPO / "stages"))
    try:
        import tune as stage
    finally:
        sys.path.pop(0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune": tune_params, "train": {
        "quantization": "none", "batch_size": 1, "eval_batch_size": 4, "gradient_checkpointing": False}}))
    out = {"best": tmp_path / "models/best_params.json", "metrics": tmp_path / "metrics/tune.json",
           "plots": tmp_path / "plots/tune"}
    # main() configures logging on this test's captured stream; keep it from outliving the test.
    handlers = logging.getLogger().handlers[:]
    try:
        code = stage.main(["--model", str(model), "--data", str(data), "--params", str(params),
                           "--best-params", str(out["best"]), "--metrics", str(out["metrics"]),
                           "--plots", str(out["plots"]), *extra])
    finally:
        logging.getLogger().handlers[:] = handlers
    return code, out


def test_disabled_stage_keeps_the_pipeline_shape_and_training_uses_train_as_is(tmp_path):
    from vqatune.training.config import load_hyperparameters

    code, out = run_stage(tmp_path, {"enabled": False}, model=tmp_path / "absent", data=tmp_path / "absent")
    assert code == 0
    assert json.loads(out["best"].read_text()) == {"searched": False, "params": {}}
    metrics = json.loads(out["metrics"].read_text())
    assert metrics.pop("searched") is False
    assert set(metrics) == {"provenance"}, "a disabled search reports nothing but that and its provenance"
    for name in ("history.csv", "importances.csv", "history.png", "importances.png"):
        assert (out["plots"] / name).stat().st_size > 0
    assert load_hyperparameters(out["best"]) == ({}, "params.yaml")


def test_stage_stops_on_a_bad_search_key_before_any_training(tmp_path, capsys):
    space = {"lora.rank": {"kind": "categorical", "choices": [8]}}
    code, out = run_stage(tmp_path, {"storage": f"sqlite:///{tmp_path}/s.db", "search_space": space},
                          model=tmp_path / "absent", data=tmp_path / "absent")
    assert code == 2 and not out["best"].exists()
    assert "tune: tune.search_space.lora.rank: unknown key; allowed here:" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_sqlite_study_is_one_line_naming_the_file(tmp_path, capsys, damage, tiny_model_dir,
                                                            processed_dir):
    """A study file cut short or overwritten stops the stage before any training, with one line
    naming the file and what to do, instead of SQLAlchemy's traceback."""
    import optuna

    db = tmp_path / "study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=f"sqlite:///{db}").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    whole = db.read_bytes()
    db.write_bytes(whole[: len(whole) // 3] if damage == "truncated" else b"not a database" * 300)
    code, out = run_stage(tmp_path, {"storage": f"sqlite:///{db}"}, model=tiny_model_dir, data=processed_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out["best"].exists() and not out["metrics"].exists()
    assert len(err) == 1 and err[0].startswith(f"tune: {db} is not a readable SQLite study (")
    assert "move it aside to start the search over" in err[0]


def test_stage_writes_best_params_the_training_stage_reads(tmp_path, tiny_model_dir, processed_dir):
    from vqatune.training.config import TrainConfig, apply_overrides, load_hyperparameters

    # A copy: the stage must leave data/processed (the prepare stage's DVC output) as it was.
    data = shutil.copytree(processed_dir, tmp_path / "processed")
    files = sorted(p.relative_to(data) for p in data.rglob("*"))
    tune_params = {"storage": f"sqlite:///{tmp_path}/tune/study.db", "n_trials": 2, "max_steps": 1,
                   "evals_per_trial": 1, "eval_rows": 2, "pruner": "none", "sampler": "random"}
    code, out = run_stage(tmp_path, tune_params, model=tiny_model_dir, data=data)
    assert code == 0
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == files
    best = json.loads(out["best"].read_text())
    metrics = json.loads(out["metrics"].read_text())
    assert best["searched"] and set(best["params"]) == set(TuneConfig().search_space)
    assert metrics["trials_complete"] == 2 and metrics["best_value"] == best["best_value"]
    assert metrics["best_trial"] == best["trial"] and metrics["seconds"] > 0
    overrides, source = load_hyperparameters(out["best"])
    trained = apply_overrides(TrainConfig(), overrides)
    assert trained.lora.r == best["params"]["lora.r"] and source.startswith("search")
    history = out["plots"].joinpath("history.csv").read_text().splitlines()
    assert history[0] == "trial,state,value,best_value,seconds,rss_mib" and len(history) == 3
    # Run again with the same inputs: the study resumes, already done, and runs no trial.
    before = out["metrics"].stat().st_mtime_ns
    code, out = run_stage(tmp_path, tune_params, model=tiny_model_dir, data=data)
    assert code == 0 and out["metrics"].stat().st_mtime_ns > before
    again = json.loads(out["metrics"].read_text())
    assert again["study"] == metrics["study"] and again["trials_complete"] == 2
    assert json.loads(out["best"].read_text()) == best
