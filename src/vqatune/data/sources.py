"""Where QA rows come from: the hub, a local imagefolder, parquet files, or the synthetic set.

Every source yields the same thing: a ``datasets.Dataset`` (or a DatasetDict with its own
``train``/``test`` split) whose image column holds undecoded bytes, so that the prepare step
decodes each image itself and can count, rather than crash on, a bad one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config import ConfigError, PrepareConfig

MISSING_FILE = "__vqatune_missing_file__"
ESCAPING_PATH = "__vqatune_escaping_path__"


def _undecoded(ds, image_column: str):
    import datasets

    if image_column not in ds.column_names:
        raise ConfigError(f"column '{image_column}' not found (columns: {', '.join(ds.column_names)}); "
                          f"set prepare.image_column")
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def load_hub(cfg: PrepareConfig, trust_remote_code: bool = False):
    import datasets
    from huggingface_hub import constants

    try:
        if constants.HF_HUB_OFFLINE:
            ds = _load_cached_hub_parquet(cfg)
        else:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ConfigError(f"prepare.path: could not load hub dataset '{cfg.path}' ({type(err).__name__}); "
                          f"check the id, your network, or use prepare.source: parquet with local files") from err
    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({k: _undecoded(v, cfg.image_column) for k, v in ds.items()})
    return _undecoded(ds, cfg.image_column)


def _load_cached_hub_parquet(cfg: PrepareConfig):
    """Offline (HF_HUB_OFFLINE=1): the dataset's parquet shards from the hub cache.

    ``datasets`` offline only finds datasets it prepared itself before; an air-gapped machine is
    more often given a copy of the hub cache (``~/.cache/huggingface/hub``). Kvasir-VQA is parquet
    on the hub (``data/<split>-NNNNN-of-NNNNN.parquet``), so its shards for ``prepare.split`` are
    read as the parquet source reads them.
    """
    import datasets
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(cfg.path, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"]))
    shards = sorted(str(p) for p in folder.glob("**/*.parquet")
                    if p.name.startswith(f"{cfg.split}-") or p.parent.name == cfg.split)
    if not shards:
        raise FileNotFoundError(f"no '{cfg.split}' parquet shards in the cached {cfg.path} ({folder})")
    return datasets.load_dataset("parquet", data_files=shards, split="train")


def load_parquet(cfg: PrepareConfig):
    """Kvasir-VQA's own format: parquet shards with the image bytes embedded in every row."""
    import datasets

    path = Path(cfg.path)
    files = sorted(str(p) for p in path.glob("**/*.parquet")) if path.is_dir() else \
        sorted(str(p) for p in Path().glob(cfg.path)) if any(c in cfg.path for c in "*?[") else \
        [str(path)] if path.exists() else []
    if not files:
        raise ConfigError(f"prepare.path: no parquet files at '{cfg.path}'; give a file, a folder or a glob")
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    return _undecoded(ds, cfg.image_column)


def _read_metadata(folder: Path) -> list[dict]:
    csv_path, jsonl_path = folder / "metadata.csv", folder / "metadata.jsonl"
    if csv_path.exists():
        with csv_path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    if jsonl_path.exists():
        with jsonl_path.open() as fh:
            return [json.loads(line) for line in fh if line.strip()]
    raise ConfigError(f"prepare.path: '{folder}' has no metadata.csv or metadata.jsonl "
                      f"(imagefolder layout: images + metadata with a file_name column)")


def load_imagefolder(cfg: PrepareConfig):
    """Images + metadata.csv/jsonl with ``file_name``, as datasets' imagefolder layout.

    Read by hand rather than with ``load_dataset("imagefolder")`` so that a missing file or a
    ``file_name`` that points outside the folder (``..``, an absolute path, a symlink leading out)
    becomes a counted drop, not a crash, and so
    that no path from a data file is ever opened outside the dataset folder.
    """
    import datasets

    folder = Path(cfg.path)
    if not folder.is_dir():
        raise ConfigError(f"prepare.path: '{folder}' is not a folder (prepare.source: imagefolder)")
    root = folder.resolve()
    rows = _read_metadata(folder)
    if not rows:
        raise ConfigError(f"prepare.path: metadata in '{folder}' has no rows")
    if "file_name" not in rows[0]:
        raise ConfigError(f"column 'file_name' not found in {folder}/metadata; the imagefolder layout needs it")
    images = []
    for row in rows:
        name = str(row["file_name"])
        target = (root / name).resolve()  # resolve(): a symlink is judged by where it points
        if Path(name).is_absolute() or not target.is_relative_to(root):
            images.append({"bytes": None, "path": ESCAPING_PATH})
        elif not target.is_file():
            images.append({"bytes": None, "path": MISSING_FILE})
        else:
            images.append({"bytes": target.read_bytes(), "path": None})
    columns = {k: [str(r.get(k, "")) if r.get(k) is not None else None for r in rows]
               for k in rows[0] if k != "file_name"}
    columns[cfg.image_column] = images
    features = datasets.Features({k: datasets.Value("string") for k in columns if k != cfg.image_column})
    features[cfg.image_column] = datasets.Image(decode=False)
    return datasets.Dataset.from_dict(columns, features=features)


def load_source(cfg: PrepareConfig, trust_remote_code: bool = False):
    if cfg.source == "synthetic":
        from .synthetic import make_synthetic_kvasir

        return _undecoded(make_synthetic_kvasir(cfg.synthetic_images, cfg.seed), "image")
    if cfg.source == "hub":
        return load_hub(cfg, trust_remote_code)
    if cfg.source == "parquet":
        return load_parquet(cfg)
    if cfg.source == "imagefolder":
        return load_imagefolder(cfg)
    raise ConfigError(f"prepare.source: unknown source '{cfg.source}'; use synthetic, hub, imagefolder or parquet")
