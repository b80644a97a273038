"""Recipes for the tiny model's vision-tower pretraining, side by side: held-out accuracy per target.

Each variant starts from the random tower that base_model builds from params.yaml's model section
(as `python -m vqatune.models.tiny_vision` does) and trains with the library's own loop
(`pretrain_vision_tower`); the scenes are drawn once, by `--workers` processes, and each variant
takes the first `scenes` of them. On one H100 a 9,600 x 32 recipe takes about 1.5 minutes; on two
CPU cores about half an hour.

    python benchmarks/tiny_tower_recipes.py --variants variants.json --out benchmarks/results/tiny_tower_recipes
variants.json: [{"scenes": 2400, "epochs": 8}, {"scenes": 9600, "epochs": 32, "batch_size": 64}, ...]
(keys: those of PretrainConfig: scenes, epochs, batch_size, learning_rate)
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from vqatune.config import ModelConfig, load_params, section
from vqatune.models import tiny_vision

KEYS = ("scenes", "epochs", "batch_size", "learning_rate")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", required=True)
    parser.add_argument("--out", required=True, help="path without suffix: .json and .md are written")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    variants = json.loads(Path(args.variants).read_text())
    for v in variants:
        if set(v) - set(KEYS):
            raise SystemExit(f"unknown keys {sorted(set(v) - set(KEYS))} (allowed: {', '.join(KEYS)})")
    cfg = section(load_params(args.params), "model", ModelConfig)
    random_model = tiny_vision.random_start(cfg)
    # Each set is drawn once, as large as the largest variant asks; a set of n scenes is the
    # first n of a larger one (tiny_vision.CHUNK), so each variant takes the head of it. Every
    # variant is scored on the same held-out scenes: as many as the largest variant's.
    most = max(v.get("scenes", tiny_vision.PretrainConfig.scenes) for v in variants)
    held_out = tiny_vision.PretrainConfig(scenes=most).held_out_scenes
    drawn = {stream: tiny_vision.scene_set(n, cfg.tiny_image_size, cfg.seed, stream, args.workers)
             for stream, n in ((tiny_vision.TRAIN_STREAM, most), (tiny_vision.HELD_OUT_STREAM, held_out))}

    def scenes(n, stream):
        x, y = drawn[stream]
        return x[:n], {name: t[:n] for name, t in y.items()}

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for v in variants:
        pc = tiny_vision.PretrainConfig(**v, seed=cfg.seed, device=args.device, held_out=held_out)
        model = copy.deepcopy(random_model)
        began = time.perf_counter()
        scores = tiny_vision.pretrain_vision_tower(model, cfg.tiny_image_size, pc, scenes=scenes)
        row = {**{k: getattr(pc, k) for k in KEYS}, "seconds": round(time.perf_counter() - began, 3), **scores}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n")
    names = list(tiny_vision.CLASSES)
    lines = [f"# Tiny tower pretraining recipes ({device})", "",
             "Held-out accuracy per target (cell targets: cells with something in them).", "",
             "| " + " | ".join([*KEYS, "seconds", *names]) + " |", "|" + "---|" * (len(KEYS) + 1 + len(names))]
    lines += ["| " + " | ".join(str(r[k]) for k in [*KEYS, "seconds", *names]) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
