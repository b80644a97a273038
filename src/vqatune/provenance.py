"""What a run ran on: library versions and the device, recorded next to every output."""
from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

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
    return {"python": platform.python_version(), "device": device_name(), **library_versions()}


def fingerprint(path: str | Path) -> str:
    """A short content hash of a file or folder (sorted relative paths and bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
