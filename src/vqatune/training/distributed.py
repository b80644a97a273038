"""Data-parallel training through ``accelerate launch`` (DDP): who launches, who writes, who waits.

The train stage is one command for DVC whatever the number of GPUs: when more than one process
is asked for (``train.num_processes`` or ``VQATUNE_NUM_PROCESSES``), the stage script starts
itself again under ``accelerate launch`` with the committed config ``configs/accelerate/ddp.yaml``
and waits. Each process then loads the model on its own GPU (QLoRA included), the Trainer wraps
it in DDP, and only the main process writes the adapter, the metrics, the curves and the card.

The global batch stays what params.yaml says (``batch_size`` x ``gradient_accumulation_steps``,
the one-GPU run), so N GPUs train the same examples per optimizer step as one. The accumulation
steps shrink first: ``batch_size`` is the micro-batch a card runs best at, so each GPU keeps it
and N GPUs do in one pass what one GPU did in N accumulation passes. Only what accumulation
cannot absorb shrinks the per-process batch. accelerate hands process i every N-th batch of the
same shuffled order, so each optimizer step sees the same rows as the one-GPU run.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence, Union

from ..config import ConfigError

log = logging.getLogger(__name__)

ENV_NUM_PROCESSES = "VQATUNE_NUM_PROCESSES"


def world_size() -> int:
    """Processes in this run: torchrun / accelerate launch set WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_launch() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun."""
    return "LOCAL_RANK" in os.environ and world_size() > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str) -> str:
    """This process's device: under a multi-GPU launch each process takes GPU ``LOCAL_RANK``."""
    if in_launch() and device == "cuda":
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def resolve_num_processes(configured: Union[int, str], environ=os.environ) -> int:
    """Processes to train with: ``VQATUNE_NUM_PROCESSES`` if set, else the param.

    ``auto`` means one per visible GPU (1 on a machine without one).
    """
    value = environ.get(ENV_NUM_PROCESSES, configured)
    source = ENV_NUM_PROCESSES if ENV_NUM_PROCESSES in environ else "train.num_processes"
    if str(value).strip().lower() == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {value!r} is not a positive integer or 'auto'") from None
    if n < 1:
        raise ConfigError(f"{source}: {n} must be at least 1 (or 'auto': one per GPU)")
    return n


def split_global_batch(batch_size: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(per-process batch, accumulation steps) that keep the global batch ``batch_size x accumulation``.

    Accumulation shrinks first, so every GPU keeps the micro-batch a card was tuned for (on an
    H100 a micro-batch of 16 is CPU-bound where 32 is not: halving it on two GPUs throws away
    most of the second GPU, benchmarks/results/ddp_bench_h100x2_*.md). The per-process batch
    shrinks by whatever factor of ``processes`` the accumulation cannot take.
    """
    shared = math.gcd(accumulation, processes)
    rest = processes // shared
    if batch_size % rest:
        raise ConfigError(
            f"train.batch_size: {batch_size} x gradient_accumulation_steps {accumulation} cannot be split "
            f"evenly over {processes} processes; make gradient_accumulation_steps (or batch_size) a "
            f"multiple of {processes}")
    return batch_size // rest, accumulation // shared


def launch_command(script: str | Path, argv: Sequence[str], processes: int, *,
                   config_file: str | Path) -> list[str]:
    """``accelerate launch`` of ``script argv`` on ``processes`` processes (an argument list), with
    ``config_file`` the committed configs/accelerate/ddp.yaml (its path from the caller's checkout).

    The same command runs on CPUs: torch.distributed.run starts the processes without a GPU and
    each one joins a gloo group (``start`` with ``cpu=True``), which is how the tests run it.
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(processes), str(script), *argv]


def relaunch(script: str | Path, argv: Sequence[str], processes: int, *, config_file: str | Path) -> int:
    """Run ``script argv`` again on ``processes`` processes under ``accelerate launch`` and wait:
    one command for DVC whatever the number of GPUs. Returns the launcher's exit status (130 when
    interrupted)."""
    command = launch_command(script, argv, processes, config_file=config_file)
    log.info("data-parallel on %d processes: %s", processes, " ".join(command))
    return run_launcher(command, {**os.environ, ENV_NUM_PROCESSES: str(processes)})


def run_launcher(command: list[str], env: dict) -> int:
    """Run the launcher; Ctrl-C or SIGTERM here reaches every training process as SIGTERM, which
    each turns into its interrupt path (the main one saves the partial adapter)."""
    launcher = subprocess.Popen(command, env=env)
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait()
        return 130


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C (a KeyboardInterrupt): DVC and schedulers stop a stage with it, and
    the interrupt path is the one that saves what was done and exits non-zero."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def start(cpu: bool):
    """Join this launch's process group before anything else does, on gloo when ``cpu``.

    accelerate keeps one process state per process, made by whoever asks first; the Trainer asks
    with ``use_cpu``, so a CPU run must create it the same way before any barrier.
    """
    from accelerate import PartialState

    if cpu:
        _restore_indexed_cpu_locations()
    return PartialState(cpu=cpu)


_CPU_LOCATIONS_REGISTERED = False


def _restore_indexed_cpu_locations() -> None:
    """Let ``torch.load`` map "cpu:N" to the CPU.

    Why by hand: resuming a multi-process run, transformers' Trainer loads the optimizer state with
    ``map_location=args.device``, which accelerate's multi-CPU mode makes ``cpu:0``, and torch only
    knows the location "cpu" (RuntimeError "don't know how to restore data location ... cpu:0").
    On GPUs the location is "cuda:N", which torch knows. Found by tests/test_distributed.py.
    """
    global _CPU_LOCATIONS_REGISTERED
    if _CPU_LOCATIONS_REGISTERED:
        return
    import torch

    def restore(obj, location: str):
        return obj if location.startswith("cpu:") else None  # already in host memory

    # Priority 5: before torch's own CPU (10) and CUDA (20) entries; None passes to them.
    torch.serialization.register_package(5, lambda obj: None, restore)
    _CPU_LOCATIONS_REGISTERED = True


def barrier() -> None:
    """Wait for every process (no-op outside a launch)."""
    if in_launch():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
