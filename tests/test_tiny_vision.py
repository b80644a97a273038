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
