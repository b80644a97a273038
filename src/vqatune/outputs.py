"""Writing a stage's result files so that a killed stage never leaves half a file behind.

``write_metrics`` is how every stage writes its metrics JSON: into a temporary file in the same
folder, then renamed over the target (``os.replace`` is atomic on one filesystem). A stage killed
midway, or data that cannot be serialised, leaves the previous file (or none) and no temporary.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO


def write_atomic(path: str | Path, write: Callable[[TextIO], Any] | str) -> Path:
    """Write ``path`` through a temporary sibling and rename it into place.

    ``write``: the text, or a function that writes to the open file. Any error (a full disk, a
    value json cannot encode) removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if callable(write):
                write(fh)
            else:
                fh.write(write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
