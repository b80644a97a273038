"""Writing a stage's result files so that a killed stage never leaves half a file behind.

``write_metrics`` is how every stage writes its metrics JSON: into a temporary file in the same
folder, then renamed over the target (``os.replace`` is atomic on one filesystem). A stage killed
midway, or data that cannot be serialised, leaves the previous file (or none) and no temporary.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO

from .faults import fault_armed, kill_mid_write, staging_fault_point


def write_atomic(path: str | Path, write: Callable[[TextIO], Any] | str) -> Path:
    """Write ``path`` through a temporary sibling and rename it into place.

    ``write``: the text, or a function that writes to the open file. Any error (a full disk, a
    value json cannot encode) removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if callable(write):
                write(fh)
            else:
                fh.write(write)
        if fault_armed("atomic-write", path.name):
            kill_mid_write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # What an earlier writer killed before its rename left (never taken for the file: another name).
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (one trailing newline), atomically."""
    def dump(fh: TextIO) -> None:
        json.dump(data, fh, indent=2)
        fh.write("\n")

    return write_atomic(path, dump)


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """A stage's metrics file (what dvc.yaml declares under ``metrics:``), atomically."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    return write_json(path, metrics)


def replace_dir(staging: str | Path, out_dir: str | Path, stage: str) -> Path:
    """Move a finished staging folder (a sibling of ``out_dir``) into place, replacing an older
    ``out_dir``. Killed before the rename, a stage leaves only the staging folder, which its rerun
    deletes; killed between the removal and the rename, no ``out_dir``: DVC reruns the stage either
    way. ``stage``: the name of the fault point here (``faults.staging_fault_point``)."""
    staging, out_dir = Path(staging), Path(out_dir)
    staging_fault_point(stage, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def fresh_staging(out_dir: str | Path, name: str | None = None) -> Path:
    """An empty staging folder for ``out_dir``: its sibling ``name`` (default ``<out_dir>.tmp``), a
    killed earlier run's leftover deleted. Write there, then ``replace_dir`` it into place."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(name or out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


# errno of a full disk, a full quota, and a file over RLIMIT_FSIZE (how the tests fill the disk).
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What libraries say when they swallow the OSError (torch's zip writer, arrow, and numpy's
# ndarray.tofile on a short write, which the GGUF converter reports).
DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "file write failed",
                  " requested and ")


def disk_full(err: BaseException, writing: str = "a file") -> str | None:
    """One line for an error that a full disk caused (anywhere in its chain), else None.
    ``writing``: what to name when the error does not say which file (torch and arrow don't)."""
    seen, current = set(), err
    text = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return (f"cannot write {current.filename or writing}: {os.strerror(current.errno)} "
                    "(disk full or file-size limit)")
        if text is None and any(t in str(current) for t in DISK_FULL_TEXT):
            text = str(current).strip().splitlines()[0][:300]
        current = current.__cause__ or current.__context__
    return None if text is None else f"cannot write {writing}: {text} (disk full or file-size limit)"


def _arg(flag: str, default: str) -> str:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def exit_on_disk_full(stage: str, main: Callable[[], int], outputs: dict[str, str]) -> int:
    """Run a stage's ``main``; a full disk becomes one line on stderr and exit code 1 instead of a
    traceback. ``outputs``: the stage's output flags and their defaults (``{"--out": ...}``), named
    when the error does not say which file. Every stage writes its outputs to a staging folder
    renamed into place at the end, so what a failed write leaves is never taken as done by DVC."""
    try:
        return main()
    except Exception as err:  # noqa: BLE001  re-raised unless the disk is full
        writing = " or ".join(_arg(flag, default) for flag, default in outputs.items())
        message = disk_full(err, writing)
        if message is None:
            raise
        print(f"{stage}: {message}; nothing was renamed into place; free space and rerun", file=sys.stderr)
        return 1
