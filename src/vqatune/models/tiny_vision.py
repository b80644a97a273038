"""Pretraining the builtin tiny model's vision tower on the synthetic world, as MedGemma's tower
was pretrained on medical images before anyone fine-tuned the model on a VQA set.

A random SigLIP tower passes on what is cheap to keep: the whole image's colour, hence its
source. Measured with ``benchmarks/vision_probe.py`` on the random tower: polyp count, polyp
size and the landmark's cell stayed near their majority share even for probes fitted on 1,100
labelled scenes, and the fine-tuned model answered those questions with the majority answer.
The LM cannot learn what its image tokens do not carry.

So ``build_tiny_gemma3`` gives the tower a short dense pretraining (about two minutes on two
cores at the embedded size): scenes drawn by the prepare stage's own generator from a seed of
their own (none is a training or test image), and for each of the image tokens the LM receives
(the tower's patches pooled and normalised as the projector does), what is drawn in its
3x3-grid cell (which thing; a polyp's colour, size and shape; an instrument's or landmark's
kind) and what the whole scene holds (source, counts, overlays, sizes, kinds), so that any token
the LM attends to carries the scene. Segmentation- and tagging-style targets, what is where, not
the VQA pairs: questions, answers and prompts are never seen, the projector and the LM stay
random, and the fine-tuning still has to teach the model to read the tokens and answer in words.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

# Per cell of the 3x3 grid: one categorical target each (0 = nothing of the kind there).
CELL_THINGS = ("none", "polyp", "instrument", "landmark", "oesophagitis", "box", "text")


def _scene_flags() -> tuple[str, ...]:
    from ..data import kvasir as K
    from ..data.synthetic import POLYP_COLOURS, SIZE_RADIUS

    return ("box", "text", *(f"size:{v}" for v in SIZE_RADIUS), *(f"shape:{v}" for v in K.POLYP_TYPES),
            *(f"colour:{v}" for v in POLYP_COLOURS), *(f"instrument:{v}" for v in K.INSTRUMENTS),
            *(f"landmark:{v}" for v in K.LANDMARKS))


# Whole-scene yes/no targets, each predicted from every image token.
SCENE_FLAGS = _scene_flags()


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    scenes: int = 2400
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    threads: int = 2
    device: str = "cpu"              # cuda: the bundled tower's recipe takes ~1.5 min on an H100
    held_out: int | None = None      # scenes scored after training; None = scenes // 8 (at least 64)

    @property
    def held_out_scenes(self) -> int:
        return self.held_out or max(64, self.scenes // 8)


# Scenes are drawn in chunks, each from a generator stream of its own, so that a set of any size
# starts with the same scenes and a GPU machine can draw them in parallel. Training chunk k of
# seed s is stream 1000 (s + 1) + k, held-out chunk k is 1000 (s + 7) + k: disjoint sets.
CHUNK = 200
TRAIN_STREAM, HELD_OUT_STREAM = 1, 7


def _targets(things, flags, source: str) -> dict[str, list[int]]:
    """The dense labels of one scene: per cell (9 entries), whole-scene classes (1 entry) and the
    scene's yes/no flags (one per SCENE_FLAGS)."""
    from ..data import kvasir as K
    from ..data.synthetic import POLYP_COLOURS, SIZE_RADIUS, SOURCE_WEIGHTS

    cells = {name: [0] * 9 for name in ("thing", "colour", "size", "shape", "instrument", "landmark")}
    if flags["box"]:
        cells["thing"][K.GRID_CELLS.index("lower-left")] = CELL_THINGS.index("box")
    if flags["text"]:
        cells["thing"][K.GRID_CELLS.index("upper-left")] = CELL_THINGS.index("text")
    for t in things:
        if t.kind == "uc":
            continue  # everywhere: a global label
        i = K.GRID_CELLS.index(t.cell)
        cells["thing"][i] = CELL_THINGS.index(t.kind)
        if t.kind == "polyp":
            cells["colour"][i] = 1 + POLYP_COLOURS.index(t.colour)
            cells["size"][i] = 1 + list(SIZE_RADIUS).index(t.size)
            cells["shape"][i] = 1 + K.POLYP_TYPES.index(t.polyp_type)
        elif t.kind == "instrument":
            cells["instrument"][i] = 1 + K.INSTRUMENTS.index(t.name)
        elif t.kind == "landmark":
            cells["landmark"][i] = 1 + K.LANDMARKS.index(t.name)
    whole = {
        "source": [list(SOURCE_WEIGHTS).index(source)],
        "polyps": [sum(t.kind == "polyp" for t in things)],
        "instruments": [sum(t.kind == "instrument" for t in things)],
    }
    present = {"box", "text"} & {k for k, v in flags.items() if v}
    for t in things:
        if t.kind == "polyp":
            present |= {f"size:{t.size}", f"shape:{t.polyp_type}", f"colour:{t.colour}"}
        elif t.kind in ("instrument", "landmark"):
            present.add(f"{t.kind}:{t.name}")
    whole["scene"] = [int(name in present) for name in SCENE_FLAGS]
    return {**cells, **whole}


CLASSES = {"thing": len(CELL_THINGS), "colour": 7, "size": 5, "shape": 4, "instrument": 6, "landmark": 5,
           "source": 5, "polyps": 4, "instruments": 4, "scene": len(SCENE_FLAGS)}
WHOLE = ("source", "polyps", "instruments", "scene")


def _loss(name: str, logits, target):
    """Cross-entropy; a cell's attributes (a polyp's colour, ...) only where it has that thing,
    so the many empty cells do not teach the tower that every cell is empty."""
    from torch.nn.functional import binary_cross_entropy_with_logits, cross_entropy

    if name == "scene":
        return binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean()  # one per flag
    logits, target = logits.flatten(0, -2), target.flatten()
    if name in WHOLE or name == "thing":
        return cross_entropy(logits, target)
    keep = target > 0
    return cross_entropy(logits[keep], target[keep]) if keep.any() else logits.sum() * 0


def pretraining_scenes(n: int, image_size: int, seed: int):
    """``n`` scenes as the model's pixel values [n, 3, S, S] and their targets: drawn, saved as
    JPEG and shrunk to the input size as the prepare stage does, normalised as the processor does."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data.synthetic import SOURCE_WEIGHTS, make_scene

    rng = random.Random(f"vqatune-tiny-vision-pretraining-{seed}")  # never the dataset's seed
    sources = list(SOURCE_WEIGHTS)
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    targets = {name: [] for name in CLASSES}
    for k in range(n):
        source = rng.choice(sources)
        img, things, flags = make_scene(source, rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        img = Image.open(buf).convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels[k] = np.asarray(img)
        for name, values in _targets(things, flags, source).items():
            targets[name].append(values)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)
    return x, {name: torch.tensor(v) for name, v in targets.items()}


def scene_set(n: int, image_size: int, seed: int, stream: int, workers: int = 1):
    """``n`` scenes (pixels and targets, as ``pretraining_scenes``) drawn in chunks of ``CHUNK``,
    chunk k from generator stream 1000 (seed + stream) + k; ``workers`` processes draw them."""
    import concurrent.futures
    import multiprocessing

    import torch

    jobs = [(min(CHUNK, n - start), image_size, 1000 * (seed + stream) + k)
            for k, start in enumerate(range(0, n, CHUNK))]
    if workers > 1:
        # spawn, not fork: a forked child inherits torch's thread pool mid-state and can hang on its
        # first tensor op (seen on a 2-core EPYC: both workers idle, the parent waiting forever)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(pretraining_scenes, *zip(*jobs)))
    else:
        parts = [pretraining_scenes(*job) for job in jobs]
    return (torch.cat([p[0] for p in parts]),
            {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]})


def pooled_tokens(model, pixel_values):
    """The image tokens as the projector sees them before its projection: the tower's patches
    average-pooled to the token grid and RMS-normalised (by the projector's own norm)."""
    projector = model.model.multi_modal_projector
    patches = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
    b, n, d = patches.shape
    side = int(n ** 0.5)
    grid = patches.transpose(1, 2).reshape(b, d, side, side)
    pooled = projector.avg_pool(grid).flatten(2).transpose(1, 2)
    return projector.mm_soft_emb_norm(pooled)


def pretrain_vision_tower(model, image_size: int, cfg: PretrainConfig, workers: int = 1,
                          scenes=None) -> dict[str, float]:
    """Train ``model``'s vision tower in place on the dense scene targets; the heads are thrown
    away after. Returns held-out accuracies per target (cells with something in them only).
    ``scenes``: a function (n, stream) -> ``scene_set``'s result, for callers that draw the
    scenes once for several runs; by default they are drawn here by ``workers`` processes."""
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # fixed: the bits do not follow the machine's core count
    try:
        torch.manual_seed(cfg.seed)
        dev = torch.device(cfg.device)
        scenes = scenes or (lambda n, stream: scene_set(n, image_size, cfg.seed, stream, workers))
        x, y = scenes(cfg.scenes, TRAIN_STREAM)
        hx, hy = scenes(cfg.held_out_scenes, HELD_OUT_STREAM)
        x, y = x.to(dev), {name: t.to(dev) for name, t in y.items()}
        hx, hy = hx.to(dev), {name: t.to(dev) for name, t in hy.items()}
        tower = model.model.vision_tower
        hidden = tower.config.hidden_size
        tokens = model.config.mm_tokens_per_image
        side = int(tokens ** 0.5)
        # token (r, c) of the side x side grid lies in cell (3r // side, 3c // side)
        cell_of = torch.tensor([3 * (r * 3 // side) + (c * 3 // side) for r in range(side) for c in range(side)],
                               device=dev)
        heads = nn.ModuleDict({name: nn.Linear(hidden, k) for name, k in CLASSES.items()})
        model.to(dev)
        heads.to(dev)
        params = [*tower.parameters(), *heads.parameters()]  # the projector is not trained here
        steps = cfg.epochs * (cfg.scenes // cfg.batch_size)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=steps, pct_start=0.1)

        def outputs(pixels, labels, rows):
            """(logits, target) per head: cell targets from each token for its own cell; the
            scene's targets from every token, so that any token the LM attends to carries them."""
            t = pooled_tokens(model, pixels[rows])
            out = {}
            for name, head in heads.items():
                target = labels[name][rows]
                if name == "scene":
                    target = target.unsqueeze(1).expand(-1, t.shape[1], -1).float()
                elif name in WHOLE:
                    target = target.expand(-1, t.shape[1])
                else:
                    target = target[:, cell_of]
                out[name] = (head(t), target)
            return out

        tower.train()
        step = 0
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.scenes, generator=gen).to(dev)
            for i in range(0, cfg.scenes - cfg.batch_size + 1, cfg.batch_size):
                out = outputs(x, y, order[i:i + cfg.batch_size])
                loss = sum(_loss(name, logits, target) for name, (logits, target) in out.items())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
            log.info("vision pretraining: step %d/%d, loss %.3f", step, steps, loss.item())
        tower.eval()
        with torch.no_grad():
            scores = {}
            for name, (logits, target) in outputs(hx, hy, slice(None)).items():
                if name == "scene":  # every flag of the scene right, read from one token
                    right = ((logits > 0) == (target > 0.5)).all(-1)
                else:
                    guess = logits.argmax(-1)
                    right = (guess == target)[target > 0] if name not in WHOLE else guess == target
                scores[name] = round(right.float().mean().item(), 4)
        model.to("cpu")
        return scores
    finally:
        torch.set_num_threads(threads)


# The tower `model.tiny_vision_tower: bundled` loads: pretrained once by `pretrain_vision_tower` with
# the recipe in its metadata (9,600 scenes x 32 epochs, ~1.5 minutes on an H100, about half an hour
# on two CPU cores; `main` below remakes it), 16x the pretraining base_model can afford on 2 cores
# within the 10-minute run.
BUNDLED = Path(__file__).with_name("tiny_vision_tower.safetensors")
RECIPE_KEY = "vqatune_tiny_vision"


def tower_shape(model) -> dict:
    """What a tower's weights fit: the input size and the tower's sizes."""
    v = model.config.vision_config
    return {"image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.hidden_size,
            "layers": v.num_hidden_layers, "heads": v.num_attention_heads}


def save_tower(model, path: str | Path, recipe: dict) -> Path:
    """The vision tower's weights as safetensors, with its shape and ``recipe`` in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", RECIPE_KEY: json.dumps({**tower_shape(model), **recipe})})
    tmp.replace(path)
    return path


def load_tower(model, path: str | Path = BUNDLED) -> dict:
    """Load a tower saved by ``save_tower`` into ``model``; returns its recipe. A tower made for
    other sizes is refused with the line that says what to do."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..config import ConfigError

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(RECIPE_KEY, "{}"))
    want = tower_shape(model)
    got = {k: meta.get(k) for k in want}
    if got != want:
        show = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
        raise ConfigError(f"model.tiny_vision_tower: {Path(path).name} was pretrained for {show(got)}; this model "
                          f"has {show(want)}: set model.tiny_vision_tower: pretrain, or make a tower for these "
                          "sizes with python -m vqatune.models.tiny_vision --help")
    model.model.vision_tower.load_state_dict(load_file(str(path)), strict=True)
    return {k: v for k, v in meta.items() if k not in want}


def random_start(cfg):
    """The model base_model builds from the ``ModelConfig`` ``cfg``, its tower left random: where
    every tower pretraining starts."""
    import tempfile

    from transformers import Gemma3ForConditionalGeneration

    from .tiny import build_tiny_gemma3

    start = dataclasses.replace(cfg, tiny_vision_tower="pretrain", tiny_vision_pretraining_scenes=0)
    with tempfile.TemporaryDirectory() as tmp:
        return Gemma3ForConditionalGeneration.from_pretrained(build_tiny_gemma3(Path(tmp) / "m", start))


def main(argv=None) -> int:
    """Pretrain the tiny tower that params.yaml's model section builds and save it (the bundled
    one: --scenes 9600 --epochs 32 --device cuda --workers 16 --out src/vqatune/models/tiny_vision_tower.safetensors)."""
    import torch

    from ..config import ModelConfig, load_params, section

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml", help="its model: section gives the sizes and seed")
    parser.add_argument("--scenes", type=int, default=9600)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing the scenes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = section(load_params(args.params), "model", ModelConfig)
    model = random_start(cfg)
    pc = PretrainConfig(scenes=args.scenes, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, seed=cfg.seed, device=args.device)
    scores = pretrain_vision_tower(model, cfg.tiny_image_size, pc, workers=args.workers)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    recipe = {"scenes": pc.scenes, "epochs": pc.epochs, "batch_size": pc.batch_size, "learning_rate": pc.learning_rate,
              "seed": pc.seed, "device": device, "held_out_scenes": pc.held_out_scenes,
              "held_out_accuracy": scores}
    print(f"tower -> {save_tower(model, args.out, recipe)}: {json.dumps(recipe)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
