"""A synthetic Kvasir-VQA: the real schema and quirks, with answers that the pixels decide.

Each image is a drawn endoscopy-like scene: mucosa, a lumen, and, by source, polyps (count,
colour, size class and 3x3-grid cell drawn as stated; Paris type by shape), ulcerative colitis
(diffuse red/white patches), oesophagitis streaks with a z-line, instruments (shape per kind),
a green ScopeGuide box and text overlays. Every answer is read off the scene that was drawn,
so a model that looks at the image can learn it. Deterministic from the seed.
"""
from __future__ import annotations

import dataclasses
import io
import random
import string

from PIL import Image, ImageDraw, ImageFilter

from . import kvasir as K

# Real Kvasir-VQA images run from 720x576 to 1920x1072; a quarter of that keeps the embedded
# run small while keeping them non-square and varied.
IMAGE_SIZES = ((180, 144), (240, 192), (256, 200), (320, 256), (384, 300), (480, 268))
SOURCE_WEIGHTS = {"Normal": 2500, "Ulcerative Colitis": 1000, "Esophagitis": 1000,
                  "Polyps": 1000, "Instrument": 1000}
RGB = {
    "pink": (236, 150, 160), "red": (200, 30, 35), "white": (245, 245, 240),
    "yellow": (235, 210, 60), "flesh": (225, 180, 150), "brown": (120, 70, 40),
    "orange": (240, 140, 40), "grey": (140, 140, 140), "black": (20, 20, 20),
    "green": (40, 160, 60), "blue": (50, 80, 200), "purple": (130, 50, 150),
}
POLYP_COLOURS = ("pink", "red", "white", "yellow", "brown", "orange")
# Polyp radius as a share of the shorter image side, per reported size class.
SIZE_RADIUS = {"<5mm": 0.045, "5-10mm": 0.075, "11-20mm": 0.11, ">20mm": 0.16}
NAN_SHARE = 51 / 6500  # images whose only QA answer is the literal "nan"


@dataclasses.dataclass
class Thing:
    kind: str           # polyp | uc | oesophagitis | instrument | landmark
    name: str           # e.g. "polyp", "biopsy forceps", "z-line"
    cell: str
    colour: str = ""
    size: str = ""
    polyp_type: str = ""


def cuid(rng: random.Random) -> str:
    """An id shaped like Kvasir's img_id (cuid: 'c' + 24 lower-case letters and digits)."""
    return "c" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(24))


def cell_centre(cell: str, w: int, h: int, rng: random.Random) -> tuple[int, int]:
    idx = K.GRID_CELLS.index(cell)
    row, col = divmod(idx, 3)
    # Keep the centre well inside the cell so the stated cell is unambiguous.
    x = int((col + 0.5 + rng.uniform(-0.2, 0.2)) * w / 3)
    y = int((row + 0.5 + rng.uniform(-0.2, 0.2)) * h / 3)
    return x, y


def draw_background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random,
                    gastro: bool) -> None:
    base = (200, 110, 100) if not gastro else (190, 120, 130)
    for y in range(0, h, 4):
        shade = int(25 * y / h)
        draw.rectangle([0, y, w, y + 4], fill=(base[0] - shade, base[1] - shade, base[2] - shade))
    # The lumen: a dark blob away from the centre, as in most frames.
    lx, ly = rng.randint(w // 4, 3 * w // 4), rng.randint(h // 4, 3 * h // 4)
    r = min(w, h) // 10
    draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=(70, 25, 25))


def draw_polyp(draw, t: Thing, w, h, rng) -> None:
    x, y = cell_centre(t.cell, w, h, rng)
    r = max(3, int(SIZE_RADIUS[t.size] * min(w, h)))
    fill = RGB[t.colour]
    if t.polyp_type == "paris iia":      # flat: a wide, low ellipse
        draw.ellipse([x - r, y - r // 2, x + r, y + r // 2], fill=fill)
    elif t.polyp_type == "paris ip":     # pedunculated: a head on a stalk
        draw.rectangle([x - r // 4, y, x + r // 4, y + int(1.6 * r)], fill=fill)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:                                # sessile (paris is) or untyped: a round dome
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(90, 30, 30))


def stroke(w: int, h: int) -> int:
    """Line width that stays >= 3 px at the model's input size (the smallest image, 180x144,
    shrinks ~1.9x to 96 px): thinner strokes blur below a pixel and their answers vanish."""
    return max(5, min(w, h) // 24)


# Each instrument has its own shape and tone, so that its name can be read at the input size.
INSTRUMENT_RGB = {"tube": (235, 235, 240), "biopsy forceps": (150, 150, 165), "polyp snare": (90, 220, 230),
                  "metal clip": (60, 60, 75), "injection needle": (50, 90, 235)}


def draw_instrument(draw, t: Thing, w, h, rng) -> None:
    x, y = cell_centre(t.cell, w, h, rng)
    s = min(w, h) // 8
    lw = stroke(w, h)
    colour = INSTRUMENT_RGB[t.name]
    if t.name == "tube":
        draw.line([x - s, y - s, x + s, y + s], fill=colour, width=2 * lw)
    elif t.name == "biopsy forceps":
        draw.line([x - s, y, x, y], fill=colour, width=lw)
        draw.polygon([(x, y), (x + s, y - s // 2 - lw), (x + s, y + s // 2 + lw)], fill=colour)
    elif t.name == "polyp snare":
        draw.ellipse([x - s, y - s, x + s, y + s], outline=colour, width=lw)
    elif t.name == "metal clip":
        draw.line([x - s // 2, y - s // 2, x, y + s // 2, x + s // 2, y - s // 2], fill=colour, width=lw)
    else:  # injection needle
        draw.line([x - s, y + s, x + s, y - s], fill=colour, width=lw)


def draw_landmark(draw, t: Thing, w, h, rng) -> None:
    x, y = cell_centre(t.cell, w, h, rng)
    s = min(w, h) // 6
    lw = stroke(w, h)
    if t.name == "z-line":
        pts = [(x - s + i * s // 3, y + (6 if i % 2 else -6)) for i in range(7)]
        draw.line(pts, fill=RGB["white"], width=lw)
    elif t.name == "pylorus":
        # A pink ring (the colour its colour answer names) round a small dark opening. A dark ring
        # (60, 20, 20) contradicted its answer "pink" and, at 96 px, looked like the lumen.
        draw.ellipse([x - s // 2 - lw // 2, y - s // 2 - lw // 2, x + s // 2 + lw // 2, y + s // 2 + lw // 2],
                     fill=RGB["pink"])
        draw.ellipse([x - s // 4, y - s // 4, x + s // 4, y + s // 4], fill=(60, 20, 20))
    elif t.name == "cecum":
        for k in range(3):
            draw.arc([x - s + 2 * lw * k, y - s + 2 * lw * k, x + s - 2 * lw * k, y + s - 2 * lw * k],
                     200, 340, fill=RGB["pink"], width=lw)
    else:  # ileum: villous texture
        for _ in range(12):
            px, py = x + rng.randint(-s, s), y + rng.randint(-s, s)
            draw.ellipse([px - lw // 2, py - lw // 2, px + lw // 2, py + lw // 2], fill=RGB["yellow"])


def make_scene(source: str, rng: random.Random) -> tuple[Image.Image, list[Thing], dict]:
    """Draw one image of ``source``; return it, what was drawn, and the global flags."""
    w, h = rng.choice(IMAGE_SIZES)
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    gastro = source == "Esophagitis"
    draw_background(draw, w, h, rng, gastro)
    things: list[Thing] = []
    flags = {"box": rng.random() < 0.31, "text": rng.random() < 0.79}
    # Nothing is placed under an overlay, so every stated object stays visible.
    cells = [c for c in K.GRID_CELLS if not (flags["box"] and c == "lower-left")
             and not (flags["text"] and c == "upper-left")]
    rng.shuffle(cells)

    if source == "Polyps" or (source == "Instrument" and rng.random() < 0.4):
        n = rng.choices([1, 2, 3], weights=[70, 20, 10])[0]
        for i in range(n):
            things.append(Thing("polyp", "polyp", cells.pop(), rng.choice(POLYP_COLOURS),
                                rng.choice(list(SIZE_RADIUS)), rng.choice(K.POLYP_TYPES)))
    if source == "Ulcerative Colitis":
        for cell in K.GRID_CELLS:  # diffuse: every cell, as in 57% of real UC answers
            for _ in range(3):
                x, y = cell_centre(cell, w, h, rng)
                r = rng.randint(3, max(4, min(w, h) // 14))
                colour = rng.choice(["red", "white", "pink"])
                draw.ellipse([x - r, y - r, x + r, y + r], fill=RGB[colour])
        things.append(Thing("uc", "ulcerative colitis", "center", "pink; red; white"))
    if source == "Esophagitis":
        cell = cells.pop()
        x, y = cell_centre(cell, w, h, rng)
        for k in range(4):
            draw.line([x - 20 + 10 * k, y - 15, x - 10 + 10 * k, y + 15], fill=RGB["red"],
                      width=stroke(w, h))
        things.append(Thing("oesophagitis", "oesophagitis", cell, "red"))
        things.append(Thing("landmark", "z-line", cells.pop(), "white"))
    elif source != "Normal" and rng.random() < 0.3:
        name = rng.choice(["cecum", "ileum", "pylorus"])
        things.append(Thing("landmark", name, cells.pop(), "pink" if name != "ileum" else "yellow"))
    if source == "Instrument":
        n = rng.choices([1, 2, 3], weights=[75, 20, 5])[0]
        for _ in range(n):
            things.append(Thing("instrument", rng.choice(K.INSTRUMENTS), cells.pop()))

    for t in things:
        if t.kind == "polyp":
            draw_polyp(draw, t, w, h, rng)
        elif t.kind == "instrument":
            draw_instrument(draw, t, w, h, rng)
        elif t.kind == "landmark":
            draw_landmark(draw, t, w, h, rng)

    if flags["box"]:  # ScopeGuide picture-in-picture, lower left
        draw.rectangle([0, int(h * 0.68), int(w * 0.28), h], fill=(10, 10, 10), outline=(30, 200, 60),
                       width=3)
        draw.rectangle([int(w * 0.05), int(h * 0.75), int(w * 0.2), int(h * 0.93)], fill=(30, 200, 60))
    if flags["text"]:  # burned-in patient/date overlay, upper left
        draw.rectangle([4, 4, int(w * 0.3), int(h * 0.12)], fill=(0, 0, 0))
        draw.text((6, 5), f"{rng.randint(1, 31):02d}/{rng.randint(1, 12):02d} ID{rng.randint(100, 999)}",
                  fill=(255, 255, 255))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, things, flags


def _join_cells(cells) -> str:
    """Kvasir's location answer: cells sorted alphabetically, joined with "; ", or "none"."""
    cells = sorted(set(cells))
    return "; ".join(cells) if cells else "none"


def answers_for(things: list[Thing], flags: dict, source: str, rng: random.Random) -> dict[str, str]:
    """The answer to every template that applies to a non-Normal image, read off the scene."""
    polyps = [t for t in things if t.kind == "polyp"]
    findings = [t for t in things if t.kind in ("polyp", "uc", "oesophagitis")]
    instruments = [t for t in things if t.kind == "instrument"]
    landmarks = [t for t in things if t.kind == "landmark"]
    abnormality_names = sorted({t.name for t in findings})
    answers = {
        K.Q_LANDMARK: "; ".join(sorted({t.name for t in landmarks})) or "none",
        K.Q_INSTRUMENT: "; ".join(sorted({t.name for t in instruments})) or "none",
        K.Q_POLYPS_REMOVED: "no" if polyps else ("yes" if source == "Instrument" else "not relevant"),
        K.Q_EASY: ("yes" if any(t.kind != "polyp" or t.size in ("11-20mm", ">20mm") for t in findings)
                   else "no") if findings else "not relevant",
        K.Q_BOX: "yes" if flags["box"] else "no",
        K.Q_TEXT: "yes" if flags["text"] else "no",
        K.Q_POLYP_TYPE: "; ".join(sorted({t.polyp_type for t in polyps})) or "none",
        K.Q_PROCEDURE: "gastroscopy" if source == "Esophagitis" else "colonoscopy",
        K.Q_WHERE_ABNORMALITY: (_join_cells(K.GRID_CELLS) if any(t.kind == "uc" for t in findings)
                                else _join_cells(t.cell for t in findings)),
        K.Q_WHERE_INSTRUMENT: _join_cells(t.cell for t in instruments),
        K.Q_WHERE_LANDMARK: _join_cells(t.cell for t in landmarks),
        K.Q_COUNT_POLYPS: str(len(polyps)),
        K.Q_COUNT_INSTRUMENTS: str(len(instruments)),
    }
    if polyps:
        # Quirks kept on purpose: sizes joined with ";" and no space; ">20" next to ">20mm".
        sizes = sorted({t.size for t in polyps})
        sizes = [">20" if s == ">20mm" and rng.random() < 0.1 else s for s in sizes]
        answers[K.Q_SIZE] = ";".join(sizes)
    else:
        answers[K.Q_SIZE] = "none"
    if findings:  # Kvasir asks these only where there is a finding
        answers[K.Q_ABNORMALITY] = "; ".join(abnormality_names)
        answers[K.Q_COUNT_FINDINGS] = str(len(findings))
        # Colours are not order-normalised in Kvasir-VQA (not sorted); here they come in the
        # reading order of the findings' cells, so the order too is read off the image.
        colours = []
        for t in sorted(findings, key=lambda t: K.GRID_CELLS.index(t.cell)):
            colours.extend(c.strip() for c in t.colour.split(";"))
        colours = list(dict.fromkeys(colours))
        answers[K.Q_COLOR_ABNORMALITY] = "; ".join(colours)
    if landmarks and rng.random() < 0.15:  # rare in the real data (88 rows)
        answers[K.Q_COLOR_LANDMARK] = "; ".join(sorted({t.colour for t in landmarks}))
    if answers[K.Q_WHERE_LANDMARK] == "lower-right" and rng.random() < 0.3:
        answers[K.Q_WHERE_LANDMARK] = "lower-rigth"  # the dataset's typo
    return answers


def _jpeg(img: Image.Image, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.choice([85, 90, 95]))
    return buf.getvalue()


def synthetic_rows(n_images: int, seed: int):
    """Yield Kvasir-VQA rows (dicts with image bytes) for ``n_images`` drawn images."""
    rng = random.Random(seed)
    sources = list(SOURCE_WEIGHTS)
    weights = list(SOURCE_WEIGHTS.values())
    n_nan = max(1, round(n_images * NAN_SHARE))
    for i in range(n_images):
        source = rng.choices(sources, weights=weights)[0]
        img_id = cuid(rng)
        img, things, flags = make_scene(source, rng)
        image = {"bytes": _jpeg(img, rng), "path": None}
        if i < n_nan:  # like the 51 real images whose only answer is "nan"
            qa = [(rng.choice(K.QUESTIONS), "nan")]
        elif source == "Normal":
            qa = [(K.Q_ANY_FINDING, "no")]
        else:
            answers = answers_for(things, flags, source, rng)
            k = min(len(answers), rng.randint(10, 18))
            qa = rng.sample(sorted(answers.items()), k)
        for question, answer in qa:
            yield {"image": image, "source": source, "question": question, "answer": answer,
                   "img_id": img_id}


def make_synthetic_kvasir(n_images: int, seed: int):
    """The synthetic set as a ``datasets.Dataset`` with Kvasir-VQA's columns and types."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "source": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "img_id": datasets.Value("string"),
    })
    rows = list(synthetic_rows(n_images, seed))
    columns = {name: [row[name] for row in rows] for name in K.COLUMNS}
    return datasets.Dataset.from_dict(columns, features=features)
