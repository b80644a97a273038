"""DVC workflows end to end in temporary clones (issue 7): the whole pipeline runs; a second
`dvc repro` reruns nothing; each stage reads only the params keys and data files its dvc.yaml
entry declares; an evaluation param reruns only evaluation; `dvc push` backs everything up and a
colleague's fresh clone restores it with `dvc pull`, clean and up to date without training.

Runs the real embedded pipeline, shrunk (fewer images, one epoch, two trials), on CPU: minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.workflow

SMALL = {
    ("prepare", "synthetic_images"): 30,
    ("tune", "n_trials"): 2,
    ("train", "epochs"): 1,
    ("train", "eval_steps"): 5,
    ("train", "save_steps"): 5,
    ("evaluate", "subset_size"): 24,
}


def run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(path: Path, values: dict) -> None:
    params = yaml.safe_load(path.read_text())
    for (section, key), value in values.items():
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["VQATUNE_TRACE"] = str(tmp_path_factory.mktemp("trace") / "trace.jsonl")
    env.setdefault("GIT_AUTHOR_NAME", "vqatune test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@vqatune.invalid")
    env["GIT_COMMITTER_NAME"], env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_NAME"], env["GIT_AUTHOR_EMAIL"]
    return env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, env):
    """A clone of this working tree (uncommitted changes included), shrunk params, one repro."""
    root = tmp_path_factory.mktemp("workflow")
    clone, remote = root / "a", root / "remote"
    run(["git", "clone", "-q", str(REPO), str(clone)], root, env)
    for rel in run(["git", "ls-files"], REPO, env).splitlines():
        src = REPO / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    set_params(clone / "params.yaml", SMALL)
    run(["dvc", "remote", "modify", "--local", "backup", "url", str(remote)], clone, env)
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "small params"], clone, env)
    out = run(["dvc", "repro"], clone, env)
    return clone, remote, out


def test_first_repro_runs_every_stage_and_second_runs_none(pipeline, env):
    clone, _, out = pipeline
    stages = set(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"])
    assert ran_stages(out) == stages
    again = run(["dvc", "repro"], clone, env)
    assert ran_stages(again) == set() and "up to date" in again


def _covered(key: str, declared: list[str], sep: str = ".") -> bool:
    return any(key == d or key.startswith(d.rstrip(sep) + sep) for d in declared)


def test_stages_read_only_what_dvc_yaml_declares(pipeline, env):
    clone, _, _ = pipeline
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    by_script = {}
    for name, stage in stages.items():
        script = re.search(r"stages/\w+\.py", stage["cmd"]).group(0)
        by_script[script] = (name, stage)
    records = [json.loads(line) for line in Path(env["VQATUNE_TRACE"]).read_text().splitlines()]
    seen = set()
    for rec in records:
        script = next((a for a in rec["argv"] if a.startswith("stages/")), None)
        if script not in by_script:
            continue
        name, stage = by_script[script]
        seen.add(name)
        declared = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        undeclared = [k for k in rec["params"] if not _covered(k, declared)]
        assert not undeclared, f"stage {name} reads params it does not declare: {undeclared}"
        paths = [d for d in stage.get("deps", [])]
        for group in ("outs", "metrics", "plots"):
            paths += [o if isinstance(o, str) else next(iter(o)) for o in stage.get(group, [])]
        # Code is declared per module; .gitignore/.dvcignore are read by dvclive's repo checks.
        # models/train_checkpoints/ is training's resumable scratch area, kept out of DVC on purpose.
        data = [f for f in rec["files"] if not f.endswith(".py")
                and f not in ("params.yaml", ".gitignore", ".dvcignore")
                and not f.startswith("models/train_checkpoints/")]
        unknown = [f for f in data if not _covered(f, paths, sep="/")]
        assert not unknown, f"stage {name} reads files it does not declare: {unknown}"
    assert seen == set(stages)


def test_an_evaluation_param_reruns_only_evaluation(pipeline, env):
    clone, _, _ = pipeline
    set_params(clone / "params.yaml", {("evaluate", "max_new_tokens"): 12})
    out = run(["dvc", "repro"], clone, env)
    assert ran_stages(out) == {"evaluate"}
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "shorter answers"], clone, env)


def test_push_then_a_colleague_pulls_a_clean_up_to_date_run(pipeline, env, tmp_path):
    clone, remote, _ = pipeline
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "run", "--allow-empty"], clone, env)
    run(["dvc", "push"], clone, env)
    assert remote.is_dir() and any(remote.rglob("*"))
    colleague = tmp_path / "b"
    run(["git", "clone", "-q", str(clone), str(colleague)], tmp_path, env)
    run(["dvc", "remote", "modify", "--local", "backup", "url", str(remote)], colleague, env)
    run(["dvc", "pull"], colleague, env)
    for out in ("data/processed", "models/adapter", "models/merged", "models/gguf"):
        assert (colleague / out).exists(), out
    status = run(["dvc", "status"], colleague, env)
    assert "up to date" in status, status
    again = run(["dvc", "repro"], colleague, env)
    assert ran_stages(again) == set(), again
