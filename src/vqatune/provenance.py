"""What a run ran on and from: library versions, the device, content fingerprints of the input
folders and the effective params, recorded next to every output (each stage's metrics file under
"provenance", the adapter's model card), so a metric can be traced to its cause.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

LIBRARIES = ("vqatune", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
             "datasets", "optuna", "dvc", "dvclive", "gguf")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment() -> dict[str, str]:
    from .cpu_numerics import numerics_label

    return {"python": platform.python_version(), "device": device_name(),
            "cpu_numerics": numerics_label(), **library_versions()}


def fingerprint(path: str | Path) -> str:
    """A short content hash of a file or folder (sorted relative paths and bytes).

    Content, not names/sizes/mtimes, so a colleague's clone gets the same value. It reads every
    byte: ~1-2 GB/s of SHA-256 on one core, i.e. a few seconds for MedGemma-4B's ~8.6 GB, which
    the stage reads anyway (warm page cache); milliseconds for the embedded default.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def folder_signature(folder: str | Path) -> str:
    """Cheap identity of a model or dataset folder: small JSON files by content, the rest by size.

    For the keys that decide what may be resumed (a training's checkpoints, a search's study),
    computed by every run and every search worker: hashing an 8 GB checkpoint each time would cost
    minutes (``fingerprint`` reads every byte, once per stage, for the record); names, sizes and
    the configs and dataset fingerprints in the JSON files identify it. ``datasets`` cache files
    (written beside a loaded dataset by shuffle/select) are left out: they don't change the data.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.name.startswith("cache-") and file.suffix == ".arrow":
            continue
        digest.update(str(file.relative_to(folder)).encode())
        small_json = file.suffix == ".json" and file.stat().st_size < 1 << 20
        digest.update(file.read_bytes() if small_json else str(file.stat().st_size).encode())
    return digest.hexdigest()[:12]


PACKAGE_ROOT = Path(__file__).resolve().parent
PACKAGE = PACKAGE_ROOT.name


def _module_file(name: str, root: Path) -> Optional[Path]:
    """The source file of project module ``name`` (``vqatune.training.run``) under ``root``, or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(file: Path, module: str) -> set[str]:
    """Every module ``file`` (the module named ``module``) imports anywhere: at the top or inside a
    function, which is where the heavy imports live. ``from x import y`` names x and x.y (y may be a
    submodule)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_closure(entries: Iterable[str | Path], root: Path = PACKAGE_ROOT) -> list[Path]:
    """The project's source files that ``entries`` can import, directly or through each other.

    ``entries``: module names (``vqatune.training.run``) or script paths (``stages/train.py``).
    Read from the source (no import runs), imports inside functions included, so a branch that
    does not run this time (the builtin tiny model, a GPU-only lever) still counts; importing a
    submodule counts every package ``__init__.py`` above it. Sorted.
    """
    todo: list[tuple[Path, str]] = []
    for entry in entries:
        if isinstance(entry, Path) or str(entry).endswith(".py"):
            todo.append((Path(entry), "__main__"))
        else:
            file = _module_file(str(entry), root)
            if file is None:
                raise ValueError(f"{entry}: no such module under {root}")
            todo.append((file, str(entry)))
    seen: dict[Path, str] = {}
    while todo:
        file, module = todo.pop()
        if file in seen:
            continue
        seen[file] = module
        for name in _imported_modules(file, module):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the packages above a module run first
                prefix = ".".join(parts[:i])
                found = _module_file(prefix, root)
                if found is not None and found not in seen:
                    todo.append((found, prefix))
    return sorted(f for f in seen if f.is_relative_to(root))


def code_signature(entry: str, root: Path = PACKAGE_ROOT) -> str:
    """The source of exactly the code module ``entry`` runs (its ``import_closure``, by content):
    a checkpoint or a search trial made by other code is never resumed, as the numbers it holds may
    not be this code's. Modules it cannot reach (the CLI, evaluation, export) are not in it."""
    digest = hashlib.sha256()
    for file in import_closure([entry], root):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def peak_memory(device) -> tuple[float, str]:
    """(GiB, what was measured): the device's peak allocated memory on CUDA, else the process's peak
    resident memory (model and data included), for a stage's metrics."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process max RSS (cpu)"


def record(*, params: dict[str, Any], inputs: Iterable[str | Path] = (), outputs: Iterable[str | Path] = ()) -> dict:
    """The "provenance" block of a stage's metrics file.

    ``params``: the effective values the stage used, keyed as in params.yaml (``"train"``,
    ``"model.trust_remote_code"``); dataclass sections become dicts. ``inputs``/``outputs``: the
    folders or files to fingerprint, keyed by the path as given (dvc.yaml's relative paths), so the
    data a metric came from can be matched across stages and clones. Nothing time- or
    machine-path-dependent goes in: two runs on the same inputs write the same block.
    """
    return {
        "environment": environment(),
        "inputs": {str(path): fingerprint(path) for path in inputs},
        **({"outputs": {str(path): fingerprint(path) for path in outputs}} if outputs else {}),
        "params": {key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                   for key, value in params.items()},
    }
