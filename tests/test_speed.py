"""The GPU levers compute the same function as the plain path (checked on the tiny model, CPU)."""
from __future__ import annotations

import collections
import contextlib
import io
import random

import pytest
import torch

from vqatune.cpu_numerics import use_portable_4bit_path
from vqatune.generation.encoder import BatchEncoder
from vqatune.models.compile import compile_layers, compile_norms, compile_wanted, freeze_gc_after_warmup
from vqatune.models.precision import (DequantizedLinear, adapters_in_compute_dtype, dequantize_4bit_layers,
                                      dequantize_for_generation, dequantize_wanted, freeze_for_kbit_training)
from vqatune.vision.feature_cache import (_multimodal_core, install_image_feature_cache,
                                          maybe_install_image_feature_cache, vision_cache_blocker)
from vqatune.vision.keys import image_key_tensor
from vqatune.vision.pixel_cache import ImagePixelCache

QA = collections.namedtuple("QA", "image img_id question answer")


def synthetic_qa(n_images: int, image_size: int, seed: int = 0) -> list[QA]:
    """Kvasir-like QA from the product's synthetic generator (~9 per image), images resized to
    the model's input size as the prepare stage does, shuffled; "nan" answers skipped."""
    from PIL import Image

    from vqatune.data.synthetic import synthetic_rows

    images, rows = {}, []
    for row in synthetic_rows(n_images, seed):
        if row["answer"] == "nan":
            continue
        if row["img_id"] not in images:
            img = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
            images[row["img_id"]] = img.resize((image_size, image_size), Image.BILINEAR)
        rows.append(QA(images[row["img_id"]], row["img_id"], row["question"], row["answer"]))
    random.Random(seed).shuffle(rows)
    return rows


def collate(processor, rows, *, train: bool):
    """A training batch from the product's collator (loss on the answer only), or left-padded
    prompts as generation builds them."""
    from vqatune.generation.generate import prompt_texts
    from vqatune.prompts import PromptsConfig, build_messages
    from vqatune.training.collate import AnswerOnlyCollator

    if train:
        return AnswerOnlyCollator(processor, pad_to_multiple_of=1)(
            [{"messages_none": build_messages(r.question, "none", PromptsConfig(), r.answer),
              "image": r.image, "img_id": r.img_id} for r in rows])
    processor.tokenizer.padding_side = "left"
    texts = prompt_texts(processor, [build_messages(r.question, "none", PromptsConfig()) for r in rows])
    return processor(text=texts, images=[[r.image] for r in rows], padding=True, return_tensors="pt",
                     add_special_tokens=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    return model, processor


def _batch(processor, n=3, seed=0):

    rows = synthetic_qa(4, processor.image_processor.size["height"], seed=seed)[:n]
    return rows, collate(processor, rows, train=True)


@contextlib.contextmanager
def frozen_with_distinct_image_features(model):
    """The model frozen (the cache's condition) and its projector random for the test: the tiny
    model's starts at zero, which gives every image the same features (0). Restored after."""
    for p in model.parameters():
        p.requires_grad_(False)
    core = _multimodal_core(model)
    projection = core.multi_modal_projector.mm_input_projection_weight
    zero = projection.detach().clone()
    projection.data = torch.randn(projection.shape, generator=torch.Generator().manual_seed(0))
    try:
        yield core
    finally:
        projection.data = zero
        for p in model.parameters():
            p.requires_grad_(True)


def test_image_feature_cache_returns_what_the_tower_computes_and_runs_it_once_per_image(tiny):
    model, processor = tiny
    rows, batch = _batch(processor, n=3, seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ref = model(**batch).logits
    cache = install_image_feature_cache(model, training=True)
    try:
        calls = []
        tower = _multimodal_core(model).vision_tower
        handle = tower.register_forward_hook(
            lambda m, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
        with torch.no_grad():
            first = model(**batch).logits
            second = model(**batch).logits
        handle.remove()
        torch.testing.assert_close(first, ref)
        torch.testing.assert_close(second, ref)
        distinct = len({r.img_id for r in rows})
        assert cache.misses == distinct and cache.hits == 2 * len(rows) - distinct
        assert sum(calls) == distinct  # the tower ran once per distinct image, never again
        # a changed image is a new key
        other = batch["pixel_values"].clone()
        other[0, 0, 0, 0] += 0.5
        assert cache.keys(other)[0] != cache.keys(batch["pixel_values"])[0]
        assert cache.keys(other)[1:] == cache.keys(batch["pixel_values"])[1:]
    finally:
        cache.uninstall()
    assert "get_image_features" not in vars(_multimodal_core(model))
    for p in model.parameters():
        p.requires_grad_(True)


def test_image_feature_cache_prefilled_under_image_keys_answers_keyed_batches(tiny):
    model, processor = tiny
    rows, batch = _batch(processor, n=6, seed=0)
    distinct = len({r.img_id for r in rows})
    assert distinct < len(rows), "two rows must share an image"
    with frozen_with_distinct_image_features(model) as core:
        _check_keyed_batches(model, core, rows, batch, distinct)


def _check_keyed_batches(model, core, rows, batch, distinct):
    with torch.no_grad():
        ref_features = core.get_image_features(batch["pixel_values"], return_dict=True).pooler_output
        ref = model(**batch).logits
    assert len({tuple(f.flatten().tolist()) for f in ref_features}) == distinct, "features must tell images apart"
    keys = image_key_tensor([r.img_id for r in rows])
    assert keys.dtype == torch.int64 and keys.shape == (len(rows), 2)
    assert len({tuple(k) for k in keys.tolist()}) == distinct
    cache = install_image_feature_cache(model, training=True)
    try:
        calls = []
        handle = core.vision_tower.register_forward_hook(
            lambda m, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
        with torch.no_grad():
            assert cache.prefill([(keys, batch["pixel_values"])], "cpu") == distinct
            assert cache.prefill([(keys[:1], batch["pixel_values"][:1])], "cpu") == 0
            features = core.get_image_features(keys).pooler_output
            logits = model(**{**batch, "pixel_values": keys}).logits
        handle.remove()
        assert sum(calls) == distinct  # prefill only: the keyed batch ran no tower
        torch.testing.assert_close(features, ref_features)
        torch.testing.assert_close(logits, ref)
        assert cache.misses == distinct and cache.hits == 2 * len(rows)
        with pytest.raises(ValueError, match="not precomputed"):
            core.get_image_features(image_key_tensor(["never-prefilled"]))
        # Keys are names, not pixels: the pixel path hashes pixels and computes them again.
        with torch.no_grad():
            core.get_image_features(batch["pixel_values"][:1])
        assert cache.misses == distinct + 1
    finally:
        cache.uninstall()


def test_image_feature_cache_moved_to_one_table_answers_keyed_batches_there(tiny):
    """move_to: the same features for a keyed batch, from one table searched by key (no dict,
    no .tolist()); a key it lacks fails; a table over budget or a new image keeps the dict."""
    model, processor = tiny
    rows, batch = _batch(processor, n=6, seed=0)
    with frozen_with_distinct_image_features(model) as core:
        _check_table(model, core, rows, batch)


def _check_table(model, core, rows, batch):
    keys = image_key_tensor([r.img_id for r in rows])
    cache = install_image_feature_cache(model, training=True)
    try:
        with torch.no_grad():
            cache.prefill([(keys, batch["pixel_values"])], "cpu")
            from_dict = core.get_image_features(keys).pooler_output
        size = cache.memory_bytes()
        assert not cache.move_to("cpu", max_bytes=size - 1) and cache._table is None
        assert cache.move_to("cpu", max_bytes=size) and cache.memory_bytes() == size
        assert cache._table.shape[0] == len(cache.store) == len({r.img_id for r in rows})
        # Rows in a different order than the table's, repeated images included.
        order = torch.tensor([5, 0, 3, 3, 1, 4, 2])
        with torch.no_grad():
            from_table = core.get_image_features(keys[order]).pooler_output
        torch.testing.assert_close(from_table, from_dict[order], rtol=0, atol=0)
        unknown = image_key_tensor(["never-prefilled"])
        with pytest.raises(RuntimeError, match="not precomputed"):
            core.get_image_features(torch.cat([keys[:1], unknown]))
        # A new image (the pixel path) drops the table; keyed batches use the dict again.
        with torch.no_grad():
            core.get_image_features(batch["pixel_values"][:1])
            again = core.get_image_features(keys).pooler_output
        assert cache._table is None
        torch.testing.assert_close(again, from_dict, rtol=0, atol=0)
    finally:
        cache.uninstall()


def test_image_feature_cache_refuses_a_trainable_tower_or_an_adapter_on_it(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="vision_tower trains"):
        install_image_feature_cache(model, training=True)
    # generation: requires_grad is irrelevant, the weights never change
    install_image_feature_cache(model, training=False).uninstall()
    projector = get_peft_model(model, LoraConfig(r=2, target_modules=["up_proj"],
                                                 modules_to_save=["multi_modal_projector"]))
    assert "multi_modal_projector" in vision_cache_blocker(projector, training=False)
    assert maybe_install_image_feature_cache(projector, training=True) is None
    assert maybe_install_image_feature_cache(projector, training=False, enabled=False) is None


def test_tower_level_cache_trains_the_projector_as_the_uncached_model_does(tiny_model_dir):
    """A projector trained over a frozen tower: the tower's outputs are cached (the tower runs once
    per image), the projector runs at every step, and the loss and every gradient (projector
    and LoRA) equal those of the model without the cache. A LoRA on the tower refuses it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = synthetic_qa(3, processor.image_processor.size["height"])[:6]
    batch = collate(processor, rows, train=True)
    images = len({r.img_id for r in rows})
    assert images > 1

    def build():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False,
                                                      modules_to_save=["multi_modal_projector"]))
        return peft_model

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(build())
    model = build()
    assert maybe_install_image_feature_cache(model, training=True) is None  # the projector trains
    cache = maybe_install_image_feature_cache(model, training=True, tower_images=len(rows))
    assert cache is not None and cache.level == "tower"
    core = _multimodal_core(model)
    tower_calls = []
    hook = core.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    try:
        for step in range(2):
            loss, grads = loss_and_grads(model)
            torch.testing.assert_close(loss, plain_loss)
            assert grads.keys() == plain_grads.keys()
            projector = [n for n in grads if "multi_modal_projector" in n]
            assert projector and all(grads[n].abs().sum() > 0 for n in projector)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, plain_grads[name], msg=name)
        assert len(tower_calls) == 1, "the tower ran again for images it had seen"
        assert cache.misses == images and cache.hits == 2 * len(rows) - images
    finally:
        hook.remove()
        cache.uninstall()

    import vqatune.vision.feature_cache as feature_cache

    with pytest.MonkeyPatch.context() as patch:  # tower outputs that would not fit: no cache
        patch.setattr(feature_cache, "TOWER_CACHE_HOST_SHARE", 0.0)
        assert maybe_install_image_feature_cache(model, training=True, tower_images=len(rows)) is None

    vision = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model_dir),
                            LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["multi_modal_projector"]))
    assert maybe_install_image_feature_cache(vision, training=True, tower_images=1) is None


def test_no_cache_when_lora_reaches_the_vision_tower(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    vision = get_peft_model(model, LoraConfig(r=2, target_modules=["fc1"]))
    assert "vision_tower" in vision_cache_blocker(vision, training=False)
    with pytest.raises(ValueError, match="adapter reaches the vision_tower"):
        install_image_feature_cache(vision, training=False)


def test_dequantized_nf4_model_generates_what_the_nf4_model_generates(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=q,
                                                        device_map={"": "cpu"})
    use_portable_4bit_path(model)  # as the product's loader does, on any CPU
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)

    batch = collate(processor, synthetic_qa(3, processor.image_processor.size["height"], seed=3)[:4], train=False)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    replaced = dequantize_for_generation(model, dtype=torch.float32)
    assert replaced > 0
    assert not any(type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A") for m in model.modules())
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        with model.disable_adapter():
            base = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert not torch.equal(base, out)  # the adapter still acts and can still be switched off


def test_dequantize_base_keeps_the_nf4_weights_and_outputs_and_lora_trains_on_top(tiny_model_dir):
    """train.dequantize_base: each Linear4bit becomes a plain linear layer holding exactly what
    bitsandbytes' dequantize_4bit gives (nf4, double quant), with the same outputs, and LoRA
    still trains on top (the base stays frozen)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from vqatune.models.precision import prepare_for_kbit_training

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=q,
                                                        device_map={"": "cpu"})
    use_portable_4bit_path(model)
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = collate(processor, synthetic_qa(3, processor.image_processor.size["height"], seed=5)[:4], train=True)
    torch.manual_seed(0)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers
    expected = {name: dequantize_4bit(m.weight.data, m.weight.quant_state).to(m.compute_dtype)
                for name, m in layers.items()}
    probes = {name: torch.randn(3, m.in_features) for name, m in layers.items()}
    with torch.no_grad():
        outputs = {name: layers[name](x) for name, x in probes.items()}
        logits = model(**batch).logits
    assert dequantize_wanted("auto", model) == (False, "auto: not on CUDA")
    assert dequantize_wanted(True, model)[0]

    assert dequantize_4bit_layers(model) == len(layers)
    modules = dict(model.named_modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for name in layers:
        layer = modules[name]
        assert isinstance(layer, DequantizedLinear) and not layer.weight.requires_grad
        assert torch.equal(layer.weight, expected[name])  # exactly the nf4-rounded weights
        with torch.no_grad():
            assert torch.equal(layer(probes[name]), outputs[name])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-5)
    # Like bnb's layer, the output comes back in the input's dtype (an fp32 residual stream
    # stays fp32 under bf16 autocast, so peft adds LoRA updates to fp32 values).
    some = next(iter(layers))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert modules[some](probes[some]).dtype == torch.float32

    model = prepare_for_kbit_training(model, gradient_checkpointing=False, fp32_residual=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj", "q_proj"]))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert base_before and lora_before
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base_before.items())
    assert any(not torch.equal(params[n], p) for n, p in lora_before.items())


def test_freeze_without_upcast_keeps_dtypes_and_freezes(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    freeze_for_kbit_training(model, upcast_to_fp32=False, gradient_checkpointing=True)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    freeze_for_kbit_training(model, upcast_to_fp32=True, gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the guide's upcast, on request


def test_batch_encoder_returns_what_one_processor_call_returns(tiny):
    from vqatune.prompts import PromptsConfig, build_messages

    _, processor = tiny

    rows = synthetic_qa(4, processor.image_processor.size["height"], seed=4)[:7]
    modes = ["none", "static", "adaptive"]  # different prompt lengths -> real padding
    texts = [processor.apply_chat_template(build_messages(r.question, modes[i % 3], PromptsConfig()),
                                           add_generation_prompt=True, tokenize=False) for i, r in enumerate(rows)]
    images = [r.image for r in rows]
    processor.tokenizer.padding_side = "left"
    ref = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    encoder = BatchEncoder(processor, texts, images, threads=3)
    try:
        got = encoder.submit(list(range(len(rows)))).result()
        one = encoder.submit([2]).result()
    finally:
        encoder.close()
    assert set(got) == set(ref)
    assert len(set(ref["attention_mask"].sum(1).tolist())) > 1
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert one["input_ids"].shape[0] == 1


def test_batch_encoders_reuse_their_processor_copies_and_follow_the_padding_side(tiny_model_dir, monkeypatch):
    import copy

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)  # its own: the spare copies are per processor
    rows = synthetic_qa(4, processor.image_processor.size["height"], seed=4)[:3]
    assert len(rows) == 3
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": r.question * (i + 1)}]}],
                                           add_generation_prompt=True, tokenize=False) for i, r in enumerate(rows)]
    images = [r.image for r in rows]
    copied = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a, **k: (copied.append(obj) if obj is processor else None,
                                                                 real(obj, *a, **k))[1])

    def encode(side):
        processor.tokenizer.padding_side = side
        ref = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        encoder = BatchEncoder(processor, texts, images, threads=2)
        try:
            got = encoder.submit([0, 1, 2]).result()
        finally:
            encoder.close()
        assert all(torch.equal(got[key], ref[key]) for key in ref), side
        return got

    left = encode("left")
    assert len(copied) == 2
    right = encode("right")
    assert len(copied) == 2  # the second encoder took the first one's copies
    assert not torch.equal(left["input_ids"], right["input_ids"])  # and padded on the processor's side now


class _CountingImages(list):
    """The image column, counting reads: an image already in the pixel cache is never read."""

    def __init__(self, images):
        super().__init__(images)
        self.reads: list[int] = []

    def __getitem__(self, i):
        self.reads.append(i)
        return super().__getitem__(i)


def _test_rows(processed_dir):
    """Test-split rows of four images, two of them asked three questions, in interleaved order."""
    from datasets import load_from_disk

    test = load_from_disk(str(processed_dir))["test"]
    by_image: dict[str, list[int]] = {}
    for i, img_id in enumerate(test["img_id"]):
        by_image.setdefault(img_id, []).append(i)
    groups = sorted(by_image.values(), key=len, reverse=True)
    chosen = [g[:3] for g in groups[:2]] + [g[:1] for g in groups[2:4]]
    assert [len(g) for g in chosen] == [3, 3, 1, 1]
    order = [g[k] for k in range(3) for g in chosen if k < len(g)]  # images repeat, not adjacent
    return test.select(order)


def _texts(processor, rows, mode_offset=0):
    from vqatune.evaluation.run import prompt_messages
    from vqatune.generation.generate import prompt_texts

    modes = ["none", "static", "adaptive"]  # different prompt lengths -> real padding
    return prompt_texts(processor, [prompt_messages(row[f"messages_{modes[(i + mode_offset) % 3]}"])
                                    for i, row in enumerate(rows)])


def _reference(processor, texts, images):
    return processor(text=texts, images=[[im] for im in images], padding=True, add_special_tokens=False,
                     return_tensors="pt")


def _assert_identical(got, ref):
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype, key
        assert torch.equal(got[key], ref[key]), key


def test_batch_encoder_with_image_keys_returns_what_one_processor_call_returns(tiny, processed_dir):
    _, processor = tiny
    rows = _test_rows(processed_dir)
    keys = rows["img_id"]
    plain = rows["image"]
    images = _CountingImages(plain)
    texts = _texts(processor, rows)
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        ref = _reference(processor, texts, plain)
        assert len(set(ref["attention_mask"].sum(1).tolist())) > 1, "rows must differ in length"
        cache = ImagePixelCache()
        encoder = BatchEncoder(processor, texts, images, threads=2, image_keys=keys, pixel_cache=cache)
        try:
            first = encoder.submit([0, 1, 4]).result()  # rows 0 and 4 show the same image
            whole = encoder.submit(list(range(len(rows)))).result()
        finally:
            encoder.close()
        _assert_identical(whole, ref)
        _assert_identical(first, _reference(processor, [texts[i] for i in (0, 1, 4)], [plain[i] for i in (0, 1, 4)]))
        assert len(set(keys)) == 4 and cache.computed == 4 and len(cache) == 4
        assert sorted(images.reads) == [0, 1, 2, 3], "each image is read (and processed) once"

        # Another configuration (other prompts, same images) with the same cache: no image is read.
        other_texts = _texts(processor, rows, mode_offset=1)
        images.reads.clear()
        encoder = BatchEncoder(processor, other_texts, images, threads=3, image_keys=keys, pixel_cache=cache)
        try:
            again = encoder.submit(list(range(len(rows)))).result()
        finally:
            encoder.close()
        assert images.reads == []
        _assert_identical(again, _reference(processor, other_texts, plain))

        # Pixels stored in the model's dtype are the processor's pixels cast to it.
        bf16 = BatchEncoder(processor, texts, plain, threads=1, image_keys=keys,
                                  pixel_dtype=torch.bfloat16)
        try:
            half = bf16.submit(list(range(len(rows)))).result()
        finally:
            bf16.close()
        assert torch.equal(half["pixel_values"], ref["pixel_values"].to(torch.bfloat16))
        assert torch.equal(half["input_ids"], ref["input_ids"])
    finally:
        processor.tokenizer.padding_side = side


def test_batch_encoder_refuses_image_keys_it_cannot_honour(tiny):
    _, processor = tiny
    two = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        add_generation_prompt=True, tokenize=False)
    with pytest.raises(ValueError, match="2 image placeholders"):
        BatchEncoder(processor, [two], [None], image_keys=["a"])
    with pytest.raises(ValueError, match="1 image keys for 2 prompts"):
        BatchEncoder(processor, [two, two], [None, None], image_keys=["a"])


def test_load_tuned_model_gives_a_bf16_base_bf16_adapters_and_leaves_fp32_alone(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vqatune.evaluation.config import EvaluateConfig
    from vqatune.evaluation.run import load_for_evaluation

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    bf16, _ = load_for_evaluation(tiny_model_dir, tmp_path / "adapter", EvaluateConfig(dtype="bfloat16", device="cpu"))
    lora = {n: p for n, p in bf16.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) > 0
    assert {p.dtype for p in lora.values()} == {torch.bfloat16}  # peft alone loads them in float32
    # The same values, rounded to bf16 once.
    assert all(torch.equal(lora[n], saved[n].to(torch.bfloat16)) for n in saved)

    fp32, _ = load_for_evaluation(tiny_model_dir, tmp_path / "adapter", EvaluateConfig(dtype="float32", device="cpu"))
    assert adapters_in_compute_dtype(fp32) == 0
    assert all(torch.equal(p, saved[n]) for n, p in fp32.named_parameters() if "lora_" in n)


def test_compiled_norms_generate_what_the_eager_model_generates(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor


    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    rows = synthetic_qa(8, processor.image_processor.size["height"], seed=2)
    batches = [collate(processor, rows[:3], train=False), collate(processor, rows[3:8], train=False)]
    with torch.no_grad():
        eager = [model.generate(**b, max_new_tokens=5, do_sample=False) for b in batches]
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert compile_norms(model) == norms > 0
    with torch.no_grad():
        compiled = [model.generate(**b, max_new_tokens=5, do_sample=False) for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))  # two batch sizes, prefill and decode


@pytest.mark.slow
def test_compiled_layers_train_like_eager_layers(tiny_model_dir, tiny):
    # ~1-2 minutes of compilation on a CPU.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    def build():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "gate_proj"], init_lora_weights=False))
        model.train()
        return model

    _, processor = tiny
    batches = [_batch(processor, n, seed)[1] for n, seed in ((3, 0), (2, 1))]
    losses, grads = {}, {}
    for name in ("eager", "compiled"):
        model = build()
        if name == "compiled":
            layers = compile_layers(model)
            assert layers == model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
        losses[name] = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            losses[name].append(loss.item())
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert grads["compiled"].keys() == grads["eager"].keys() and grads["eager"]
    for n, g in grads["eager"].items():
        assert torch.allclose(grads["compiled"][n], g, rtol=1e-3, atol=1e-5), n


def test_compile_setting_null_means_on_with_cuda_only():
    assert compile_wanted(None, "cuda") and compile_wanted(None, "cuda:1")
    assert not compile_wanted(None, "cpu")
    assert compile_wanted(True, "cpu") and not compile_wanted(False, "cuda")


def test_gc_freeze_keeps_warmup_objects_out_of_collections_until_training_ends():
    import gc
    import weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    callback = freeze_gc_after_warmup()
    gc.collect()
    before_step = cycle()  # garbage (a reference cycle) alive when the first step ends
    callback.on_step_end(None, None, None)
    frozen = gc.get_freeze_count()
    try:
        after_step = cycle()  # made during the steps: collected as usual
        gc.collect()
        assert after_step() is None
        assert before_step() is not None, "frozen at the first step: no collection walks it"
        callback.on_step_end(None, None, None)  # later steps freeze nothing more
        assert gc.get_freeze_count() == frozen
    finally:
        callback.on_train_end(None, None, None)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before_step() is None, "unfrozen when training ends, then collected"
