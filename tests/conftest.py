"""Shared fixtures: the builtin tiny model and a small prepared synthetic dataset, built once
per test session into a temporary folder (never into the repo's models/ or data/), and a
throwaway PostgreSQL server for the search tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import vqatune  # noqa: F401  first: pins the CPU numerics before any test module imports torch

# Tests run on CPU, offline, with few threads: CI has 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding the builtin tiny Gemma 3 (weights, processor, tokenizer.model)."""
    from vqatune.config import ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-model"), ModelConfig())


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory):
    """data/processed as the prepare stage writes it, from 40 synthetic images."""
    from vqatune.config import PrepareConfig
    from vqatune.data.prepare import prepare_dataset
    from vqatune.prompts import PromptsConfig

    out = tmp_path_factory.mktemp("data") / "processed"
    prepare_dataset(PrepareConfig(synthetic_images=40, seed=7), PromptsConfig(), out)
    return out


def _postgres_bin(name: str):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on a unix socket (no TCP), stopped and deleted after."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (see requirements.txt)")
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not found; install Debian's postgresql (.ci/run does)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run the cluster as Debian's postgres user.
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: its parents are private to root, and the server needs the way in.
    root = Path(tempfile.mkdtemp(prefix="vqatune-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if as_user:
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{sockets}'\n"
                       "port = 5432\nfsync = off\nmax_connections = 40\n")
        run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr or err.stdout}")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={sockets}&port=5432"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, tmp_path_factory):
    """A merged model (the tiny model with a perturbed adapter fused in), the adapter beside it
    (``merged_dir.parent / "adapter"``), for the export and fault tests."""
    from conftest_adapters import make_perturbed_adapter

    from vqatune.export.merge import MergeConfig, merge_adapter

    work = tmp_path_factory.mktemp("merged")
    adapter = make_perturbed_adapter(tiny_model_dir, work / "adapter")
    merge_adapter(tiny_model_dir, adapter, work / "merged", MergeConfig(dtype="float32", verify=False))
    return work / "merged"
