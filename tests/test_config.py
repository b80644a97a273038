"""params.yaml sections: typed, validated at the edge, one actionable line per mistake."""
from pathlib import Path

import pytest

from vqatune.config import ConfigError, ModelConfig, PrepareConfig, load_params, section
from vqatune.prompts import PromptsConfig

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_into_their_typed_sections():
    params = load_params(REPO / "params.yaml")
    assert section(params, "model", ModelConfig).id == "builtin-tiny-gemma3"
    assert section(params, "prepare", PrepareConfig).source == "synthetic"
    assert "counting" in section(params, "prompts", PromptsConfig).categories


@pytest.mark.parametrize("raw, message", [
    ({"sorce": "hub"}, r"prepare\.sorce: unknown key; allowed keys are .*source"),
    ({"source": "kaggle"}, r"prepare\.source: 'kaggle' is not allowed; choose one of 'synthetic'"),
    ({"test_size": 1.5}, r"prepare\.test_size: must be between 0 and 1"),
    ({"test_size": "a lot"}, r"prepare\.test_size: expected a number"),
    ({"num_proc": 1.5}, r"prepare\.num_proc: expected an integer"),
    ({"synthetic_images": True}, r"prepare\.synthetic_images: expected an integer"),
])
def test_bad_prepare_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        section({"prepare": raw}, "prepare", PrepareConfig)


def test_bad_model_and_prompts_values_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: expected true or false"):
        section({"model": {"trust_remote_code": "yes"}}, "model", ModelConfig)
    with pytest.raises(ConfigError, match=r"prompts\.categories\.counting\.keywords"):
        section({"prompts": {"categories": {"counting": {"keywords": [], "prompt": "x"}}}}, "prompts", PromptsConfig)
    with pytest.raises(ConfigError, match=r"prompts\.categories\.size\.promt: unknown key"):
        section({"prompts": {"categories": {"size": {"keywords": ["a"], "promt": "x"}}}}, "prompts", PromptsConfig)


def test_scientific_notation_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-4 as a string; a user means a number.
    assert section({"prepare": {"test_size": "2e-1"}}, "prepare", PrepareConfig).test_size == 0.2


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
