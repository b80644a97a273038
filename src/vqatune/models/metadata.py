"""What a trained model folder says about how it was trained: ``vqatune_training.json``.

The train stage writes it into the adapter folder, the merge copies it into the merged model, and
``vqatune ask`` (and the GGUF agreement check) read ``prompt_mode`` so that a question is asked
the way the model learned to answer. ``prompt_mode`` is the training's ``train.prompt_mode`` as
configured: ``none``, ``static``, ``adaptive``, or ``mix`` (the three mixed), which
:func:`inference_prompt_mode` maps to ``none`` (a model trained on all three answers bare
questions as well as any, and ``none`` is the cheapest prompt).
No heavy imports: the CLI reads it before loading a model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

TRAINING_METADATA = "vqatune_training.json"
# A folder without metadata (the base model, an adapter from before it was recorded) is asked
# with the static prompt, as `vqatune ask` always did.
UNTRAINED_PROMPT_MODE = "static"
MIX_PROMPT_MODE = "mix"


def write_training_metadata(folder: str | Path, *, prompt_mode: str, **extra) -> Path:
    path = Path(folder) / TRAINING_METADATA
    path.write_text(json.dumps({"prompt_mode": prompt_mode, **extra}, indent=2, sort_keys=True) + "\n")
    return path


def read_training_metadata(folder: str | Path) -> Optional[dict]:
    path = Path(folder) / TRAINING_METADATA
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def copy_training_metadata(src: str | Path, dest: str | Path) -> bool:
    """Carry the metadata along (adapter -> merged model); False when ``src`` has none."""
    path = Path(src) / TRAINING_METADATA
    if not path.is_file():
        return False
    shutil.copy2(path, Path(dest) / TRAINING_METADATA)
    return True


def trained_prompt_mode(folder: str | Path) -> Optional[str]:
    """The training's ``prompt_mode`` recorded in ``folder``, None when nothing is recorded."""
    meta = read_training_metadata(folder)
    return None if meta is None else meta.get("prompt_mode")


def inference_prompt_mode(trained: Optional[str]) -> str:
    """The prompt mode to ask with: the trained one; ``mix`` -> ``none``; nothing recorded ->
    ``static``."""
    if trained is None:
        return UNTRAINED_PROMPT_MODE
    return "none" if trained == MIX_PROMPT_MODE else trained
