"""What a run ran on and from: library versions, the device, content fingerprints of the input
folders and the effective params, recorded next to every output (each stage's metrics file under
"provenance", the adapter's model card), so a metric can be traced to its cause.
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

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


def code_signature() -> str:
    """The package's own source (every ``vqatune/*.py``, by content): a checkpoint or a search
    trial made by other code is never resumed, as the numbers it holds may not be this code's."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


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
