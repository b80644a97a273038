"""``evaluate.batch_size: auto``: the generation batch from the GPU memory there is.

A fixed batch that suits an 80 GB card (384 rows, ~48 GiB on MedGemma-4B) runs a 16 GB card out of
memory, and one that suits 16 GB leaves an H100 mostly idle. So ``auto`` measures instead of
guessing: it generates once for a few of the longest prompts (adapter on: the heaviest case),
takes the peak memory that added per row, and fills the budget (``evaluate.max_memory_gib``, or the
card's memory) with as many rows as fit, keeping a tenth in reserve for longer answers and the
allocator's fragmentation. Memory per row is close to linear in rows (KV cache, activations and
logits all are); the probe's prompts are the longest, so the estimate errs on the safe side.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Union

log = logging.getLogger(__name__)

CPU_BATCH = 16        # auto on a CPU: memory is not the limit there, and larger batches pad more
PROBE_ROWS = 8
MAX_BATCH = 512
RESERVE = 0.10        # share of the budget never planned for


@dataclasses.dataclass
class CudaMemory:
    """The few numbers the choice needs, from torch's CUDA allocator (a test passes a fake)."""

    device: object

    def allocated(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def total(self) -> int:
        import torch

        return torch.cuda.mem_get_info(self.device)[1]


def resolve_batch_size(requested: Union[int, str], device, probe: Callable[[int], None], *,
                       max_memory_gib: Optional[float] = None, memory=None,
                       probe_rows: int = PROBE_ROWS) -> tuple[int, dict]:
    """(rows per generate call, how it was chosen). ``device``: the model's (a torch.device or a
    name); ``probe(n)`` generates for ``n`` rows."""
    device_type = getattr(device, "type", str(device).split(":")[0])
    if requested != "auto":
        return int(requested), {"batch_size_from": "evaluate.batch_size"}
    if device_type != "cuda":
        return CPU_BATCH, {"batch_size_from": f"auto: {CPU_BATCH} on a CPU"}
    memory = memory or CudaMemory(device)
    budget = int(max_memory_gib * 2**30) if max_memory_gib else memory.total()
    held = memory.allocated()  # weights, caches, BERTScore's model: there for the whole run
    memory.reset_peak()
    probe(probe_rows)
    per_row = max((memory.peak() - held) / probe_rows, 1.0)
    rows = int(((1 - RESERVE) * budget - held) // per_row)
    if rows < 1:
        raise RuntimeError(f"the model alone holds {held / 2**30:.1f} GiB of a {budget / 2**30:.1f} GiB "
                           "budget; set evaluate.quantization: 4bit or raise evaluate.max_memory_gib")
    batch = min(rows, MAX_BATCH)
    log.info("evaluate.batch_size auto: %d rows (%.3f GiB per row measured, %.1f GiB held, budget %.1f GiB)",
             batch, per_row / 2**30, held / 2**30, budget / 2**30)
    memory.reset_peak()
    return batch, {"batch_size_from": "auto", "gib_per_row": round(per_row / 2**30, 4),
                   "budget_gib": round(budget / 2**30, 2)}
