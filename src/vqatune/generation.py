"""Batched greedy answers from a Gemma 3 / MedGemma model: the one generator evaluation, the
``vqatune ask`` command and the GPU benchmark all call, so their answers are the same answers.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

from tqdm.auto import tqdm


@contextlib.contextmanager
def _left_padding(tokenizer):
    # Left padding: generate appends on the right, so every row's last prompt token must sit in
    # the last column, and the prompt ends at the same position for the whole batch.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _input_device(model):
    # A PeftModel or a model placed with device_map: the embedding layer's device is where
    # inputs go.
    return model.get_input_embeddings().weight.device


def _floating_dtype(model):
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def stop_token_ids(model, tokenizer) -> set[int]:
    """Ids that end the model's turn: the generation config's eos ids, ``<eos>``, ``<end_of_turn>``."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return {i for i in ids if i is not None}


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    for pos, token in enumerate(ids):
        if token in stop:
            return ids[:pos]
    return ids


def prompt_texts(processor, messages_list: Sequence[list[dict]]) -> list[str]:
    """Chat-templated prompts ending with the model's turn, as the model is asked."""
    return [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in messages_list]


def generate_answers(model, processor, messages_list: Sequence[list[dict]], images: Sequence[Any],
                     *, batch_size: int = 8, max_new_tokens: int = 25,
                     progress: bool = False) -> list[str]:
    """Greedy answers, one per (messages, image), in input order.

    ``messages_list`` holds chat messages without the assistant turn (``prompts.build_messages``);
    each user turn carries one image part, filled with the matching entry of ``images``.
    Prompts are sorted by length so a batch holds similar lengths (little padding), padded on
    the left, and each answer is the decoded tokens after its prompt, stripped.
    """
    import torch

    if len(messages_list) != len(images):
        raise ValueError(f"{len(messages_list)} message lists for {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = prompt_texts(processor, messages_list)
    tokenizer = processor.tokenizer
    # Text-token length is the sort key: every prompt carries the same number of image tokens.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers: list[str] = [""] * len(texts)
    device, dtype = _input_device(model), _floating_dtype(model)
    stop = stop_token_ids(model, tokenizer)

    from .speed import BatchEncoder

    was_training = model.training
    model.eval()
    encoder = None
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    try:
        with _left_padding(tokenizer):
            # The next batch is tokenized and its images processed on CPU threads while the GPU
            # generates this one (vqatune.speed.BatchEncoder); the inputs are unchanged.
            encoder = BatchEncoder(processor, texts, images, threads=min(batch_size, len(texts)))
        pending = encoder.submit(batches[0]) if batches else None
        for n, rows in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
            inputs = pending.result()
            if n + 1 < len(batches):
                pending = encoder.submit(batches[n + 1])
            inputs = {k: (v.to(device, dtype) if k == "pixel_values" and dtype is not None
                          else v.to(device)) for k, v in inputs.items()}
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            # Left padding puts every prompt's end at the same column: the answer starts there.
            new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
            # The answer ends at the turn's end: decoding alone would keep <end_of_turn> on a
            # tokenizer that does not flag it special (the tiny one), and rows that finished
            # early continue with padding.
            decoded = tokenizer.batch_decode([_until_stop(ids, stop) for ids in new_tokens],
                                             skip_special_tokens=True)
            for i, text in zip(rows, decoded):
                answers[i] = text.strip()
    finally:
        if encoder is not None:
            encoder.close()
        model.train(was_training)
    return answers
