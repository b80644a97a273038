"""The prepare step: decode, clean, resize, categorise and split QA rows by image.

Output (``save_to_disk``): a DatasetDict with ``train`` and ``test``, columns ``image``
(RGB, square, at the model's image size), ``source``, ``question``, ``answer``, ``img_id``,
``row_id``, ``category``, ``qtype``, and ``messages_<mode>`` for every prompt mode (the
assistant answer included). Bad rows are dropped and counted by reason, never crash the run.
"""
from __future__ import annotations

import io
import logging
import math
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import ConfigError, PrepareConfig
from ..outputs import fresh_staging, replace_dir
from ..prompts import PROMPT_MODES, PromptsConfig, build_messages, question_category
from .kvasir import QUESTION_TYPE
from .sources import ESCAPING_PATH, MISSING_FILE, load_source

log = logging.getLogger(__name__)

DROP_REASONS = ("undecodable_image", "missing_file", "unsafe_path", "decompression_bomb",
                "nan_answer", "empty_answer", "empty_question", "missing_image_id")
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the mode: 16-bit and float images are scaled, not clipped to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        # Transparent pixels become black, as the endoscope's frame around the image is.
        canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def decode_image(image: dict | None, size: int, resample: str, max_pixels: int):
    """(resized RGB image, None) or (None, drop reason)."""
    if image is None:
        return None, "missing_file"
    if image.get("path") == MISSING_FILE:
        return None, "missing_file"
    if image.get("path") == ESCAPING_PATH:
        return None, "unsafe_path"
    data = image.get("bytes")
    if data is None:
        return None, "missing_file"
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x the limit and raises above 2x: both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression_bomb"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, "undecodable_image"
    return rgb.resize((size, size), resample=RESAMPLE[resample]), None


def _drop_reason_for_text(question, answer, img_id) -> str | None:
    if question is None or not str(question).strip():
        return "empty_question"
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return "empty_answer"
    text = str(answer).strip()
    if not text:
        return "empty_answer"
    if text.lower() == "nan":
        return "nan_answer"
    if img_id is None or not str(img_id).strip():
        return "missing_image_id"
    return None


class RowProcessor:
    """``datasets.map`` function: one batch of raw rows -> processed rows + drop reasons.

    A class (not a closure) so that ``num_proc`` workers can pickle it; it caches the last
    decoded image because Kvasir-VQA repeats the same image bytes on ~9 consecutive rows.
    """

    def __init__(self, cfg: PrepareConfig, prompts: PromptsConfig):
        self.cfg, self.prompts = cfg, prompts
        self._last_key, self._last = None, (None, None)

    def _image(self, image, img_id):
        key = (img_id, len(image["bytes"]) if image and image.get("bytes") else image and image.get("path"))
        if key != self._last_key:
            self._last_key = key
            self._last = decode_image(image, self.cfg.image_size, self.cfg.resample, self.cfg.max_image_pixels)
        return self._last

    def __call__(self, batch, indices):
        c = self.cfg
        out = {k: [] for k in ("image", "source", "question", "answer", "img_id", "row_id", "category",
                               "qtype", "drop_reason", *(f"messages_{m}" for m in PROMPT_MODES))}
        sources = batch.get(c.source_column) or [None] * len(indices)
        for i, row_id in enumerate(indices):
            question, answer = batch[c.question_column][i], batch[c.answer_column][i]
            img_id = batch[c.image_id_column][i]
            reason = _drop_reason_for_text(question, answer, img_id)
            image = None
            if reason is None:
                image, reason = self._image(batch[c.image_column][i], img_id)
            question = str(question or "").strip()
            answer = "" if reason else str(answer).strip()
            out["image"].append(image)
            out["source"].append(str(sources[i] or ""))
            out["question"].append(question)
            out["answer"].append(answer)
            out["img_id"].append(str(img_id or ""))
            out["row_id"].append(row_id)
            out["category"].append(question_category(question, self.prompts))
            out["qtype"].append(QUESTION_TYPE.get(question, "other"))
            out["drop_reason"].append(reason or "")
            for mode in PROMPT_MODES:
                out[f"messages_{mode}"].append(
                    [] if reason else build_messages(question, mode, self.prompts, answer=answer))
        return out


def check_columns(ds, cfg: PrepareConfig) -> None:
    needed = {"image_column": cfg.image_column, "question_column": cfg.question_column,
              "answer_column": cfg.answer_column, "image_id_column": cfg.image_id_column}
    for key, column in needed.items():
        if column not in ds.column_names:
            raise ConfigError(f"column '{column}' not found in the {cfg.source} data "
                              f"(columns: {', '.join(ds.column_names)}); set prepare.{key}")


def split_by_image(ds, test_size: float, seed: int):
    """Train/test by image id: every QA of an image lands on the same side (no leak)."""
    import datasets

    ids = sorted(set(ds["img_id"]))
    if len(ids) < 2:
        raise ConfigError(f"only {len(ids)} image(s) left after filtering; a train/test split needs 2")
    random.Random(seed).shuffle(ids)
    n_test = min(len(ids) - 1, max(1, round(test_size * len(ids))))
    test_ids = set(ids[:n_test])
    is_test = [i in test_ids for i in ds["img_id"]]
    test_idx = [i for i, t in enumerate(is_test) if t]
    train_idx = [i for i, t in enumerate(is_test) if not t]
    return datasets.DatasetDict({"train": ds.select(train_idx), "test": ds.select(test_idx)})


def _process(ds, cfg: PrepareConfig, prompts: PromptsConfig, desc: str):
    import datasets

    check_columns(ds, cfg)
    features = datasets.Features({
        "image": datasets.Image(), "source": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "img_id": datasets.Value("string"), "row_id": datasets.Value("int64"),
        "category": datasets.Value("string"), "qtype": datasets.Value("string"),
        "drop_reason": datasets.Value("string"),
        **{f"messages_{m}": datasets.List({
            "role": datasets.Value("string"),
            "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
        }) for m in PROMPT_MODES},
    })
    return ds.map(RowProcessor(cfg, prompts), batched=True, batch_size=64, with_indices=True,
                  remove_columns=ds.column_names, features=features,
                  # datasets 5 runs even num_proc=1 in a worker process; None stays in this one.
                  num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                  desc=desc, load_from_cache_file=False)


def prepare_dataset(cfg: PrepareConfig, prompts: PromptsConfig, out_dir: str | Path,
                    trust_remote_code: bool = False) -> dict:
    """Run the whole prepare step into ``out_dir``; return the statistics for metrics."""
    import datasets

    start = time.perf_counter()
    out_dir = Path(out_dir)
    raw = load_source(cfg, trust_remote_code)
    splits = dict(raw) if isinstance(raw, datasets.DatasetDict) else {"all": raw}
    rows_in = sum(len(d) for d in splits.values())
    if rows_in == 0:
        raise ConfigError(f"the {cfg.source} source at '{cfg.path}' has no rows")

    processed, drops, examples = {}, Counter(), {}
    for name, ds in splits.items():
        done = _process(ds, cfg, prompts, desc=f"prepare {name}")
        for reason, row_id in zip(done["drop_reason"], done["row_id"]):
            if reason:
                drops[reason] += 1
                examples.setdefault(reason, [])
                if len(examples[reason]) < cfg.log_first:
                    examples[reason].append(row_id)
        processed[name] = done.filter(lambda r: not r, input_columns="drop_reason",
                                      desc=f"drop bad rows ({name})").remove_columns("drop_reason")
    for reason, row_ids in sorted(examples.items()):
        log.warning("dropped %d row(s): %s (first row ids: %s)", drops[reason], reason, row_ids)

    if "train" in processed and "test" in processed:  # the source's own split, used as is
        result = datasets.DatasetDict({"train": processed["train"], "test": processed["test"]})
        split_from = "source"
    else:
        merged = datasets.concatenate_datasets(list(processed.values()))
        if len(merged) == 0:
            raise ConfigError(f"no rows left after filtering ({dict(drops)}); check prepare.* columns and the data")
        result = split_by_image(merged, cfg.test_size, cfg.seed)
        split_from = f"by img_id, seed {cfg.seed}, test_size {cfg.test_size}"

    # Write next to the target and rename: a killed run leaves only a *.tmp folder behind.
    tmp = fresh_staging(out_dir)
    result.save_to_disk(str(tmp))
    replace_dir(tmp, out_dir, "prepare")

    seconds = time.perf_counter() - start
    return {
        "source": cfg.source,
        "rows_in": rows_in,
        "rows_out": {k: len(v) for k, v in result.items()},
        "images": {k: len(set(v["img_id"])) for k, v in result.items()},
        "dropped": {reason: drops.get(reason, 0) for reason in DROP_REASONS},
        "dropped_total": sum(drops.values()),
        "split": split_from,
        "image_size": cfg.image_size,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows_in / seconds, 1),
    }
