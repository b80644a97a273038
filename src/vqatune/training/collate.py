"""Batches for training: chat-templated prompt + image, and labels on the answer only.

Why a collator of ours and not TRL's ``DataCollatorForVisionLanguageModeling``:
- Its conversational path masks nothing but padding unless the chat template carries
  ``{% generation %}`` markers (Gemma 3's has none, and it needs transformers >= 5.18), so the
  system prompt, question and image tokens would be trained on, the guide's defect.
- Its prompt/completion path does mask the prompt, but needs the data reshaped into
  prompt/completion columns per prompt mode and always flushes the batch to the left (right
  padding only); here the padding side is a param and the prompt mode is a column choice.
What we share with it: prompt and answer are tokenized separately and concatenated. That is
exactly what the model sees at inference (the templated prompt, then the tokens it generates),
whereas tokenizing the whole text could merge tokens across the prompt/answer boundary.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional

import torch

from ..prompts import PROMPT_MODES
from ..vision.keys import image_key_tensor, image_prompt_texts

IGNORE_INDEX = -100
END_OF_TURN = "<end_of_turn>"
# train.prompt_mode: one of the prompt modes, or MIX: each row under a mode drawn for it.
MIX = "mix"
TRAIN_PROMPT_MODES = PROMPT_MODES + (MIX,)


def mixed_prompt_mode(row: dict, seed: int) -> str:
    """The prompt mode ``prompt_mode: mix`` trains ``row`` under: drawn per row from its
    ``row_id`` (prepare's stable row index; img_id + question where a row has none) and the seed,
    so the draw is the same in every epoch, batch order, resumed run and worker. About a third of
    the rows each: static and adaptive are then judged on prompts the adapter has seen."""
    key = row["row_id"] if "row_id" in row else f"{row['img_id']}|{row['question']}"
    return PROMPT_MODES[random.Random(f"{seed}:{key}").randrange(len(PROMPT_MODES))]


def prompt_text(processor, messages: list[dict]) -> str:
    """The templated prompt up to and including ``<start_of_turn>model\\n``."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def answer_text(processor, messages: list[dict]) -> str:
    """The assistant turn as the template renders it (trimmed), ending with ``<end_of_turn>``.

    Taken from the rendered conversation rather than the raw answer so that whatever the template
    does to an answer (trim) is what the model learns; the newline after the turn end is dropped:
    generation stops at ``<end_of_turn>``, so nothing after it is ever produced.
    """
    full = processor.apply_chat_template(messages, tokenize=False)
    prompt = prompt_text(processor, messages)
    if not full.startswith(prompt):
        raise ValueError("chat template renders the prompt differently with and without the answer")
    completion = full[len(prompt):]
    end = completion.rfind(END_OF_TURN)
    if end < 0:
        raise ValueError(f"rendered answer has no {END_OF_TURN}: {completion!r}")
    return completion[: end + len(END_OF_TURN)]


def prompt_mode_lengths(processor, rows, prompt_mode: str, mix_seed: int = 0) -> list[int]:
    """For ``train.group_by_prompt_mode`` (trainer.PromptModeSampler): each row's "length" is the
    mean text tokens (templated prompt + answer, as the collator trains it) of the rows of its
    prompt mode, one value per mode.

    Why not each row's own length: sorted by it, a batch held one question type (the answer's
    length names it), and the embedded run's held-out loss ended at 0.94 against 0.33 shuffled.
    One value per mode sorts the modes apart and, the sort being stable, leaves the shuffled order
    of the questions within a mode as it was."""
    collator = AnswerOnlyCollator(processor, prompt_mode, mix_seed=mix_seed)
    modes, texts = [], []
    for row in rows:
        mode = collator.row_mode(row)
        messages = row[f"messages_{mode}"]
        modes.append(mode)
        texts.append(prompt_text(processor, messages) + answer_text(processor, messages))
    tokens = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    totals: dict[str, list[int]] = {}
    for mode, n in zip(modes, tokens):
        totals.setdefault(mode, []).append(n)
    means = {mode: round(sum(ns) / len(ns)) for mode, ns in totals.items()}
    return [means[mode] for mode in modes]


@dataclasses.dataclass
class AnswerOnlyCollator:
    """Rows of ``data/processed`` -> model inputs with loss on answer + ``<end_of_turn>`` only.

    Masked with -100: the (system) prompt, question, every image token and padding. Left padding
    suits generation (new tokens append on the right); right padding is the trainer's default.
    Prompts are never truncated (Gemma 3 needs every image token); with ``max_length`` the answer
    tail is cut and ``truncated`` counts the rows it happened to.

    ``pad_to_multiple_of``: batches are padded to a width that is a multiple of it (8 by default).
    The compiled layers' graph assumes the width it first saw is 8-aligned (an Inductor guard); a
    batch of another width compiled it again, a 16 s stall at step 29 on two H100s
    (benchmarks/results/ddp_bench_h100x2_batch64_per_step.md). The extra columns are padding,
    masked out of attention and loss, so the loss is unchanged. Never padded past ``max_length``.

    ``image_keys``: no image is processed; ``pixel_values`` holds each row's ``image_key`` of its
    ``img_id`` (int64 [n, 2]) for an ``ImageFeatureCache`` prefilled under those keys, and the
    prompt's image tokens come from expanding its placeholder as the processor does. Token
    tensors are identical to the pixel path's; at 896 px this drops ~1.2 s of CPU per 32 rows
    and a 308 MB float tensor per batch (benchmarks/collate_bench.py).
    """

    _REMEDY = "collate with image_keys=False (train.precompute_image_features: false)"

    processor: Any
    prompt_mode: str = "none"
    padding_side: str = "right"
    max_length: Optional[int] = None
    image_keys: bool = False
    pad_to_multiple_of: int = 8
    truncated: int = 0
    # prompt_mode "mix": the seed of the per-row draw (mixed_prompt_mode).
    mix_seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_mode not in TRAIN_PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is not one of {', '.join(TRAIN_PROMPT_MODES)}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side {self.padding_side!r} is not 'left' or 'right'")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of {self.pad_to_multiple_of} is not a positive width")
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        if self.image_keys:
            image_prompt_texts(self.processor, [], remedy=self._REMEDY)  # refuse a processor now, not mid-run

    @property
    def messages_column(self) -> str:
        """The messages column of a single-mode collator (``mix`` reads one per row)."""
        if self.prompt_mode == MIX:
            raise AttributeError("prompt_mode mix reads messages_<mode> per row (row_messages)")
        return f"messages_{self.prompt_mode}"

    def row_mode(self, row: dict) -> str:
        return mixed_prompt_mode(row, self.mix_seed) if self.prompt_mode == MIX else self.prompt_mode

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        messages = [row[f"messages_{self.row_mode(row)}"] for row in rows]
        texts = [prompt_text(self.processor, m) for m in messages]
        # add_special_tokens=False: the template already starts with <bos>.
        if self.image_keys:
            if any("img_id" not in row for row in rows):
                raise ValueError(f"rows have no 'img_id' column (keys: {', '.join(rows[0])}); {self._REMEDY}")
            prompts = self.processor(text=image_prompt_texts(self.processor, texts, remedy=self._REMEDY),
                                     add_special_tokens=False)
            pixel_values = image_key_tensor([row["img_id"] for row in rows])
        else:
            prompts = self.processor(text=texts, images=[[row["image"]] for row in rows],
                                     add_special_tokens=False)
            pixel_values = torch.stack([torch.as_tensor(p) for p in prompts["pixel_values"]])
        answers = self.processor.tokenizer([answer_text(self.processor, m) for m in messages],
                                           add_special_tokens=False)["input_ids"]
        sequences, labels, token_types = [], [], []
        for prompt_ids, prompt_types, answer_ids in zip(prompts["input_ids"], prompts["token_type_ids"],
                                                        answers):
            if self.max_length is not None and len(prompt_ids) + len(answer_ids) > self.max_length:
                self.truncated += 1
                answer_ids = answer_ids[: max(self.max_length - len(prompt_ids), 0)]
            sequences.append(list(prompt_ids) + list(answer_ids))
            labels.append([IGNORE_INDEX] * len(prompt_ids) + list(answer_ids))
            token_types.append(list(prompt_types) + [0] * len(answer_ids))
        batch = {
            "input_ids": self._pad(sequences, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(s) for s in sequences], 0),
            "token_type_ids": self._pad(token_types, 0),
            "labels": self._pad(labels, IGNORE_INDEX),
            "pixel_values": pixel_values,
        }
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        longest = max(len(r) for r in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:  # never wider than max_length for padding's sake
            width = max(longest, min(width, self.max_length))
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out
