"""Where a training run keeps its checkpoints and its adapter.

Checkpoints live under a folder keyed by everything that determines the result (``run_key``), so
a killed run resumes from its last complete checkpoint and a changed param, dataset or training
code starts afresh.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ..config import as_dict
from ..provenance import code_signature, folder_signature
from . import distributed
from .config import TrainConfig

PARTIAL_MARKER = "PARTIAL"
# The module whose import closure is the code a run executes: its files (and only those: not
# the CLI, not evaluation) go into the run key.
TRAINING_ENTRY = "vqatune.training.run"


def run_key(train_cfg: TrainConfig, model_dir, processed_dir, max_train_rows) -> str:
    """Everything that determines the trained weights: a checkpoint of another key is never resumed."""
    # The processes actually running, not the param: VQATUNE_NUM_PROCESSES can override it.
    ident = {
        "code": code_signature(TRAINING_ENTRY),
        "train": {**as_dict(train_cfg), "num_processes": distributed.world_size()},
        "model": folder_signature(model_dir),
        "data": folder_signature(processed_dir),
        "max_train_rows": max_train_rows,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def last_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that was written to the end (trainer_state.json is saved last)."""
    candidates = []
    for ckpt in Path(run_dir).glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if step.isdigit() and (ckpt / "trainer_state.json").exists():
            candidates.append((int(step), ckpt))
    return max(candidates)[1] if candidates else None


def save_adapter(model, processor, output_dir: str | Path, partial: bool = False) -> Path:
    """Adapter weights (safetensors) + adapter config + processor; PARTIAL marks an interrupted run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    processor.save_pretrained(str(output_dir))
    marker = output_dir / PARTIAL_MARKER
    if partial:
        marker.write_text("Training was interrupted: this adapter is not the finished result.\n")
    elif marker.exists():
        marker.unlink()
    return output_dir
