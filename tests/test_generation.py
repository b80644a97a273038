"""The shared generator: batching and sorting never change an answer; the prompt is cut by
position and only the stripped answer comes back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqatune.data.kvasir import QUESTIONS
from vqatune.generation.generate import generate_answers, prompt_texts
from vqatune.models.loading import load_base_model, load_processor
from vqatune.prompts import PROMPT_MODES, PromptsConfig, build_messages


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir, device="cpu"), load_processor(tiny_model_dir)


def _inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = PromptsConfig()
    # Mixed prompt modes give very different prompt lengths, hence real left padding.
    messages = [build_messages(QUESTIONS[(5 * i) % len(QUESTIONS)], PROMPT_MODES[i % 3], prompts)
                for i in range(n)]
    return messages, images


def test_batched_answers_equal_one_at_a_time(tiny):
    model, processor = tiny
    messages, images = _inputs(7)
    texts = prompt_texts(processor, messages)
    lengths = {len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) >= 3, "inputs must differ in length for padding to matter"

    batched = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6)
    single = [generate_answers(model, processor, [m], [im], batch_size=1, max_new_tokens=6)[0]
              for m, im in zip(messages, images)]
    assert batched == single
    assert any(batched), "the random model must say something for the comparison to mean anything"
    assert not model.training


def test_images_change_the_answers_so_a_mix_up_would_show(tiny):
    """The tiny model's projector is random (not Gemma's zero init), so each row's answer depends
    on its own image: a generator that paired rows with the wrong images, in a batch or across
    batches, would answer differently from one-at-a-time generation (the test above)."""
    model, processor = tiny
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    messages, images = _inputs(7)
    same_question = [messages[0]] * 7
    one_by_one = [generate_answers(model, processor, [m], [im], batch_size=1, max_new_tokens=6)[0]
                  for m, im in zip(same_question, images)]
    assert len(set(one_by_one)) > 1, "one question, seven images: the images must change the answer"
    batched = generate_answers(model, processor, same_question, images, batch_size=4, max_new_tokens=6)
    assert batched == one_by_one
    rolled = generate_answers(model, processor, same_question, images[1:] + images[:1], batch_size=4,
                              max_new_tokens=6)
    assert rolled != batched, "rows paired with their neighbours' images answer differently"


def test_prompt_has_one_bos(tiny):
    _, processor = tiny
    messages, images = _inputs(1)
    text = prompt_texts(processor, messages)[0]
    ids = processor(text=[text], images=[images], add_special_tokens=False)["input_ids"][0]
    assert list(ids).count(processor.tokenizer.bos_token_id) == 1
    assert text.endswith("<start_of_turn>model\n")


class _EchoModel(torch.nn.Module):
    """Answers `` yes `` then end-of-turn and padding to every prompt, whatever its length."""

    def __init__(self, answer_ids: list[int], pad_id: int, eos_id: int):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 2)
        self.answer = answer_ids + [eos_id, pad_id, pad_id]
        self.seen_padding_side = []

    def get_input_embeddings(self):
        return self.embed

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        # Left padding: every row's first column of a shorter prompt is padding, its last is not.
        self.seen_padding_side.append(bool((attention_mask[:, -1] == 1).all()))
        tail = torch.tensor(self.answer[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_answer_is_the_stripped_remainder_after_the_prompt(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    echo = _EchoModel(tok(" yes ", add_special_tokens=False)["input_ids"], tok.pad_token_id,
                      tok.convert_tokens_to_ids("<end_of_turn>"))
    messages, images = _inputs(5)
    answers = generate_answers(echo, processor, messages, images, batch_size=3, max_new_tokens=20)
    assert answers == ["yes"] * 5
    assert echo.seen_padding_side == [True, True]


def test_mismatched_inputs_are_refused(tiny):
    model, processor = tiny
    messages, images = _inputs(2)
    with pytest.raises(ValueError, match="2 message lists for 1 images"):
        generate_answers(model, processor, messages, images[:1])


def test_image_keys_give_the_same_answers_and_process_each_image_once(tiny):
    from vqatune.vision.pixel_cache import ImagePixelCache

    model, processor = tiny
    messages, distinct = _inputs(9)
    images = [distinct[i % 3] for i in range(9)]  # three images, three questions each
    keys = [f"img{i % 3}" for i in range(9)]
    plain = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6)
    cache, stats = ImagePixelCache(), {}
    keyed = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                             image_keys=keys, pixel_cache=cache, stats=stats)
    assert keyed == plain and any(plain)
    assert stats["images_processed"] == 3 and stats["images_reused"] == 6
    # A second configuration over the same images reuses every one of them; stats add up.
    again = generate_answers(model, processor, messages[::-1], images[::-1], batch_size=4, max_new_tokens=6,
                             image_keys=keys[::-1], pixel_cache=cache, stats=stats)
    assert again == plain[::-1]
    assert stats["images_processed"] == 3 and stats["images_reused"] == 15
    assert stats["rows"] == 18 and stats["batches"] == 6
    for key in ("encode_wait_s", "transfer_s", "generate_s", "decode_s", "total_s"):
        assert stats[key] >= 0
    assert stats["generate_s"] > 0 and stats["total_s"] >= stats["generate_s"] + stats["encode_wait_s"]


def test_a_feature_cache_answers_keyed_rows_by_name_without_their_pixels(tiny):
    """The evaluate stage's path: with an image-feature cache on the model, a keyed batch carries
    each row's image name (int64 keys) and the pixels of unseen images only. The answers equal
    those from pixels; over two configurations the tower and the processor see each image once."""
    from vqatune.vision.feature_cache import _multimodal_core, install_image_feature_cache
    from vqatune.vision.pixel_cache import ImagePixelCache

    model, processor = tiny
    messages, distinct = _inputs(9)
    images = [distinct[i % 3] for i in range(9)]
    keys = [f"img{i % 3}" for i in range(9)]
    plain = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6)
    assert len(set(plain)) > 1
    seen = []
    hook = _multimodal_core(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("pixel_values")), with_kwargs=True)
    cache = install_image_feature_cache(model, training=False)
    try:
        pixels, stats = ImagePixelCache(), {}
        keyed = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                                 image_keys=keys, pixel_cache=pixels, stats=stats)
        again = generate_answers(model, processor, messages[::-1], images[::-1], batch_size=4, max_new_tokens=6,
                                 image_keys=keys[::-1], pixel_cache=pixels, stats=stats)
    finally:
        cache.uninstall()
        hook.remove()
    assert keyed == plain and again == plain[::-1]
    assert cache.misses == 3, "the vision tower runs once per distinct image"
    assert stats["images_processed"] == 3 and stats["images_reused"] == 15 and stats["image_features_s"] > 0
    prefills = [p for p in seen if p is not None]
    assert len(prefills) == 6, "one forward with images per batch"
    assert all(p.dtype == torch.int64 and p.shape[1] == 2 for p in prefills), "rows name their images"
    assert len(pixels) == 0, "no pixels are kept where the features are"


def test_static_cache_gives_the_dynamic_answers(tiny):
    model, processor = tiny
    messages, images = _inputs(5)
    caches = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: caches.append(type(kwargs.get("past_key_values")).__name__), with_kwargs=True)
    try:
        static = generate_answers(model, processor, messages, images, batch_size=3, max_new_tokens=6,
                                  cache_implementation="static")
    finally:
        hook.remove()
    assert set(caches) == {"StaticCache"}, "the static cache must really be used"
    assert static == generate_answers(model, processor, messages, images, batch_size=3, max_new_tokens=6)
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        generate_answers(model, processor, messages, images, cache_implementation="hybrid")


def _short_inputs(n: int):
    """Prompts in modes none and static only: the tiny model's sliding window (128 tokens) must
    cover prompt + answer for the static-graph loop (adaptive prompts are longer)."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    messages = [build_messages(QUESTIONS[(5 * i) % len(QUESTIONS)], PROMPT_MODES[i % 2], PromptsConfig())
                for i in range(n)]
    return messages, images


def test_static_graph_loop_gives_generates_tokens(tiny):
    """generation.graphs.greedy_static (run eagerly on CPU: the same step the GPU captures as a
    CUDA graph) gives generate's greedy tokens, row by row, on a left-padded batch."""
    from vqatune.generation.generate import _left_padding, stop_token_ids
    from vqatune.generation.graphs import greedy_static

    model, processor = tiny
    messages, images = _short_inputs(5)
    texts = prompt_texts(processor, messages)
    with _left_padding(processor.tokenizer):
        inputs = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                           add_special_tokens=False)
    assert (inputs["attention_mask"] == 0).any(), "rows of different lengths: real left padding"
    stop = stop_token_ids(model, processor.tokenizer)
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    stats = {}
    got = greedy_static(model, inputs, max_new_tokens=8, stop_ids=stop, pad_token_id=processor.tokenizer.pad_token_id,
                        use_graph=False, stats=stats)
    for r, g in zip(ref.tolist(), got.tolist()):
        cut = next((i for i, t in enumerate(r) if t in stop), len(r))
        assert g[:cut + 1] == r[:cut + 1]
    assert stats["decode_steps"] == got.shape[1] <= 8


def test_static_graphs_answers_equal_dynamic_and_buckets_change_nothing(tiny):
    from vqatune.generation.generate import length_batches

    model, processor = tiny
    messages, images = _short_inputs(6)
    dynamic = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6)
    stats = {}
    graphs = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                              cache_implementation="static_graphs", stats=stats)
    assert graphs == dynamic and "graph_fallback" not in stats and stats["decode_steps"] > 0
    bucketed = {}
    assert generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                            bucket_tokens=0, stats=bucketed) == dynamic
    assert bucketed["batches"] > 2 and bucketed["padding_tokens"] == 0  # one length per batch
    assert length_batches([0, 1, 2, 3], [5, 5, 9, 30], 3, 4) == [[0, 1, 2], [3]]
    assert length_batches([0, 1, 2, 3], [5, 5, 9, 30], 3) == [[0, 1, 2], [3]]
    assert length_batches([0, 1, 2, 3], [5, 5, 9, 30], 4, 3) == [[0, 1], [2], [3]]
    # Too long for the sliding window: generate answers instead, and says why.
    long_messages, long_images = _inputs(3)
    fallback = {}
    assert generate_answers(model, processor, long_messages, long_images, batch_size=3, max_new_tokens=6,
                            cache_implementation="static_graphs", stats=fallback) == \
        generate_answers(model, processor, long_messages, long_images, batch_size=3, max_new_tokens=6)
    assert "sliding window" in fallback.get("graph_fallback", "sliding window")


@pytest.mark.parametrize("grouped", [False, True], ids=["sdpa", "grouped_attention"])
def test_rows_sharing_an_image_prefix_answer_as_one_forward_would(tiny, grouped):
    """share_image_prefix: each (image, prompt-before-the-image) group runs its prefix once and
    every row its own question over those keys and values. The answers equal generate's on the
    whole prompts, rows of different images and prompt modes mixed in one batch; also with
    grouped attention, as the MedGemma profile runs it (the suffix's per-row 4D mask included)."""
    from vqatune.generation.attention import use_grouped_attention
    from vqatune.vision.feature_cache import install_image_feature_cache

    model, processor = tiny
    messages, distinct = _short_inputs(8)   # modes none and static alternate: two prefixes an image
    images = [distinct[i // 2 % 2] for i in range(8)]   # rows 0-1, 4-5: image 0; 2-3, 6-7: image 1
    keys = [f"img{i // 2 % 2}" for i in range(8)]
    reference = generate_answers(model, processor, messages, images, batch_size=8, max_new_tokens=4)
    assert len(set(reference)) > 1
    cache = install_image_feature_cache(model, training=False)
    try:
        if grouped:
            assert use_grouped_attention(model)
        stats, plain = {}, {}
        shared = generate_answers(model, processor, messages, images, batch_size=8, max_new_tokens=4,
                                  image_keys=keys, cache_implementation="static_graphs", stats=stats,
                                  share_image_prefix=True)
        unshared = generate_answers(model, processor, messages, images, batch_size=8, max_new_tokens=4,
                                    image_keys=keys, cache_implementation="static_graphs", stats=plain)
    finally:
        cache.uninstall()
        model.set_attn_implementation("sdpa")
    assert "graph_fallback" not in stats
    # every (image, prompt mode) pair is a group; 4 new tokens keep the longest prefix + the
    # longest suffix + the answer inside the tiny model's sliding window
    groups = {(k, i % 2) for i, k in enumerate(keys)}
    assert len(groups) == 4
    assert stats["shared_prefix_groups"] == len(groups) and stats["shared_prefix_rows"] == 8
    assert "shared_prefix_groups" not in plain
    assert shared == unshared == reference


def test_a_batch_stops_once_every_row_has_ended(tiny):
    """generate (dynamic) and the static-graph loop stop decoding when all rows produced a stop
    token, not after max_new_tokens."""
    import copy

    model, processor = tiny
    messages, images = _short_inputs(4)
    first = {}
    generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=1, stats=first)
    texts = prompt_texts(processor, messages)
    from vqatune.generation.generate import _left_padding

    with _left_padding(processor.tokenizer):
        inputs = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                           add_special_tokens=False)
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1].tolist()
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.eos_token_id = sorted(set(tokens))  # every row ends at its first token
        for cache, most in (("dynamic", 1), ("static_graphs", 4)):
            stats = {}
            answers = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=20,
                                       cache_implementation=cache, stats=stats)
            assert answers == [""] * 4 and stats["decode_steps"] <= most, (cache, stats)
    finally:
        model.generation_config = saved


def test_grouped_attention_is_sdpa_without_the_kv_copies(tiny):
    """evaluate.grouped_attention: the query heads that share a KV head attend as one stacked
    call. On padded rows, a per-head mask and a one-token decoding step it gives sdpa's output
    (the same arithmetic per query row), and the static-graph loop's answers do not change."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vqatune.generation.attention import NAME, grouped_sdpa_attention, use_grouped_attention

    class Module:
        num_key_value_groups = 2
        is_causal = True

    torch.manual_seed(0)
    b, kv, groups, d = 3, 2, 2, 16
    for q_len, k_len, heads_in_mask in ((7, 7, 1), (1, 12, 1), (5, 9, kv * groups)):
        query = torch.randn(b, kv * groups, q_len, d)
        key, value = torch.randn(b, kv, k_len, d), torch.randn(b, kv, k_len, d)
        mask = torch.rand(b, heads_in_mask, q_len, k_len) > 0.3
        mask[..., 0] = True  # every row attends somewhere
        want, _ = sdpa_attention_forward(Module(), query, key, value, mask, scaling=0.25)
        got, _ = grouped_sdpa_attention(Module(), query, key, value, mask, scaling=0.25)
        assert got.shape == want.shape == (b, q_len, kv * groups, d)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # A mix-up of heads would not pass: swap two query heads of one group and it differs.
        swapped = query[:, [1, 0, 2, 3]]
        wrong, _ = grouped_sdpa_attention(Module(), swapped, key, value, mask, scaling=0.25)
        assert not torch.allclose(wrong, want, atol=1e-3)

    model, processor = tiny
    messages, images = _short_inputs(6)
    before = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                              cache_implementation="static_graphs")
    try:
        assert use_grouped_attention(model) and model.config._attn_implementation == NAME
        stats = {}
        after = generate_answers(model, processor, messages, images, batch_size=4, max_new_tokens=6,
                                 cache_implementation="static_graphs", stats=stats)
    finally:
        model.set_attn_implementation("sdpa")
    assert after == before and "graph_fallback" not in stats
