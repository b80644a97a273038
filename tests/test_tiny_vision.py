"""The tiny model's vision pretraining: the scene targets are what was drawn, the pretraining
moves the tower and nothing else, and the build stays deterministic with it on."""
from __future__ import annotations

import json

import torch


def test_scene_targets_name_what_is_drawn_in_each_cell():
    from vqatune.data import kvasir as K
    from vqatune.data.synthetic import Thing
    from vqatune.models.tiny_vision import CELL_THINGS, _targets

    things = [Thing("polyp", "polyp", "center", "red", "5-10mm", "paris ip"),
              Thing("polyp", "polyp", "upper-right", "white", ">20mm", "paris iia"),
              Thing("instrument", "polyp snare", "lower-center"),
              Thing("landmark", "pylorus", "center-left", "pink")]
    y = _targets(things, {"box": True, "text": False}, "Instrument")
    cell = K.GRID_CELLS.index
    want_thing = [0] * 9
    want_thing[cell("center")] = want_thing[cell("upper-right")] = CELL_THINGS.index("polyp")
    want_thing[cell("lower-center")] = CELL_THINGS.index("instrument")
    want_thing[cell("center-left")] = CELL_THINGS.index("landmark")
    want_thing[cell("lower-left")] = CELL_THINGS.index("box")
    assert y["thing"] == want_thing
    # 1 + index in POLYP_COLOURS (pink, red, white, ...), SIZE_RADIUS (<5mm, 5-10mm, 11-20mm, >20mm),
    # POLYP_TYPES (paris is, paris ip, paris iia), INSTRUMENTS, LANDMARKS; 0 elsewhere
    assert (y["colour"][cell("center")], y["colour"][cell("upper-right")]) == (2, 3)
    assert (y["size"][cell("center")], y["size"][cell("upper-right")]) == (2, 4)
    assert (y["shape"][cell("center")], y["shape"][cell("upper-right")]) == (2, 3)
    assert y["instrument"][cell("lower-center")] == 3
    assert y["landmark"][cell("center-left")] == 4
    assert sum(y["colour"]) == 5 and sum(y["instrument"]) == 3 and sum(y["landmark"]) == 4
    assert (y["source"], y["polyps"], y["instruments"]) == ([4], [2], [1])


def test_pretraining_moves_the_tower_and_leaves_projector_and_lm_random(tmp_path):
    from safetensors.torch import load_file

    from vqatune.config import ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3

    small = dict(tiny_image_size=32, tiny_vision_pretraining_epochs=1)
    random_dir = build_tiny_gemma3(tmp_path / "random", ModelConfig(**small))
    tuned_dir = build_tiny_gemma3(tmp_path / "pretrained", ModelConfig(**small, tiny_vision_pretraining_scenes=128))
    a = load_file(str(random_dir / "model.safetensors"))
    b = load_file(str(tuned_dir / "model.safetensors"))
    assert a.keys() == b.keys()  # the pretraining heads are not saved
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("vision_tower.") for k in moved), sorted(moved)[:5]
    assert any("encoder.layers" in k for k in moved) and any("patch_embedding" in k for k in moved)
    report = json.loads((tuned_dir / "vqatune_builtin.json").read_text())["vision_tower"]
    assert report["pretrained"] is True and report["scenes"] == 128
    assert set(report["held_out_accuracy"]) >= {"thing", "colour", "size", "source", "polyps"}
    assert json.loads((random_dir / "vqatune_builtin.json").read_text())["vision_tower"] == {"pretrained": False}


def test_build_with_pretraining_is_deterministic(tmp_path):
    from vqatune.config import ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3
    from vqatune.provenance import fingerprint

    cfg = ModelConfig(tiny_image_size=32, tiny_vision_pretraining_scenes=96, tiny_vision_pretraining_epochs=1)
    assert fingerprint(build_tiny_gemma3(tmp_path / "a", cfg)) == fingerprint(build_tiny_gemma3(tmp_path / "b", cfg))


def test_scene_sets_grow_by_chunks_and_held_out_scenes_are_others():
    from vqatune.models.tiny_vision import CHUNK, HELD_OUT_STREAM, TRAIN_STREAM, scene_set

    small, _ = scene_set(CHUNK, 32, 0, TRAIN_STREAM)
    large, y = scene_set(CHUNK + 50, 32, 0, TRAIN_STREAM)
    assert large.shape[0] == CHUNK + 50 and y["thing"].shape == (CHUNK + 50, 9)
    assert torch.equal(large[:CHUNK], small)  # a larger set starts with the same scenes
    held, _ = scene_set(64, 32, 0, HELD_OUT_STREAM)
    flat = lambda t: {tuple(row.flatten().tolist()) for row in t}  # noqa: E731
    assert not flat(held) & flat(large)


def test_the_bundled_tower_is_what_the_builtin_model_gets(tmp_path):
    from safetensors.torch import load_file

    from vqatune.config import ModelConfig, load_params, section
    from vqatune.models.tiny import build_tiny_gemma3
    from vqatune.models.tiny_vision import BUNDLED

    cfg = section(load_params("params.yaml"), "model", ModelConfig)
    assert cfg.tiny_vision_tower == "bundled"  # the embedded default uses it
    out = build_tiny_gemma3(tmp_path / "m", cfg)
    saved = load_file(str(out / "model.safetensors"))
    bundled = load_file(str(BUNDLED))
    assert len(bundled) > 10
    for key, value in bundled.items():
        assert torch.equal(saved["vision_tower.vision_model." + key], value), key
    report = json.loads((out / "vqatune_builtin.json").read_text())["vision_tower"]
    assert report["bundled"] == BUNDLED.name and report["scenes"] == 9600
    assert report["held_out_accuracy"]["polyps"] > 0.9  # what the recipe bought (0.88 at 2,400 x 8)


def test_a_tower_for_other_sizes_is_refused_with_what_to_do(tmp_path):
    import pytest

    from vqatune.config import ConfigError, ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3

    with pytest.raises(ConfigError, match=r"model\.tiny_vision_tower: .*image_size 96.*image_size 32.*pretrain"):
        build_tiny_gemma3(tmp_path / "m", ModelConfig(tiny_image_size=32, tiny_vision_tower="bundled"))


def test_the_tower_command_saves_a_tower_the_build_loads(tmp_path):
    import yaml
    from transformers import Gemma3ForConditionalGeneration

    from vqatune.config import ModelConfig
    from vqatune.models.tiny import build_tiny_gemma3
    from vqatune.models.tiny_vision import load_tower, main

    model_section = {"tiny_image_size": 32, "tiny_vision_hidden_size": 16, "seed": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": model_section}))
    out = tmp_path / "tower.safetensors"
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--scenes", "64", "--epochs", "1",
                 "--device", "cpu"]) == 0
    fresh = Gemma3ForConditionalGeneration.from_pretrained(
        build_tiny_gemma3(tmp_path / "random", ModelConfig(**model_section)))
    before = {k: v.clone() for k, v in fresh.model.vision_tower.state_dict().items()}
    recipe = load_tower(fresh, out)
    assert recipe["scenes"] == 64 and recipe["seed"] == 3 and recipe["device"] == "cpu"
    assert set(recipe["held_out_accuracy"]) >= {"thing", "polyps", "scene"}
    after = fresh.model.vision_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # pretrained, not the random start
    assert not list(tmp_path.glob(".*.tmp"))


def test_scene_set_draws_the_same_scenes_in_worker_processes():
    """Chunks drawn by worker processes (spawned: a forked child could hang on torch's thread
    pool) are the scenes one process draws, in the same order."""
    from vqatune.models.tiny_vision import CHUNK, scene_set

    x1, y1 = scene_set(CHUNK + 6, 32, seed=3, stream=1, workers=1)
    x2, y2 = scene_set(CHUNK + 6, 32, seed=3, stream=1, workers=2)
    assert x1.shape == (CHUNK + 6, 3, 32, 32)
    assert torch.equal(x1, x2)
    assert y1.keys() == y2.keys() and all(torch.equal(y1[k], y2[k]) for k in y1)
