"""Every vqatune module a stage can import is one of its dvc.yaml deps, so editing it reruns the
stage (and nothing else): a module left out would let `dvc repro` call stale outputs up to date.

What a stage can import is read from the source (``provenance.import_closure``: imports inside
functions too, so a branch this run does not take still counts), and cross-checked by importing
each stage script in a fresh interpreter and listing the vqatune modules that ended up loaded.
The full pipeline run of test_workflows.py checks the same against what each stage really imported.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vqatune.provenance import PACKAGE_ROOT, import_closure

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> Path:
    return REPO / re.search(r"stages/\w+\.py", stage["cmd"]).group(0)


def _repo_path(file: Path) -> str:
    """``src/vqatune/...`` for a module file of the package."""
    return (Path("src") / PACKAGE_ROOT.name / file.relative_to(PACKAGE_ROOT)).as_posix()


def undeclared_modules(stage: dict) -> list[str]:
    """The vqatune modules ``stage``'s script can import that none of its deps covers (a folder
    dep covers every file under it)."""
    deps = [d.rstrip("/") for d in stage.get("deps", [])]
    modules = [_repo_path(f) for f in import_closure([_script(stage)])]
    return [m for m in modules if not any(m == d or m.startswith(d + "/") for d in deps)]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_imports_is_a_declared_dep(name):
    assert not undeclared_modules(STAGES[name]), (
        f"stage {name} imports modules its dvc.yaml deps leave out: {undeclared_modules(STAGES[name])}")


def test_a_stage_missing_one_of_its_modules_is_caught():
    """The check itself: train with training/ declared file by file, one file short."""
    stage = dict(STAGES["train"])
    training = sorted(_repo_path(f) for f in (PACKAGE_ROOT / "training").glob("*.py"))
    assert "src/vqatune/training/collate.py" in training
    stage["deps"] = [d for d in stage["deps"] if d != "src/vqatune/training"] + training
    assert undeclared_modules(stage) == []
    stage["deps"].remove("src/vqatune/training/collate.py")
    assert undeclared_modules(stage) == ["src/vqatune/training/collate.py"]
    # and a module outside every declared folder
    stage["deps"] = [d for d in STAGES["train"]["deps"] if d != "src/vqatune/provenance.py"]
    assert undeclared_modules(stage) == ["src/vqatune/provenance.py"]


_IMPORTED = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("stage_under_test", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from vqatune.tracing import imported_modules
print(json.dumps(imported_modules()))
"""


def test_the_import_closure_misses_nothing_a_stage_really_imports():
    """Importing each stage script (not running it) loads only modules the source analysis found."""
    for name, stage in sorted(STAGES.items()):
        out = subprocess.run([sys.executable, "-c", _IMPORTED, str(_script(stage))], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        loaded = set(json.loads(out.splitlines()[-1]))
        closure = {_repo_path(f) for f in import_closure([_script(stage)])}
        assert loaded, name
        assert loaded <= closure, f"stage {name}: imported but not found in its source: {loaded - closure}"
