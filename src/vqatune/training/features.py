"""Image features computed once, before the first step: every distinct image of the train and
eval rows goes through the vision tower into the ``ImageFeatureCache``, stored under its
``img_id``'s key, so the steps' batches carry keys, not pixels."""
from __future__ import annotations

import dataclasses
import logging
import time

from . import distributed

log = logging.getLogger(__name__)


class _KeyedPixels:
    """DataLoader collate: ``(image keys, pixel_values)`` of rows, the pixels exactly as a
    training collator without image keys makes them, so the features stored under the keys are
    the ones those batches would get."""

    def __init__(self, collator):
        self.collator = dataclasses.replace(collator, image_keys=False)

    def __call__(self, rows):
        from ..vision.keys import image_key_tensor

        return image_key_tensor([row["img_id"] for row in rows]), self.collator(rows)["pixel_values"]


# Share of the GPU's free memory (after the model is loaded) that precomputed image features may
# take there; the rest is left to the steps' activations.
FEATURE_TABLE_SHARE = 0.25


def precompute_image_features(trainer, cache, collator, datasets, batch_size: int, num_workers: int) -> int:
    """Fill ``cache`` with the features of every distinct image of ``datasets`` (one row per
    ``img_id``) under the img_id's ``image_key``, under the trainer's autocast, before the first
    step; ``collator`` (the training one, with ``image_keys``) then finds them. Returns how many
    were new."""
    import torch

    parts = []
    for ds in datasets:
        first: dict = {}
        for i, img_id in enumerate(ds["img_id"]):
            first.setdefault(img_id, i)
        parts.append(ds.select(sorted(first.values())))
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(parts), batch_size=batch_size,
                                         collate_fn=_KeyedPixels(collator), num_workers=num_workers)
    device = trainer.model.get_input_embeddings().weight.device
    start = time.perf_counter()
    with torch.no_grad(), trainer.accelerator.autocast():
        new = cache.prefill(loader, device, progress=distributed.is_main_process())
    # On the training device when they fit in a share of its free memory (the steps then look
    # them up there, ImageFeatureCache.move_to); in host memory otherwise (Kvasir-VQA's 6,500
    # images at 896 px: ~17 GB in fp32).
    budget = (int(torch.cuda.mem_get_info(device)[0] * FEATURE_TABLE_SHARE) if device.type == "cuda"
              else cache.memory_bytes())
    where = str(device) if cache.move_to(device, budget) else "host memory"
    log.info("image features precomputed: %d new images in %.1f s (%.2f GiB in %s)",
             new, time.perf_counter() - start, cache.memory_bytes() / 2**30, where)
    return new
