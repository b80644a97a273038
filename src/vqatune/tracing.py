"""What a stage really reads, to check it against what dvc.yaml declares.

With ``VQATUNE_TRACE=<file>`` set, every params field a stage reads (through the typed configs),
every file under the working directory it opens for reading (Python-level opens: the audit
hook does not see files mapped by native code such as safetensors) and every vqatune module it
imported (as ``src/vqatune/...``, wherever the package was imported from: a compiled ``.pyc``
is read in place of its source, so opens alone would miss them) are appended to ``<file>`` as
one JSON line per process when it exits. The workflow tests run the pipeline this way and fail
when a stage reads a params key, a file or a module that its dvc.yaml entry does not declare.
Off (and free) unless the variable is set.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
from pathlib import Path

ENV = "VQATUNE_TRACE"
_params: set[str] = set()
_files: set[str] = set()
_installed = False


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def traced(obj, prefix: str):
    """Return ``obj`` (a dataclass instance) recording each field read as ``prefix.field``."""
    if not enabled() or not dataclasses.is_dataclass(obj):
        return obj
    cls = type(obj)
    if getattr(cls, "_vqatune_traced", False):
        return obj
    names = {f.name for f in dataclasses.fields(cls)}

    def __getattribute__(self, name):
        if name in names:
            # Looked up through sys.modules: datasets.map may run a dill copy of this method,
            # whose closure would otherwise hold a copy of the set.
            sys.modules[__name__]._params.add(f"{object.__getattribute__(self, '_vqatune_prefix')}.{name}")
        return object.__getattribute__(self, name)

    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "_vqatune_traced": True,
                                      "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    object.__setattr__(obj, "_vqatune_prefix", prefix)
    obj.__class__ = sub
    return obj


def _audit(event: str, args) -> None:
    if event != "open" or not args or not isinstance(args[0], (str, os.PathLike)):
        return
    mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
    if any(c in mode for c in "wax+"):
        return
    try:
        rel = Path(os.fspath(args[0])).resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return
    if rel.parts and rel.parts[0] not in (".venv", ".git", ".dvc") and "__pycache__" not in rel.parts:
        _files.add(rel.as_posix())


def imported_modules() -> list[str]:
    """The vqatune modules this process imported, as repository paths (``src/vqatune/...``)."""
    root = Path(__file__).resolve().parent
    found = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and getattr(module, "__name__", "").split(".")[0] == root.name:
            found.add((Path("src") / root.name / Path(file).resolve().relative_to(root)).as_posix())
    return sorted(found)


def _dump() -> None:
    files = sorted(f for f in _files if Path(f).is_file())
    record = {"argv": sys.argv, "params": sorted(_params), "files": files, "modules": imported_modules()}
    with open(os.environ[ENV], "a") as fh:  # noqa: the audit hook ignores write modes
        fh.write(json.dumps(record) + "\n")


def install() -> None:
    global _installed
    if _installed or not enabled():
        return
    _installed = True
    sys.addaudithook(_audit)
    atexit.register(_dump)
