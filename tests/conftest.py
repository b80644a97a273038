"""Shared fixtures: the builtin tiny model and a small prepared synthetic dataset, built once
per test session into a temporary folder (never into the repo's models/ or data/)."""
from __future__ import annotations

import os

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
