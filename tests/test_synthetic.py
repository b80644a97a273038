"""The synthetic Kvasir-VQA: schema, quirks, and answers that the pixels decide."""
import io
import random
from collections import Counter, defaultdict

import pytest
from PIL import Image

from vqatune.data import kvasir as K
from vqatune.data.synthetic import RGB, make_scene, make_synthetic_kvasir, synthetic_rows


@pytest.fixture(scope="module")
def rows():
    return list(synthetic_rows(300, seed=3))


def test_schema_matches_kvasir_vqa():
    ds = make_synthetic_kvasir(30, seed=1)
    assert ds.column_names == list(K.COLUMNS)
    assert {name: type(f).__name__ for name, f in ds.features.items()} == {
        "image": "Image", "source": "Value", "question": "Value", "answer": "Value", "img_id": "Value"}
    assert all(ds.features[c].dtype == "string" for c in ("source", "question", "answer", "img_id"))


def test_questions_and_answers_use_the_real_strings(rows):
    questions = {r["question"] for r in rows}
    assert questions <= set(K.QUESTIONS)
    assert K.Q_COUNT_INSTRUMENTS in questions  # the "instrumnets" typo is kept
    assert "How many instrumnets are in the image?" == K.Q_COUNT_INSTRUMENTS
    for r in rows:
        if r["answer"] == "nan":
            continue
        vocab = set(K.ANSWER_VOCAB[r["question"]])
        # Multi-answers join vocabulary items with ";" (sizes sometimes without a space).
        parts = [p.strip() for p in r["answer"].split(";")]
        assert all(p in vocab for p in parts), (r["question"], r["answer"])


def test_quirks_present(rows):
    answers = Counter(r["answer"] for r in rows)
    assert answers["nan"] >= 1
    assert any(";" in a for a in answers)
    per_image = Counter(r["img_id"] for r in rows)
    assert max(per_image.values()) <= 18 and min(per_image.values()) >= 1
    normal = [r for r in rows if r["source"] == "Normal" and r["answer"] != "nan"]
    assert normal and all(r["question"] == K.Q_ANY_FINDING and r["answer"] == "no" for r in normal)
    assert {r["source"] for r in rows} == set(K.SOURCES)
    assert all(len(r["img_id"]) == 25 and r["img_id"].startswith("c") for r in rows)


def test_images_are_nonsquare_jpegs_of_varied_sizes(rows):
    sizes = set()
    for r in rows[:200]:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.format == "JPEG"
        assert img.width != img.height
        sizes.add(img.size)
    assert len(sizes) >= 3


def test_same_seed_same_data_other_seed_other_data():
    a = [(r["img_id"], r["answer"], r["image"]["bytes"]) for r in synthetic_rows(20, seed=5)]
    b = [(r["img_id"], r["answer"], r["image"]["bytes"]) for r in synthetic_rows(20, seed=5)]
    c = [(r["img_id"], r["answer"]) for r in synthetic_rows(20, seed=6)]
    assert a == b
    assert [x[:2] for x in a] != c


def _cell_box(cell, w, h):
    row, col = divmod(K.GRID_CELLS.index(cell), 3)
    return col * w // 3, row * h // 3, (col + 1) * w // 3, (row + 1) * h // 3


def test_pixels_decide_the_answers():
    """The answers describe what was drawn: polyp colour in its stated cell, the green box."""
    rng = random.Random(11)
    checked_polyps = checked_box = 0
    for _ in range(40):
        img, things, flags = make_scene("Polyps", rng)
        w, h = img.size
        for t in things:
            if t.kind != "polyp":
                continue
            x0, y0, x1, y1 = _cell_box(t.cell, w, h)
            crop = img.crop((x0, y0, x1, y1)).convert("RGB")
            target = RGB[t.colour]
            close = sum(1 for px in crop.getdata() if sum(abs(a - b) for a, b in zip(px, target)) < 60)
            assert close > 0, f"no {t.colour} pixel in the stated cell {t.cell}"
            checked_polyps += 1
        green = sum(1 for px in img.crop((0, int(h * 0.7), int(w * 0.28), h)).getdata()
                    if px[1] > 150 and px[0] < 100 and px[2] < 120)
        assert (green > 20) == flags["box"]
        checked_box += 1
    assert checked_polyps >= 40 and checked_box == 40


def test_answers_vary_with_the_image(rows):
    """Per question, answers are not constant, so the image must be looked at."""
    by_q = defaultdict(set)
    for r in rows:
        by_q[r["question"]].add(r["answer"])
    for q in (K.Q_BOX, K.Q_TEXT, K.Q_COUNT_POLYPS, K.Q_WHERE_ABNORMALITY, K.Q_PROCEDURE):
        assert len(by_q[q]) >= 2, q


def _params_image_size() -> int:
    from pathlib import Path

    from vqatune.config import PrepareConfig, load_params, section

    return section(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), "prepare",
                   PrepareConfig).image_size


def _read_polyps(img: Image.Image, size: int, flags: dict):
    """A pixel-reading oracle: [(colour, cell)] of the polyps in ``img`` seen at ``size`` px.

    Every pixel close to a polyp colour is labelled with it; each connected blob of one colour
    of a polyp's size is a polyp, its centroid's 3x3 cell its location. The overlays' cells hold
    no object (make_scene), so blobs there (white text) are skipped.
    """
    import numpy as np
    from scipy import ndimage

    from vqatune.data.synthetic import POLYP_COLOURS

    pixels = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)
    palette = np.array([RGB[c] for c in POLYP_COLOURS], dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest, close = distance.argmin(-1), distance.min(-1) < 30
    found = []
    for k, colour in enumerate(POLYP_COLOURS):
        blobs, n = ndimage.label(close & (nearest == k))
        for blob in range(1, n + 1):
            ys, xs = np.nonzero(blobs == blob)
            row, col = min(int(ys.mean() * 3 / size), 2), min(int(xs.mean() * 3 / size), 2)
            cell = K.GRID_CELLS[3 * row + col]
            hidden = {"upper-left"} if flags["text"] else set()
            hidden |= {"lower-left"} if flags["box"] else set()
            # The smallest polyp (<5mm) covers ~50 px at 96 px; blurred rims of other shapes less.
            if len(ys) >= 15 * (size / 96) ** 2 and cell not in hidden:
                found.append((colour, cell))
    return sorted(found)


def test_the_pixels_carry_the_answers_at_the_model_input_size():
    """Count, colour and grid cell of the polyps read back from the image at prepare.image_size
    (what the model sees): the data carries its answers, legibly, at that size."""
    size = _params_image_size()
    rng, right, scenes = random.Random(11), 0, 0
    while scenes < 60:
        img, things, flags = make_scene("Polyps", rng)
        if any(t.kind != "polyp" for t in things):
            continue  # landmarks share the polyp colours; the oracle reads polyps only
        scenes += 1
        truth = sorted((t.colour, t.cell) for t in things)
        right += _read_polyps(img, size, flags) == truth
    assert right / scenes >= 0.9, f"oracle read {right} of {scenes} scenes right at {size} px"
