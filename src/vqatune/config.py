"""Typed, validated sections of ``params.yaml``.

Each stage reads exactly one (or a few) sections. Validation happens here, at the edge,
before any heavy work: an unknown key or a bad value stops with one line naming the key
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from . import tracing


class ConfigError(ValueError):
    """A params value a user must fix; the message is one actionable line."""


class InputError(ConfigError):
    """An input folder (a model, an adapter, the prepared data) that is missing or damaged; one
    line naming the file and how to restore it. A ConfigError so that every stage stops on it as
    on a bad param: one line, exit code 2, no traceback."""


def restore_hint(folder: str | Path) -> str:
    """How to get a DVC output back: from the cache, or by running the stage that writes it."""
    return f"restore it (`dvc checkout --force {folder}`) or rebuild it (`dvc repro`)"


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the repository root or pass --params")
    try:
        with path.open(encoding="utf-8") as fh:
            params = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem}); fix the file (yaml syntax: key: value, "
                          f"spaces not tabs)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def _check(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_check(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _check(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept it the way a user means it.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, raw: Any, prefix: str):
    """Build dataclass ``cls`` from mapping ``raw``; unknown keys and bad values raise."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _check(value, hints[name], f"{prefix}.{name}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return tracing.traced(obj, prefix)


def section(params: dict, name: str, cls: type):
    """The typed section ``name`` of ``params``; a missing section takes the defaults."""
    return build(cls, params.get(name), name)


def require(cond: bool, key: str, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {allowed}")


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------------------
# Sections. Each field's comment says what it trades off; defaults are the embedded run.
# --------------------------------------------------------------------------------------

BUILTIN_TINY = "builtin-tiny-gemma3"


@dataclasses.dataclass
class ModelConfig:
    """`model:` — which base model every stage uses."""

    # builtin-tiny-gemma3 (offline, CPU), a hub id such as google/medgemma-4b-it, or a local folder.
    id: str = BUILTIN_TINY
    revision: Optional[str] = None
    # Runs code from the hub when true; Gemma 3 never needs it.
    trust_remote_code: bool = False
    seed: int = 0
    # Tiny model shape (only used for builtin-tiny-gemma3).
    tiny_image_size: int = 64
    tiny_vocab_size: int = 1024
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_vision_hidden_size: int = 32
    tiny_vision_layers: int = 2
    # bundled: the tower pretrained once and shipped with vqatune (models/tiny_vision_tower.safetensors,
    # 96 px, vision hidden 64, 2 layers); pretrain: pretrained here on the scenes below.
    tiny_vision_tower: str = "pretrain"
    # Scenes (of the synthetic world, a seed of their own) the tiny vision tower is pretrained on
    # before anything else sees it: 0 leaves it random, which keeps test builds fast
    # (models/tiny_vision.py says why a random tower cannot do).
    tiny_vision_pretraining_scenes: int = 0
    tiny_vision_pretraining_epochs: int = 8

    def validate(self, p: str) -> None:
        require(bool(self.id.strip()), f"{p}.id", f"must name a model: {BUILTIN_TINY}, a hub id or a folder")
        require(self.tiny_image_size % 16 == 0 and self.tiny_image_size >= 32, f"{p}.tiny_image_size",
                "must be a multiple of 16, at least 32")
        require(self.tiny_vocab_size >= 300, f"{p}.tiny_vocab_size", "must be at least 300")
        require(self.tiny_hidden_size >= 16 and self.tiny_hidden_size % 16 == 0, f"{p}.tiny_hidden_size",
                "must be a multiple of 16, at least 16")
        require(self.tiny_layers >= 1, f"{p}.tiny_layers", "must be at least 1")
        require(self.tiny_vision_hidden_size >= 16 and self.tiny_vision_hidden_size % 16 == 0,
                f"{p}.tiny_vision_hidden_size", "must be a multiple of 16, at least 16")
        require(self.tiny_vision_layers >= 1, f"{p}.tiny_vision_layers", "must be at least 1")
        require(self.tiny_vision_tower in ("bundled", "pretrain"), f"{p}.tiny_vision_tower",
                "must be bundled (the tower shipped with vqatune) or pretrain (pretrained in base_model)")
        require(self.tiny_vision_pretraining_scenes == 0 or self.tiny_vision_pretraining_scenes >= 64,
                f"{p}.tiny_vision_pretraining_scenes", "must be 0 (a random tower) or at least 64")
        require(self.tiny_vision_pretraining_epochs >= 1, f"{p}.tiny_vision_pretraining_epochs",
                "must be at least 1")

    @property
    def is_builtin(self) -> bool:
        return self.id == BUILTIN_TINY


@dataclasses.dataclass
class PrepareConfig:
    """`prepare:` — where the QA rows come from and how they are cleaned and split."""

    # synthetic (offline stand-in), hub (datasets.load_dataset), imagefolder (images +
    # metadata.csv/jsonl with file_name), or parquet (files with embedded image bytes).
    source: Literal["synthetic", "hub", "imagefolder", "parquet"] = "synthetic"
    # hub: dataset id; imagefolder: folder; parquet: a file, folder or glob.
    path: str = "SimulaMet-HOST/Kvasir-VQA"
    split: Optional[str] = "raw"
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    image_id_column: str = "img_id"
    source_column: str = "source"
    # synthetic: number of images (each carries 1-18 QA) and the seed that draws them.
    synthetic_images: int = 240
    seed: int = 42
    test_size: float = 0.2
    # The model's image size (MedGemma: 896); images are resized once here.
    image_size: int = 64
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    # PIL's decompression-bomb limit in pixels; larger images are dropped and counted.
    max_image_pixels: int = 178_956_970
    num_proc: int = 1
    # Rows logged per drop reason (the rest are only counted).
    log_first: int = 3

    def validate(self, p: str) -> None:
        require(0.0 < self.test_size < 1.0, f"{p}.test_size", "must be between 0 and 1 (exclusive)")
        require(self.image_size >= 16, f"{p}.image_size", "must be at least 16 pixels")
        require(self.synthetic_images >= 10, f"{p}.synthetic_images", "must be at least 10")
        require(self.num_proc >= 1, f"{p}.num_proc", "must be at least 1")
        require(self.max_image_pixels > 0, f"{p}.max_image_pixels", "must be positive")
        require(self.log_first >= 0, f"{p}.log_first", "must be >= 0")
        require(bool(self.path.strip()) or self.source == "synthetic", f"{p}.path",
                "must name the dataset (hub id, folder or parquet path)")
