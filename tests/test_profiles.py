"""`vqatune profile`: the switch between the embedded default and the real MedGemma run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from vqatune.cli.main import main
from vqatune.cli.profile import apply_profile, leaf_keys, load_profile, profile_names, validate_params
from vqatune.config import ConfigError, section
from vqatune.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
REAL = ("medgemma", "medgemma-16gb")


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def test_the_committed_params_are_the_embedded_profile(params):
    assert apply_profile("embedded", params, REPO) == []


def test_embedded_names_every_key_another_profile_sets():
    embedded = leaf_keys(load_profile("embedded", REPO))
    for name in REAL:
        assert leaf_keys(load_profile(name, REPO)) <= embedded, name
    assert set(profile_names(REPO)) >= {"embedded", *REAL}


@pytest.mark.parametrize("name", REAL)
def test_a_real_profile_switches_and_switches_back_exactly(params, name):
    original = params.read_text()
    changed = apply_profile(name, params, REPO)
    switched = params.read_text()
    assert "model.id" in changed and "train.epochs" in changed
    # Line for line, only the lines of changed keys differ: comments, order and other keys stay.
    before, after = original.splitlines(), switched.splitlines()
    assert len(before) == len(after)
    differing = [(a, b) for a, b in zip(before, after) if a != b]
    # A search-space key is itself dotted (lora.dropout): its line names it whole.
    leaves = {key.split(".search_space.", 1)[1] if ".search_space." in key else key.rsplit(".", 1)[-1]
              for key in changed}
    assert len(differing) == len(changed)
    assert all(a.split(":")[0].strip() == b.split(":")[0].strip() in leaves for a, b in differing), differing
    assert switched.startswith(original.splitlines()[0])
    validate_params(yaml.safe_load(switched))
    assert sorted(apply_profile("embedded", params, REPO)) == sorted(changed)
    assert params.read_text() == original


def test_the_real_profile_keeps_the_vision_tower_frozen_and_the_feature_cache_on(params):
    apply_profile("medgemma", params, REPO)
    real = yaml.safe_load(params.read_text())
    train = section(real, "train", TrainConfig)
    assert train.lora.vision_tower is False and train.lora.modules_to_save == []
    assert train.lora.target_modules in ("mlp", "lm")
    assert train.cache_image_features and train.precompute_image_features
    assert real["model"]["id"] == "google/medgemma-4b-it" and real["prepare"]["image_size"] == 896
    assert real["model"]["trust_remote_code"] is False
    assert real["tune"]["search_space"]["learning_rate"]["high"] <= 1e-4
    assert real["evaluate"]["batch_size"] == "auto"
    sixteen = yaml.safe_load(params.read_text()) if apply_profile("medgemma-16gb", params, REPO) else None
    assert sixteen["evaluate"]["max_memory_gib"] <= 15


def test_the_real_profile_trains_lora_on_the_language_model_alone():
    """On the meta device (no memory), MedGemma-4B's real shapes: the trainable parameters are
    exactly LoRA's A and B on the language model's targeted projections, nothing of the tower."""
    import torch
    from transformers import AutoModelForImageTextToText, Gemma3Config

    from vqatune.models.lora import LM_MLP, attach_lora, trainable_parameters
    from vqatune.models.precision import prepare_for_kbit_training

    real = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = load_profile("medgemma", REPO)
    real["train"]["lora"].update(overlay["train"]["lora"])
    lora = section(real, "train", TrainConfig).lora
    raw = json.loads((REPO / "benchmarks" / "medgemma4b_config.json").read_text())
    config = Gemma3Config(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    prepare_for_kbit_training(model, gradient_checkpointing=False, fp32_residual=False)
    peft_model = attach_lora(model, lora)
    text = config.text_config
    shapes = {"gate_proj": (text.hidden_size, text.intermediate_size),
              "up_proj": (text.hidden_size, text.intermediate_size),
              "down_proj": (text.intermediate_size, text.hidden_size)}
    assert lora.target_modules == "mlp"
    expected = text.num_hidden_layers * sum(lora.r * (i + o) for name, (i, o) in shapes.items() if name in LM_MLP)
    trainable, _ = trainable_parameters(peft_model)
    assert trainable == expected
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "vision_tower" in n)


def test_a_bad_profile_changes_nothing_and_names_the_key(params, tmp_path):
    (tmp_path / "configs" / "profiles").mkdir(parents=True)
    (tmp_path / "configs" / "profiles" / "bad.yaml").write_text("train:\n  batch_size: 0\n")
    before = params.read_text()
    with pytest.raises(ConfigError, match="train.batch_size"):
        apply_profile("bad", params, tmp_path)
    (tmp_path / "configs" / "profiles" / "bad.yaml").write_text("train:\n  no_such_key: 1\n")
    with pytest.raises(ConfigError, match="train.no_such_key"):
        apply_profile("bad", params, tmp_path)
    assert params.read_text() == before
    with pytest.raises(ConfigError, match="no profile 'missing'"):
        apply_profile("missing", params, tmp_path)


def test_the_command(params, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["profile", "medgemma", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "model.id" in out and "git diff params.yaml" in out
    assert main(["profile", "medgemma", "--params", str(params)]) == 0
    assert "already follows" in capsys.readouterr().out
    assert main(["profile", "--list"]) == 0
    assert capsys.readouterr().out.split() == profile_names(REPO)
    assert main(["profile", "nope", "--params", str(params)]) == 2
