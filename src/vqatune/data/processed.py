"""Reading back what the prepare stage wrote (``data/processed``), for training, search and
evaluation: a damaged folder is one line naming it, not a traceback from arrow."""
from __future__ import annotations

from pathlib import Path

from ..config import InputError, restore_hint


def load_prepared(data_dir: str | Path):
    """The prepared DatasetDict; InputError, one line naming the folder, when it is missing or
    damaged (a truncated or garbage arrow file, a broken JSON index)."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(data_dir))
    except (OSError, ValueError) as err:  # arrow's read errors are OSError or ArrowInvalid (a ValueError)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(f"{data_dir} cannot be read as prepared data ({reason}); "
                         f"{restore_hint(data_dir)}") from None
