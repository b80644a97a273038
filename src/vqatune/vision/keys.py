"""Image keys: a 128-bit name for each image (from the dataset's ``img_id``), so a batch can say
which images it shows without carrying or decoding them, and the prompt text of a keyed row.
"""
from __future__ import annotations

import hashlib

import torch


def image_key(img_id) -> tuple[int, int]:
    """128-bit key of an image named by the dataset's ``img_id`` (one image per id), as two int64.

    A hash of the name, not of the pixels: a batch can then name its images without decoding
    them, and the key is the same in every DataLoader worker and every process (Python's
    ``hash`` of a string is salted per process).
    """
    digest = hashlib.blake2b(str(img_id).encode("utf-8"), digest_size=16).digest()
    return (int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True))


def image_key_tensor(img_ids) -> torch.Tensor:
    """[n, 2] int64 keys of ``img_ids``: what a keyed batch carries in place of ``pixel_values``."""
    return torch.tensor([image_key(i) for i in img_ids], dtype=torch.int64).reshape(-1, 2)


def image_prompt_texts(processor, texts: list[str], *, remedy: str) -> list[str]:
    """``texts`` with their one image placeholder expanded exactly as Gemma3Processor expands it.

    Gemma3Processor replaces the ``<start_of_image>`` of a prompt by ``full_image_sequence``
    (which starts with "\n\n<start_of_image>", then the image tokens) and tokenizes; called on
    the expanded text alone it finds no image to expand, tokenizes the same string the same way
    and still adds ``token_type_ids``. So a prompt's tokens need no image at all. ``remedy``:
    what the caller should do instead when this cannot apply (ends the error message).
    """
    placeholder = getattr(processor, "boi_token", None)
    sequence = getattr(processor, "full_image_sequence", None)
    if placeholder is None or sequence is None:
        raise ValueError(f"image keys need a Gemma 3 processor (boi_token, full_image_sequence); "
                         f"got {type(processor).__name__}: {remedy}")
    expanded = []
    for i, text in enumerate(texts):
        if text.count(placeholder) != 1:
            raise ValueError(f"prompt {i} holds {text.count(placeholder)} image placeholders ({placeholder}); "
                             f"image keys need exactly one per prompt: {remedy}")
        expanded.append(text.replace(placeholder, sequence))
    return expanded


def is_image_keys(tensor: torch.Tensor) -> bool:
    """Whether a ``pixel_values`` tensor holds ``image_key`` rows instead of pixels."""
    return tensor.dtype == torch.int64 and tensor.dim() == 2 and tensor.shape[1] == 2
