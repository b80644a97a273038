"""evaluate.batch_size: auto — the batch from a measured probe and the memory budget."""
from __future__ import annotations

import pytest

from vqatune.config import ConfigError, section
from vqatune.evaluation.batching import CPU_BATCH, MAX_BATCH, resolve_batch_size
from vqatune.evaluation.config import EvaluateConfig

GIB = 2**30


class FakeCard:
    """A GPU allocator: `held` bytes resident, each probed row adds `per_row` at the peak."""

    def __init__(self, total_gib: float, held_gib: float, per_row_gib: float):
        self.total_bytes, self.held = int(total_gib * GIB), int(held_gib * GIB)
        self.per_row, self.current_peak, self.probed = per_row_gib * GIB, 0, []

    def allocated(self):
        return self.held

    def reset_peak(self):
        self.current_peak = self.held

    def peak(self):
        return self.current_peak

    def total(self):
        return self.total_bytes

    def probe(self, rows: int):
        self.probed.append(rows)
        self.current_peak = self.held + int(rows * self.per_row)


def test_auto_fills_the_budget_with_what_the_probe_measured():
    card = FakeCard(total_gib=80, held_gib=9, per_row_gib=0.05)
    batch, info = resolve_batch_size("auto", "cuda", card.probe, max_memory_gib=15, memory=card)
    # 90% of 15 GiB, less the 9 GiB held, at 0.05 GiB a row: (13.5 - 9) / 0.05 = 90 rows.
    assert batch == 90 and card.probed == [8]
    assert info["budget_gib"] == 15 and info["gib_per_row"] == pytest.approx(0.05)
    whole_card, _ = resolve_batch_size("auto", "cuda", card.probe, memory=card)
    assert whole_card == MAX_BATCH  # (72 - 9) / 0.05 = 1260 rows, capped


def test_auto_says_what_to_do_when_the_model_alone_fills_the_budget():
    card = FakeCard(total_gib=16, held_gib=14.5, per_row_gib=0.1)
    with pytest.raises(RuntimeError, match="evaluate.quantization: 4bit or raise evaluate.max_memory_gib"):
        resolve_batch_size("auto", "cuda", card.probe, max_memory_gib=15, memory=card)


def test_a_number_is_kept_and_auto_on_a_cpu_needs_no_probe():
    def never(rows):
        raise AssertionError("no probe on a CPU or for a fixed batch")

    assert resolve_batch_size(48, "cuda", never)[0] == 48
    assert resolve_batch_size("auto", "cpu", never)[0] == CPU_BATCH


@pytest.mark.parametrize("raw, key", [({"batch_size": "big"}, "evaluate.batch_size"),
                                      ({"batch_size": 0}, "evaluate.batch_size"),
                                      ({"max_memory_gib": -1}, "evaluate.max_memory_gib")])
def test_the_config_names_a_bad_value(raw, key):
    with pytest.raises(ConfigError, match=key):
        section({"evaluate": raw}, "evaluate", EvaluateConfig)
    assert section({"evaluate": {"batch_size": "auto", "max_memory_gib": 15}}, "evaluate",
                   EvaluateConfig).batch_size == "auto"
