"""The prepare step: image modes, drops counted by reason, split by image, atomic output."""
import csv
import io

import datasets
import numpy as np
import pytest
from PIL import Image

from vqatune.config import ConfigError, PrepareConfig
from vqatune.data.prepare import decode_image, prepare_dataset, split_by_image, to_rgb
from vqatune.prompts import PROMPT_MODES, PromptsConfig


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_every_image_mode_becomes_rgb_at_model_size(mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50))
        assert img.mode == "I;16"
    else:
        img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out, reason = decode_image({"bytes": _png(img, fmt), "path": None}, 16, "bilinear", 10**8)
    assert reason is None
    assert out.mode == "RGB" and out.size == (16, 16)


def test_sixteen_bit_images_keep_their_contrast():
    arr = np.zeros((10, 10), dtype=np.uint16)
    arr[:, 5:] = 4000  # far below 65535: a naive 8-bit cast would make it white or black
    rgb = np.asarray(to_rgb(Image.fromarray(arr)))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 9].tolist() == [255, 255, 255]


def _write_folder(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "source", "question", "answer", "img_id"])
        writer.writeheader()
        writer.writerows(rows)


def _good_image(path, colour=(200, 40, 40)):
    Image.new("RGB", (50, 40), colour).save(path)


def test_bad_rows_are_counted_by_reason_not_crashed_on(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(4):
        _good_image(root / f"ok{i}.jpg")
    (root / "broken.jpg").write_bytes(b"this is not an image")
    truncated = _png(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (root / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    Image.new("L", (300, 300)).save(root / "bomb.png")
    (tmp_path / "outside.jpg").write_bytes(_png(Image.new("RGB", (8, 8))))
    q = "Is there text?"
    rows = [
        {"file_name": "ok0.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "a"},
        {"file_name": "ok1.jpg", "source": "s", "question": q, "answer": "no", "img_id": "b"},
        {"file_name": "ok2.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "c"},
        {"file_name": "ok3.jpg", "source": "s", "question": q, "answer": "no", "img_id": "d"},
        {"file_name": "broken.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "e"},
        {"file_name": "truncated.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "f"},
        {"file_name": "missing.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "g"},
        {"file_name": "bomb.png", "source": "s", "question": q, "answer": "yes", "img_id": "h"},
        {"file_name": "../outside.jpg", "source": "s", "question": q, "answer": "yes", "img_id": "i"},
        {"file_name": "ok0.jpg", "source": "s", "question": q, "answer": "nan", "img_id": "a"},
        {"file_name": "ok0.jpg", "source": "s", "question": q, "answer": "  ", "img_id": "a"},
        {"file_name": "ok0.jpg", "source": "s", "question": "", "answer": "yes", "img_id": "a"},
    ]
    _write_folder(root, rows)
    cfg = PrepareConfig(source="imagefolder", path=str(root), image_size=16, test_size=0.25,
                        max_image_pixels=200 * 200)
    stats = prepare_dataset(cfg, PromptsConfig(), tmp_path / "out")
    assert stats["rows_in"] == 12
    assert stats["dropped"] == {"undecodable_image": 2, "missing_file": 1, "unsafe_path": 1,
                                "decompression_bomb": 1, "nan_answer": 1, "empty_answer": 1,
                                "empty_question": 1, "missing_image_id": 0}
    assert sum(stats["rows_out"].values()) == 4
    out = datasets.load_from_disk(str(tmp_path / "out"))
    kept = sorted(list(out["train"]["img_id"]) + list(out["test"]["img_id"]))
    assert kept == ["a", "b", "c", "d"]


def test_structural_problems_stop_with_one_actionable_line(tmp_path):
    root = tmp_path / "ds"
    _good_image(root.mkdir() or root / "a.jpg")
    _write_folder(root, [{"file_name": "a.jpg", "source": "s", "question": "q", "answer": "a", "img_id": "x"}])
    with pytest.raises(ConfigError, match=r"column 'label' not found .* set prepare.answer_column"):
        prepare_dataset(PrepareConfig(source="imagefolder", path=str(root), answer_column="label"),
                        PromptsConfig(), tmp_path / "out")
    with pytest.raises(ConfigError, match="no metadata.csv"):
        prepare_dataset(PrepareConfig(source="imagefolder", path=str(tmp_path)), PromptsConfig(), tmp_path / "o")
    _write_folder(root, [{"file_name": "a.jpg", "source": "s", "question": "q", "answer": "nan", "img_id": "x"}])
    with pytest.raises(ConfigError, match="no rows left after filtering"):
        prepare_dataset(PrepareConfig(source="imagefolder", path=str(root)), PromptsConfig(), tmp_path / "o")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_processed_data_has_the_contracted_columns(processed_dir):
    ds = datasets.load_from_disk(str(processed_dir))
    assert set(ds) == {"train", "test"}
    cols = {"image", "source", "question", "answer", "img_id", "row_id", "category", "qtype",
            *(f"messages_{m}" for m in PROMPT_MODES)}
    assert set(ds["train"].column_names) == cols
    row = ds["train"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["messages_none"][-1] == {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}
    assert row["messages_static"][0]["role"] == "system"
    assert "nan" not in set(ds["train"]["answer"]) | set(ds["test"]["answer"])


def test_no_image_on_both_sides_of_the_split(processed_dir):
    ds = datasets.load_from_disk(str(processed_dir))
    train, test = set(ds["train"]["img_id"]), set(ds["test"]["img_id"])
    assert train and test and not (train & test)


def test_split_is_by_image_and_seeded():
    ds = datasets.Dataset.from_dict({"img_id": [f"i{k // 3}" for k in range(60)], "x": list(range(60))})
    a, b = split_by_image(ds, 0.25, seed=1), split_by_image(ds, 0.25, seed=1)
    assert a["test"]["x"] == b["test"]["x"]
    assert len(set(a["test"]["img_id"])) == 5
    assert not set(a["train"]["img_id"]) & set(a["test"]["img_id"])
    assert split_by_image(ds, 0.25, seed=2)["test"]["x"] != a["test"]["x"]


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "processed"

    def killed(self, path, *a, **k):
        (tmp_path / "processed.tmp").mkdir(exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PrepareConfig(synthetic_images=12), PromptsConfig(), out)
    assert not out.exists()
