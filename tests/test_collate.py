"""Labels: loss on the answer and its <end_of_turn> only, whatever the prompt mode and padding."""
from __future__ import annotations

import pytest
import torch

from vqatune.training.collate import IGNORE_INDEX, AnswerOnlyCollator, answer_text
from vqatune.models.loading import load_processor
from vqatune.prompts import PROMPT_MODES


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def rows(processed_dir):
    from datasets import load_from_disk

    train = load_from_disk(str(processed_dir))["train"]
    # Short and long answers, multi-item ones ("a; b") included, so padding really varies.
    by_length = sorted(range(len(train)), key=lambda i: len(train[i]["answer"]))
    picks = by_length[:2] + by_length[len(by_length) // 2: len(by_length) // 2 + 1] + by_length[-3:]
    return [train[i] for i in picks]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_unmasked_labels_decode_to_exactly_answer_and_turn_end(processor, rows, mode, padding_side):
    batch = AnswerOnlyCollator(processor, mode, padding_side)(rows)
    tok = processor.tokenizer
    assert len({len(r["answer"]) for r in rows}) > 1
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX]
        assert tok.decode(kept, skip_special_tokens=False) == row["answer"].strip() + "<end_of_turn>"
        # The learned tokens are the input tokens at the same places (labels are not shifted here).
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(batch["input_ids"][i, positions], kept)
        # One contiguous span: the answer ends the real sequence.
        assert positions.tolist() == list(range(positions[0].item(), positions[-1].item() + 1))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prompt_image_and_padding_are_masked(processor, rows, padding_side):
    batch = AnswerOnlyCollator(processor, "adaptive", padding_side)(rows)
    ids, labels, attn, types = (batch[k] for k in ("input_ids", "labels", "attention_mask", "token_type_ids"))
    image_ids = {processor.tokenizer.convert_tokens_to_ids(t)
                 for t in ("<start_of_image>", "<image_soft_token>", "<end_of_image>")}
    assert not any(int(t) in image_ids for t in labels[labels != IGNORE_INDEX])
    assert (labels[attn == 0] == IGNORE_INDEX).all()
    assert (ids[attn == 0] == processor.tokenizer.pad_token_id).all()
    # token_type_ids mark exactly the image soft tokens (Gemma 3's bidirectional image attention).
    soft = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert torch.equal(types == 1, ids == soft)
    assert ((types == 1).sum(dim=1) == 16).all()
    # Padding sits on the asked side.
    lengths = attn.sum(dim=1)
    shortest = int(lengths.argmin())
    pad_at = 0 if padding_side == "left" else -1
    assert attn[shortest, pad_at] == 0
    # The width is the longest row rounded up to a multiple of 8 (the compiled layers' alignment).
    assert ids.shape[1] % 8 == 0 and ids.shape[1] - 8 < lengths.max() <= ids.shape[1]
    assert batch["pixel_values"].shape == (len(rows), 3, 64, 64)


def test_pad_to_multiple_of_one_pads_to_the_longest_row_and_keeps_the_loss_targets(processor, rows):
    aligned = AnswerOnlyCollator(processor, "none")(rows)
    tight = AnswerOnlyCollator(processor, "none", pad_to_multiple_of=1)(rows)
    width = int(tight["attention_mask"].sum(dim=1).max())
    assert tight["input_ids"].shape[1] == width and aligned["input_ids"].shape[1] == -(-width // 8) * 8
    # Right padding: the aligned batch is the tight one plus padding columns.
    for key, pad in (("input_ids", processor.tokenizer.pad_token_id), ("labels", IGNORE_INDEX),
                     ("attention_mask", 0), ("token_type_ids", 0)):
        assert torch.equal(aligned[key][:, :width], tight[key])
        assert (aligned[key][:, width:] == pad).all()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        AnswerOnlyCollator(processor, "none", pad_to_multiple_of=0)


def test_answer_text_is_the_rendered_assistant_turn(processor, rows):
    row = rows[0]
    messages = row["messages_static"]
    messages[-1]["content"][0]["text"] = "  " + row["answer"] + " \n"  # the template trims
    assert answer_text(processor, messages) == row["answer"].strip() + "<end_of_turn>"


def test_max_length_cuts_the_answer_never_the_prompt(processor, rows):
    full = AnswerOnlyCollator(processor, "none")(rows[-1:])
    prompt_len = int(((full["labels"][0] == IGNORE_INDEX) & (full["attention_mask"][0] == 1)).sum())
    collator = AnswerOnlyCollator(processor, "none", max_length=prompt_len + 1)
    batch = collator(rows[-1:])
    assert batch["input_ids"].shape[1] == prompt_len + 1
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 1
    assert collator.truncated == 1


def test_bad_mode_and_side_are_refused(processor):
    with pytest.raises(ValueError, match="prompt_mode"):
        AnswerOnlyCollator(processor, "verbose")
    with pytest.raises(ValueError, match="padding_side"):
        AnswerOnlyCollator(processor, "none", "middle")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_image_keys_give_the_pixel_paths_tokens_and_each_rows_key(processor, rows, mode, padding_side):
    from vqatune.vision.keys import image_key

    pixels = AnswerOnlyCollator(processor, mode, padding_side, max_length=60)
    keyed = AnswerOnlyCollator(processor, mode, padding_side, max_length=60, image_keys=True)
    ref, got = pixels(rows), keyed(rows)
    assert set(got) == set(ref)
    for name in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name
    assert (ref["token_type_ids"] == 1).any()  # the image tokens really are in both
    assert keyed.truncated == pixels.truncated > 0
    assert got["pixel_values"].dtype == torch.int64 and got["pixel_values"].shape == (len(rows), 2)
    assert got["pixel_values"].tolist() == [list(image_key(row["img_id"])) for row in rows]


def test_image_keys_are_refused_where_the_placeholder_cannot_be_expanded(processor, rows):
    import copy

    plain = copy.copy(processor)
    del plain.full_image_sequence
    with pytest.raises(ValueError, match="full_image_sequence.*image_keys=False"):
        AnswerOnlyCollator(plain, "none", image_keys=True)
    two_images = copy.deepcopy(rows[0])
    user = next(m for m in two_images["messages_none"] if m["role"] == "user")
    user["content"].insert(0, {"type": "image", "text": None})
    with pytest.raises(ValueError, match="holds 2 image placeholders.*image_keys=False"):
        AnswerOnlyCollator(processor, "none", image_keys=True)([rows[1], two_images])
