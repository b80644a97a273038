"""The real run's loading code (model.id a hub id, prepare.source: hub) against a hub cache in the
hub's own layout, offline: what an air-gapped machine given a copy of ~/.cache/huggingface/hub
sees. No test here reaches the hub."""
from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from vqatune.config import ConfigError, ModelConfig, PrepareConfig
from vqatune.data.sources import load_hub
from vqatune.data.synthetic import make_synthetic_kvasir
from vqatune.models.base import materialise_base_model
from vqatune.models.loading import load_base_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_cached_hub_model_becomes_models_base_without_pickles(hub_cache, tiny_model_dir, tmp_path):
    import shutil

    snapshot = _snapshot(hub_cache, "models", "google/medgemma-4b-it")
    shutil.copytree(tiny_model_dir, snapshot, dirs_exist_ok=True)
    (snapshot / "pytorch_model.bin").write_bytes(b"a pickle that must never be fetched")
    out = materialise_base_model(ModelConfig(id="google/medgemma-4b-it"), tmp_path / "base")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= names
    assert "pytorch_model.bin" not in names
    model = load_base_model(out, device="cpu")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"


def test_a_cached_hub_dataset_gives_its_split_as_the_parquet_source_would(hub_cache):
    snapshot = _snapshot(hub_cache, "datasets", "SimulaMet-HOST/Kvasir-VQA")
    (snapshot / "data").mkdir()
    raw = make_synthetic_kvasir(4, seed=0)
    raw.to_parquet(str(snapshot / "data" / "raw-00000-of-00001.parquet"))
    make_synthetic_kvasir(2, seed=1).to_parquet(str(snapshot / "data" / "other-00000-of-00001.parquet"))
    ds = load_hub(PrepareConfig(source="hub", path="SimulaMet-HOST/Kvasir-VQA", split="raw"))
    assert len(ds) == len(raw) and ds["question"] == raw["question"]
    assert ds.features["image"].decode is False  # bytes kept; prepare decodes and counts bad ones


def test_nothing_cached_is_a_one_line_error_naming_the_key(hub_cache, tmp_path):
    with pytest.raises(ConfigError, match="model.id: could not download 'google/medgemma-4b-it'"):
        materialise_base_model(ModelConfig(id="google/medgemma-4b-it"), tmp_path / "base")
    with pytest.raises(ConfigError, match="prepare.path: could not load hub dataset"):
        load_hub(PrepareConfig(source="hub", path="SimulaMet-HOST/Kvasir-VQA"))
