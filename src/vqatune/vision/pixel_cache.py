"""``pixel_values`` made once per image for every row and configuration that shows it."""
from __future__ import annotations

import torch


class ImagePixelCache:
    """``pixel_values`` per image key, made once by the processor and reused by every row and every
    configuration that shows that image.

    Kvasir images carry ~9 questions each and evaluation asks them in six configurations, so an
    image comes back ~54 times; at 896 px its resize/normalise costs ~20 ms of CPU, more than the
    H100 spends answering it. Pass one cache to several ``generate_answers`` calls (with the rows'
    ``image_keys``) to pay that once per image. Entries are kept per (key, dtype) in the dtype the
    model takes them in: bf16 halves the memory (~4.8 MB per 896 px image, the Kvasir test split's
    ~1,300 images ~6 GB of host memory) and casting at store time gives the very values the cast
    before the forward would (round-to-nearest either way).

    The caller vouches that equal keys mean equal images (e.g. the dataset's ``img_id``).
    """

    def __init__(self):
        self.pixels: dict[tuple, torch.Tensor] = {}
        self.computed = 0   # images that went through the processor
        self.reused = 0     # rows that found their image already made (or being made)

    def __len__(self) -> int:
        return len(self.pixels)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pixels.values())
