"""Shared by test_search and test_faults: search workers in their own processes, each running
a study of quick fake trials (a sleep), as several machines would."""
from __future__ import annotations

import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import socket, sys, time
    from vqatune.config import build
    from vqatune.search.config import TuneConfig
    from vqatune.search.study import run_search, suggest

    storage, n_trials, seconds, worker, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 6:  # a worker on another machine: its pid says nothing here
        socket.gethostname = lambda: sys.argv[6]
    cfg = build(TuneConfig, {"storage": storage, "n_trials": n_trials, "sampler": "random",
                             "pruner": "none", "heartbeat_seconds": 1, "grace_seconds": grace}, "tune")

    def objective(trial):
        params = suggest(trial, cfg.search_space)
        time.sleep(seconds)
        return params["learning_rate"]

    run_search(cfg, "shared", objective, worker=worker)
""")


def start_worker(tmp_path, storage, n_trials, seconds, worker, grace_seconds=3, host=None):
    """A worker process on ``storage``'s study "shared"; ``host``: pretend to run on that machine."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), storage, str(n_trials), str(seconds), str(worker),
                             str(grace_seconds), *([host] if host else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out
