"""Materialise the base model at one path (``models/base``) whatever ``model.id`` names.

The builtin tiny model is built there; a hub id is downloaded there (safetensors only); a
local folder is copied there. Every later stage reads that folder, so it never needs to know
where the model came from.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..config import ConfigError, ModelConfig
from ..outputs import fresh_staging, replace_dir

# What a model folder needs; pickled *.bin weights are never fetched or copied.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def _atomic(out_dir: Path, fill) -> Path:
    tmp = fresh_staging(out_dir)
    fill(tmp)
    if not any(tmp.glob("*.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError("model.id: no *.safetensors weights found; vqatune loads safetensors only")
    return replace_dir(tmp, out_dir, "base_model")


def copy_files(folder: Path, tmp: Path) -> None:
    """The model files of ``folder`` (never pickled weights), following the hub cache's links."""
    for pattern in MODEL_FILES:
        for f in folder.glob(pattern):
            shutil.copy2(f, tmp / f.name)


def materialise_base_model(cfg: ModelConfig, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if cfg.is_builtin:
        from .tiny import build_tiny_gemma3

        return _atomic(out_dir, lambda tmp: build_tiny_gemma3(tmp, cfg))
    local = Path(cfg.id).expanduser()
    if local.is_dir():
        return _atomic(out_dir, lambda tmp: copy_files(local, tmp))
    if local.exists() or cfg.id.startswith((".", "/", "~")):
        raise ConfigError(f"model.id: '{cfg.id}' is not a model folder; give a folder, a hub id or "
                          f"builtin-tiny-gemma3")

    def download(tmp: Path) -> None:
        from huggingface_hub import constants, snapshot_download

        try:
            if constants.HF_HUB_OFFLINE:
                # Offline (HF_HUB_OFFLINE=1, e.g. an air-gapped machine given a copy of the hub
                # cache): only the shared cache can answer, never a local_dir download.
                copy_files(Path(snapshot_download(cfg.id, revision=cfg.revision,
                                                  allow_patterns=MODEL_FILES)), tmp)
            else:
                snapshot_download(cfg.id, revision=cfg.revision, local_dir=str(tmp),
                                  allow_patterns=MODEL_FILES)
        except Exception as err:  # hub errors come in many types; the fix is the same
            raise ConfigError(f"model.id: could not download '{cfg.id}' from the hub "
                              f"({type(err).__name__}: {err}); check the id, `hf auth login` and "
                              f"the model's licence, or use a local folder") from err
    return _atomic(out_dir, download)
