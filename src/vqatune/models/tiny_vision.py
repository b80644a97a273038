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

import dataclasses
import io
import logging
import random

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


def pretrain_vision_tower(model, image_size: int, cfg: PretrainConfig) -> dict[str, float]:
    """Train ``model``'s vision tower in place on the dense scene targets; the heads are thrown
    away after. Returns held-out accuracies per target (cells with something in them only)."""
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # fixed: the bits do not follow the machine's core count
    try:
        torch.manual_seed(cfg.seed)
        held_out = max(64, cfg.scenes // 10)
        x, y = pretraining_scenes(cfg.scenes + held_out, image_size, cfg.seed)
        tower = model.model.vision_tower
        hidden = tower.config.hidden_size
        tokens = model.config.mm_tokens_per_image
        side = int(tokens ** 0.5)
        # token (r, c) of the side x side grid lies in cell (3r // side, 3c // side)
        cell_of = torch.tensor([3 * (r * 3 // side) + (c * 3 // side) for r in range(side) for c in range(side)])
        heads = nn.ModuleDict({name: nn.Linear(hidden, k) for name, k in CLASSES.items()})
        params = [*tower.parameters(), *heads.parameters()]  # the projector is not trained here
        steps = cfg.epochs * (cfg.scenes // cfg.batch_size)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=steps, pct_start=0.1)

        def outputs(rows):
            """(logits, target) per head: cell targets from each token for its own cell; the
            scene's targets from every token, so that any token the LM attends to carries them."""
            t = pooled_tokens(model, x[rows])
            out = {}
            for name, head in heads.items():
                target = y[name][rows]
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
            order = torch.randperm(cfg.scenes, generator=gen)
            for i in range(0, cfg.scenes - cfg.batch_size + 1, cfg.batch_size):
                out = outputs(order[i:i + cfg.batch_size])
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
            for name, (logits, target) in outputs(slice(cfg.scenes, None)).items():
                if name == "scene":  # every flag of the scene right, read from one token
                    right = ((logits > 0) == (target > 0.5)).all(-1)
                else:
                    guess = logits.argmax(-1)
                    right = (guess == target)[target > 0] if name not in WHOLE else guess == target
                scores[name] = round(right.float().mean().item(), 4)
        return scores
    finally:
        torch.set_num_threads(threads)
