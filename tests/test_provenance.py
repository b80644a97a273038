"""vqatune.provenance.record: the "provenance" block every stage writes into its metrics file."""
from __future__ import annotations

import json

from vqatune.config import ModelConfig
from vqatune.model_card import model_card
from vqatune.provenance import fingerprint, record
from vqatune.training import TrainConfig


def test_record_holds_versions_device_fingerprints_and_effective_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("rows")
    (tmp_path / "best.json").write_text("{}")
    cfg = TrainConfig(learning_rate=1e-3)
    block = record(params={"train": cfg, "model.id": "m"}, inputs=["data", "best.json"])

    assert {"python", "device", "torch", "transformers", "peft", "dvc"} <= set(block["environment"])
    assert block["inputs"] == {"data": fingerprint("data"), "best.json": fingerprint("best.json")}
    assert block["params"]["train"]["learning_rate"] == 1e-3
    assert block["params"]["train"]["lora"]["r"] == cfg.lora.r  # nested sections become dicts
    assert block["params"]["model.id"] == "m"
    assert "outputs" not in block
    # JSON as written, and the same on a second call: nothing time- or run-dependent in it.
    assert json.dumps(block) == json.dumps(record(params={"train": cfg, "model.id": "m"},
                                                  inputs=["data", "best.json"]))


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"abc")
    before = fingerprint(folder)
    (folder / "x.bin").write_bytes(b"abc")  # same bytes, new mtime
    assert fingerprint(folder) == before
    (folder / "x.bin").write_bytes(b"abd")
    assert fingerprint(folder) != before


def test_model_card_lists_input_fingerprints_and_leaves_out_run_speed(tmp_path):
    block = record(params={"train": TrainConfig()}, inputs=[])
    block["inputs"] = {"data/processed": "0123456789abcdef"}
    metrics = {"eval_loss": 0.5, "seconds": 12.3, "examples_per_s": 4.5, "peak_memory_gib": 0.7,
               "provenance": block}
    card = model_card(base_model=ModelConfig().id, dataset="data/processed", train_params={}, metrics=metrics,
                      environment=block["environment"], hyperparameter_source="params.yaml")
    assert "| `data/processed` | 0123456789abcdef |" in card
    assert "| eval_loss | 0.5 |" in card
    assert "seconds" not in card and "examples_per_s" not in card and "peak_memory_gib" not in card
