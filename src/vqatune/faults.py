"""Fault points for the fault tests (tests/test_faults.py): ``VQATUNE_FAULT`` names one place
where the process dies, or waits, as a real fault would make it. Unset (always, outside the
tests) a fault point costs one ``os.environ`` lookup.

    VQATUNE_FAULT=checkpoint-write:<step>   SIGKILL while that step's checkpoint is written
    VQATUNE_FAULT=<stage>-write             SIGKILL while the stage's staging folder is half
                                            written, just before ``outputs.replace_dir`` renames
                                            it into place: base_model, prepare, train, merge,
                                            export, tune (its plots), evaluate-predictions,
                                            evaluate-plots; and export-text (export's staging
                                            once the text GGUF is written, before the mmproj)
    VQATUNE_FAULT=pause-<stage>-write:<file> there, create <file>.waiting and wait until <file>
                                            exists (a slow stage without sleeps: tests hold a
                                            `dvc repro` mid-stage)
    VQATUNE_FAULT=atomic-write:<name>       SIGKILL while ``outputs.write_atomic`` writes a file
                                            of that name (metrics, best_params.json): its
                                            temporary half written, before the rename
    VQATUNE_FAULT=trial-eval:<trial>        SIGKILL inside search trial <trial> (its number in the
                                            study) just after its first evaluation is reported
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "VQATUNE_FAULT"


def fault_armed(point: str, step: int | str) -> bool:
    """True when ``VQATUNE_FAULT`` is ``<point>:<step>``: one environment lookup, nothing else."""
    return os.environ.get(FAULT_ENV) == f"{point}:{step}"


def kill_now() -> None:
    """SIGKILL this process: no handler, no clean-up, as the OOM killer or `kill -9` would."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_mid_write(path: str | Path) -> None:
    """What SIGKILL during the write of ``path`` leaves: the first half of its bytes, then no process."""
    path = Path(path)
    data = path.read_bytes()
    with path.open("r+b") as fh:
        fh.truncate(len(data) // 2)
        fh.flush()
        os.fsync(fh.fileno())
    kill_now()


def staging_fault_point(stage: str, staging: Path) -> None:
    """The fault point of a stage's output writes, just before ``staging`` is renamed into place:
    ``<stage>-write`` dies with the largest file of ``staging`` half written (what a kill during
    the write leaves); ``pause-<stage>-write:<file>`` creates ``<file>.waiting`` and waits until
    ``<file>`` exists."""
    fault = os.environ.get(FAULT_ENV)
    if fault is None:
        return
    point = f"{stage}-write"
    if fault == point:
        files = [p for p in Path(staging).rglob("*") if p.is_file()]
        kill_mid_write(max(files, key=lambda p: p.stat().st_size))
    elif fault.startswith(f"pause-{point}:"):
        release = Path(fault.split(":", 1)[1])
        release.with_name(release.name + ".waiting").touch()
        while not release.exists():
            time.sleep(0.05)
