"""How much of each synthetic answer the tiny model's image features carry: probes on its vision
tower, before and after fine-tuning.

The embedded run's tuned model reads whole-image answers (procedure, text, box, which finding)
but stays at the majority answer on polyp counts, polyp sizes and locations (metrics/
eval_by_category.json). This asks whether the image tokens it is given hold those answers at
all: scenes are drawn by the prepare stage's generator (another seed, so none of them is a
training or test image), passed through the model's vision tower and projector as the LM receives
them, and two probes are fitted per answer on 1,100 scenes and scored on 400 others:

- ``linear``: logistic regression on all image tokens, flattened;
- ``tokens``: a small MLP on each image token, summed with a learnt per-position gate, then a
  classifier (a reader that can count and locate over tokens, as attention can).

A probe near the majority share means the features do not carry that answer for a reader of this
kind, whatever the LM learns. CPU, about two minutes. Writes ``vision_probe.json`` and ``.md``::

    python benchmarks/vision_probe.py --model models/base [--adapter models/adapter] --out results/
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

SOURCES = ["Polyps", "Instrument", "Ulcerative Colitis", "Esophagitis"]  # the images with QA beyond "no"


def labels_of(things, source: str) -> dict[str, int]:
    """The probed answers of one drawn scene, as class numbers."""
    from vqatune.data.kvasir import GRID_CELLS
    from vqatune.data.synthetic import SIZE_RADIUS

    polyps = [t for t in things if t.kind == "polyp"]
    landmarks = [t for t in things if t.kind == "landmark"]
    return {
        "polyp count": len(polyps),
        "largest polyp size class (0 = none)": max((1 + list(SIZE_RADIUS).index(t.size) for t in polyps), default=0),
        "instrument count": sum(t.kind == "instrument" for t in things),
        "landmark cell (0 = none)": 1 + GRID_CELLS.index(landmarks[0].cell) if landmarks else 0,
        "source": SOURCES.index(source),
    }


def scenes(n: int, seed: int):
    """``n`` scenes of the non-Normal sources (equal shares) and their labels."""
    from vqatune.data.synthetic import make_scene

    rng = random.Random(seed)
    images, rows = [], []
    for _ in range(n):
        source = rng.choice(SOURCES)
        img, things, _ = make_scene(source, rng)
        images.append(img.convert("RGB"))
        rows.append(labels_of(things, source))
    return images, {name: np.array([row[name] for row in rows]) for name in rows[0]}


def image_tokens(model_dir: str, adapter_dir: str | None, images) -> torch.Tensor:
    """[n, tokens, hidden]: the projector's output (``get_image_features``), what replaces the
    image placeholders; the model loaded as evaluation loads it."""
    from vqatune.models.loading import load_base_model, load_processor, load_tuned_model

    if adapter_dir:
        model, processor = load_tuned_model(model_dir, adapter_dir, device="cpu")
    else:
        model, processor = load_base_model(model_dir, device="cpu").eval(), load_processor(model_dir)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 100):
            pixels = processor.image_processor(images[i:i + 100], return_tensors="pt")["pixel_values"]
            out.append(model.get_image_features(pixel_values=pixels.to(model.dtype)).pooler_output)
    return torch.cat(out).float()


def token_probe(x: torch.Tensor, y: np.ndarray, train: int, seed: int = 0) -> float:
    """Per-token MLP, gated sum over positions, classifier; held-out accuracy."""
    torch.manual_seed(seed)
    x = (x - x[:train].mean((0, 1))) / (x[:train].std((0, 1)) + 1e-6)
    target = torch.tensor(y)
    gate = torch.nn.Parameter(torch.zeros(x.shape[1], 32))
    per_token = torch.nn.Sequential(torch.nn.Linear(x.shape[-1], 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    head = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(32, int(target.max()) + 1))
    opt = torch.optim.AdamW([*per_token.parameters(), *head.parameters(), gate], 3e-3, weight_decay=0.01)
    read = lambda rows: head((per_token(x[rows]) * torch.sigmoid(gate)).sum(1))  # noqa: E731
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(read(slice(0, train)), target[:train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (read(slice(train, None)).argmax(1) == target[train:]).float().mean().item()


def linear_probe(x: torch.Tensor, y: np.ndarray, train: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = x.flatten(1).numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
    clf.fit(flat[:train], y[:train])
    return float((clf.predict(flat[train:]) == y[train:]).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the base model folder (models/base)")
    ap.add_argument("--adapter", action="append", default=[],
                    help="also probe with this adapter merged (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenes", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    images, labels = scenes(args.scenes, args.seed)
    train = int(args.scenes * 11 / 15)
    results = {"scenes": args.scenes, "train": train, "model": args.model, "probes": {}}
    for name, y in labels.items():
        results["probes"][name] = {"majority": float(np.bincount(y[train:]).max() / len(y[train:]))}
    for label, adapter in [("base", None)] + [(Path(a).name or a, a) for a in args.adapter]:
        x = image_tokens(args.model, adapter, images)
        for name, y in labels.items():
            results["probes"][name][label] = {"linear": round(linear_probe(x, y, train), 3),
                                              "tokens": round(token_probe(x, y, train), 3)}
            print(name, label, results["probes"][name][label], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    variants = [k for k in next(iter(results["probes"].values())) if k != "majority"]
    lines = ["| answer | majority | " + " | ".join(f"{v} linear | {v} tokens" for v in variants) + " |",
             "|---|---|" + "---|---|" * len(variants)]
    for name, row in results["probes"].items():
        lines.append(f"| {name} | {row['majority']:.3f} | "
                     + " | ".join(f"{row[v]['linear']:.3f} | {row[v]['tokens']:.3f}" for v in variants) + " |")
    (out / "vision_probe.md").write_text(
        f"# Vision probes: {args.scenes} synthetic scenes ({train} to fit, the rest scored)\n\n"
        "`python benchmarks/vision_probe.py " + " ".join(f"--adapter {a}" for a in args.adapter)
        + f" --model {args.model} --out ...`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
