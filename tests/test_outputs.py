"""vqatune.outputs.write_metrics: every stage's metrics file is written whole or not at all."""
from __future__ import annotations

import json

import pytest

from vqatune.outputs import write_metrics


class _Unserialisable:
    pass


def test_write_metrics_writes_indented_json_and_creates_the_folder(tmp_path):
    path = tmp_path / "metrics" / "stage.json"
    write_metrics(path, {"a": 1, "b": [1.5, None]})
    assert path.read_text() == json.dumps({"a": 1, "b": [1.5, None]}, indent=2) + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["stage.json"]


def test_a_serialisation_error_midway_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "stage.json"
    write_metrics(path, {"run": 1})
    before = path.read_text()
    # json writes the first keys before it reaches the value it cannot encode
    bad = {"first": "x" * 100_000, "second": list(range(1000)), "broken": _Unserialisable()}
    with pytest.raises(TypeError):
        write_metrics(path, bad)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]  # no temporary left behind


def test_a_serialisation_error_on_a_first_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        write_metrics(tmp_path / "stage.json", {"ok": 1, "broken": _Unserialisable()})
    assert list(tmp_path.iterdir()) == []


def test_every_stage_writes_its_metrics_through_write_metrics():
    """No stage writes a metrics file by hand (non-atomically) again."""
    from pathlib import Path

    stages = Path(__file__).resolve().parents[1] / "stages"
    for script in sorted(stages.glob("*.py")):
        text = script.read_text()
        assert "json.dump" not in text and ".write_text(json" not in text, script.name
        if "--metrics" in text:
            assert "write_metrics(args.metrics" in text, script.name
