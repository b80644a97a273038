"""Where a training run keeps its checkpoints and its adapter.

Checkpoints live under a folder keyed by everything that determines the result (``run_key``), so
a killed run resumes from its last complete checkpoint and a changed param, dataset or training
code starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Optional

from ..config import as_dict
from ..models.loading import check_safetensors
from ..provenance import code_signature, folder_signature
from . import distributed
from .config import TrainConfig

log = logging.getLogger(__name__)

PARTIAL_MARKER = "PARTIAL"
# Without these the trainer would resume with a fresh optimizer or schedule: not the same run.
REQUIRED_TORCH_FILES = ("optimizer.pt", "scheduler.pt")
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


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed (a missing, truncated or garbage file), or None if it can.

    Cheap: trainer_state.json parsed, every safetensors header checked against the file size,
    optimizer.pt loaded with weights_only (memory-mapped), every other torch file's zip directory
    read (a truncated zip has none)."""
    state_file = ckpt / "trainer_state.json"
    if not state_file.exists():
        return "no trainer_state.json (written last: the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            raise ValueError("no global_step")
    except (ValueError, UnicodeDecodeError) as err:
        return f"trainer_state.json unreadable ({err})"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no adapter weights (*.safetensors)"
    for file in weights:
        try:
            check_safetensors(file)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            return f"{file.name} unreadable ({err})"
    for name in REQUIRED_TORCH_FILES:
        if not (ckpt / name).exists():
            return f"no {name}"
    for file in sorted([*ckpt.glob("*.pt"), *ckpt.glob("*.pth")]):
        try:
            if file.name == "optimizer.pt":
                import torch

                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            else:
                with zipfile.ZipFile(file) as zf:
                    zf.namelist()
        except Exception as err:  # noqa: BLE001  any failure to read it means it cannot be resumed
            return f"{file.name} unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    return None


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for ckpt in Path(run_dir).glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if step.isdigit() and ckpt.is_dir():
            found.append((int(step), ckpt))
    return sorted(found, reverse=True)


def last_complete_checkpoint(run_dir: Path, discard: bool = False) -> Optional[Path]:
    """The newest checkpoint whose files all read back (``checkpoint_problem``).

    Newer ones that do not are skipped with one log line each, saying what is resumed instead;
    with ``discard`` (the main process, before training) they are deleted, so the trainer's
    checkpoint rotation and a later resume never see them."""
    skipped = []
    for _, ckpt in _checkpoints(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            _report(skipped, ckpt, discard)
            return ckpt
        skipped.append((ckpt, problem))
    _report(skipped, None, discard)
    return None


def _report(skipped, chosen: Optional[Path], discard: bool) -> None:
    for ckpt, problem in skipped:
        instead = f"resuming from {chosen.name}" if chosen else "starting over"
        log.warning("checkpoint %s is incomplete or corrupt: %s; %s%s", ckpt, problem, instead,
                    " (deleted)" if discard else "")
        if discard:
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)


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
