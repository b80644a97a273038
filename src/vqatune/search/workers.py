"""Workers sharing one Optuna study: however many processes, GPUs or machines run it, together
they finish exactly the study's target of complete + pruned trials, a dead worker's running trial
is failed and run again, and every trial's failure reason and memory are kept with it."""
from __future__ import annotations

import gc
import logging
import math
import os
import socket
import sys
import time
import traceback
import warnings
from typing import Callable

log = logging.getLogger(__name__)


class SearchError(RuntimeError):
    """The search could not produce a result; the message is one line saying why."""


class _SurplusTrial(Exception):
    """Another worker claimed the study's last slot between our count and our ask."""


def _live_states():
    from optuna.trial import TrialState

    # Not WAITING: an enqueued trial holds no slot until a worker's ask() pops it.
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _owner() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time()}


def _device() -> str:
    """Where this worker trains: its GPU (and the CUDA_VISIBLE_DEVICES that pinned it) or the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        return f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible})"
    return "cpu"


def _owner_alive(owner: dict) -> bool:
    import psutil

    try:
        return psutil.Process(owner["pid"]).create_time() == owner["started"]
    except psutil.Error:
        return False


def fail_abandoned_trials(study) -> int:
    """Fail running trials whose worker is gone, so their slots are run again.

    Heartbeats catch a dead worker anywhere after ``grace_seconds``; a worker on this host whose
    process no longer exists is caught at once, so a killed search restarts without waiting.
    """
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = 0
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if not owner or owner.get("host") != host or _owner_alive(owner):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason",
                                               f"worker process {owner['pid']} died mid-trial")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    if failed:
        log.warning("failed %d trial(s) left running by a dead worker; their slots run again", failed)
    return failed


def trial_counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    """Trials by state. A FAIL is `failed` when the trial raised, `abandoned` when its worker was
    interrupted or died (not the settings' fault: it counts against no budget), `surplus` when it
    lost the race for the study's last slot."""
    counts = {"complete": 0, "pruned": 0, "failed": 0, "abandoned": 0, "surplus": 0, "running": 0,
              "waiting": 0}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif trial.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif trial.state == TrialState.FAIL:
            if trial.user_attrs.get("surplus"):
                counts["surplus"] += 1
            else:
                counts["failed" if trial.user_attrs.get("error") else "abandoned"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
        else:
            counts["waiting"] += 1
    return counts


def run_worker(study, cfg, objective: Callable, *, poll_seconds: float = 2.0) -> int:
    """Run trials of ``study`` until it has ``cfg.target_trials`` complete + pruned trials.

    Several workers (processes, GPUs, machines) call this on the same study. Each claims a slot
    only while finished + running trials are fewer than the target, so together they finish
    exactly the target; while the last slots are held by others a worker waits, and takes a slot
    over when its trial fails or its worker dies. Returns the number of trials this worker ran.
    """
    target = cfg.target_trials
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else math.inf
    ran = 0
    announced_wait = False
    while time.monotonic() < deadline:
        fail_abandoned_trials(study)
        counts = trial_counts(study)
        finished = counts["complete"] + counts["pruned"]
        if finished >= target:
            break
        if counts["failed"] >= cfg.failure_budget:
            log.warning("stopping: %d failed trials reached tune.max_failed_trials", counts["failed"])
            break
        if finished + counts["running"] >= target:
            if not announced_wait:
                log.info("the last %d trial(s) run on other workers; waiting for them", counts["running"])
                announced_wait = True
            time.sleep(poll_seconds)
            continue
        announced_wait = False
        study.optimize(_claimed(objective, target), n_trials=1, catch=(Exception,), gc_after_trial=True)
        ran += 1
    return ran


def _claimed(objective: Callable, target: int) -> Callable:
    """``objective`` behind a slot check made after the trial exists in the storage.

    Trial numbers are assigned by the database in creation order, so every worker agrees on which
    live trials come first; a trial with ``target`` live trials before it is surplus and gives up
    before any work. This closes the race between counting and asking.
    """
    import optuna

    from ..training.run import TrainingInterrupted

    def run(trial):
        trial.set_user_attr("worker", _owner())
        trial.set_user_attr("device", _device())
        ahead = sum(1 for t in trial.study.get_trials(deepcopy=False, states=_live_states())
                    if t.number < trial.number)
        if ahead >= target:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", "surplus: other workers already hold every slot")
            raise _SurplusTrial(f"trial {trial.number} is surplus")
        reason = None
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            _record_memory(trial)
            raise
        except (KeyboardInterrupt, TrainingInterrupted):
            # Ctrl-C or SIGTERM stops the worker, not just this trial; the trial is failed and
            # its slot runs again when the search is started again.
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
            raise KeyboardInterrupt from None
        except Exception as err:
            # The traceback as text: a log record holding exc_info would keep the failed trial's
            # frames, and with them its model, alive in any handler that stores records.
            log.warning("trial %d failed:\n%s", trial.number, traceback.format_exc())
            reason = one_line(err)
        else:
            # Measured after the trial freed its model: growth here over trials is a leak.
            _record_memory(trial)
            return value
        # Out of the except block the traceback, and with it the failed trainer and model that
        # its frames hold (a CUDA OOM's included), is gone: free them before the next trial.
        _record_memory(trial)
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("error", True)
        raise TrialFailed(reason)

    return run


class TrialFailed(RuntimeError):
    """A trial raised; its one-line reason is kept with the trial as ``fail_reason``."""


def _record_memory(trial) -> None:
    for key, value in release_memory().items():
        trial.set_user_attr(key, value)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def release_memory() -> dict[str, float]:
    """Collect garbage, return cached GPU blocks, and measure what the process still holds (MiB)."""
    import psutil

    gc.collect()
    usage = {"rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1)}
    torch = sys.modules.get("torch")  # a trial that never imported torch holds no tensors
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        usage["gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        usage["gpu_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return usage
