"""A stage run as its own process, forked from the test process instead of started afresh.

A fresh ``python stages/<stage>.py`` spends ~10 s of CPU importing torch, transformers and TRL
before it does anything; a fork of the test process has them imported already and starts in
milliseconds. The child is still a real process: a fault point's SIGKILL ends it, not the test,
and a file-size limit (a full disk) applies to it alone. It runs the script as ``__main__`` (its
disk-full wrapper included) with its own stdout/stderr (pipes), a fresh root logger (the stage's
``logging.basicConfig`` writes to that stderr, not to pytest's capture) and one torch thread, as
the fresh interpreters did (``OMP_NUM_THREADS=1``); forking with a busy OpenMP pool could hang.
"""
from __future__ import annotations

import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

STAGES = Path(__file__).resolve().parents[1] / "stages"


def run_forked(target: Callable[[], Optional[int]], *, cwd: Path, env: Optional[dict] = None,
               file_limit: Optional[int] = None, timeout: float = 600,
               args: Optional[list] = None) -> subprocess.CompletedProcess:
    """``target()`` in a forked child; its return value (or SystemExit code) is the exit status,
    an exception prints its traceback and exits 1, a signal gives ``-signum`` as subprocess does.
    ``env``: variables set in the child; ``file_limit``: RLIMIT_FSIZE in bytes, SIGXFSZ ignored
    (writes past it fail with EFBIG)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(out_r), os.close(err_r)
            os.dup2(out_w, 1), os.dup2(err_w, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.chdir(cwd)
            os.environ.update(env or {})
            root = logging.getLogger()
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            root.setLevel(logging.WARNING)
            for logger in logging.Logger.manager.loggerDict.values():  # caplog's handlers
                if isinstance(logger, logging.Logger):
                    for handler in logger.handlers[:]:
                        if type(handler).__module__.startswith("_pytest"):
                            logger.removeHandler(handler)
            import torch

            torch.set_num_threads(1)
            # ... and kept there: a stage reads cpu_threads (2 in params.yaml) and would raise it,
            # and libgomp hangs a forked child in its first parallel region once the parent's
            # OpenMP pool has run.
            torch.set_num_threads = lambda n: None
            if file_limit is not None:
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
            try:
                result = target()
                code = 0 if result is None else int(result)
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
                    code = 1
        except BaseException:  # noqa: BLE001  what an uncaught exception does to a process
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush(), sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(out_w), os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        with open(fd, "rb", buffering=0) as fh:
            for block in iter(lambda: fh.read(65536), b""):
                chunks[fd].append(block)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(args or [str(target)], timeout)
        time.sleep(0.02)
    for reader in readers:
        reader.join(timeout=30)
    text = lambda fd: b"".join(chunks[fd]).decode("utf-8", "replace")  # noqa: E731
    return subprocess.CompletedProcess(args or [str(target)], os.waitstatus_to_exitcode(status),
                                       text(out_r), text(err_r))


def run_stage_forked(script: str, argv: list[str], *, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python stages/<script> argv`` as a forked process (see the module's docstring)."""
    path = STAGES / script

    def main() -> None:
        sys.argv = [str(path), *argv]
        runpy.run_path(str(path), run_name="__main__")

    return run_forked(main, cwd=cwd, args=[sys.executable, str(path), *argv], **kwargs)
