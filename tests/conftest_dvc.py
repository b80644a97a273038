"""Shared by test_workflows, test_faults and test_remote_s3: a git clone of this working tree (uncommitted changes
included) in which the tests run `dvc`, and the environment they run it in."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# model: values for a clone's pipeline: the tiny tower's pretraining at 64 scenes x 1 epoch keeps its
# code path and takes seconds; the committed 2,400 x 8 take minutes in every clone's base_model.
SMALL_TOWER = {"tiny_vision_pretraining_scenes": 64, "tiny_vision_pretraining_epochs": 1}


def dvc_env() -> dict:
    """This venv's `dvc` first on PATH, and a git identity for commits."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.setdefault("GIT_AUTHOR_NAME", "vqatune test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@vqatune.invalid")
    env["GIT_COMMITTER_NAME"], env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_NAME"], env["GIT_AUTHOR_EMAIL"]
    return env


def clone_working_tree(dest: Path, env: dict) -> Path:
    """``git clone`` of this repository with the working tree's version of every tracked file."""
    def git(*args, cwd):
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)

    git("clone", "-q", str(REPO), str(dest), cwd=dest.parent)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, env=env, check=True, capture_output=True,
                             text=True).stdout.splitlines()
    for rel in tracked:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # DVC experiments commit through their own git library, which reads the config, not GIT_* vars.
    git("config", "user.name", env["GIT_AUTHOR_NAME"], cwd=dest)
    git("config", "user.email", env["GIT_AUTHOR_EMAIL"], cwd=dest)
    return dest
