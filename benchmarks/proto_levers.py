"""First device call: the guide's recipe and candidate levers, measured side by side (standalone).

A prototype written before the project's training/generation code existed: its own collator
and training loop, so the design of ``vqatune.speed`` is informed by numbers. The committed
benchmark is ``gpu_bench.py`` (project code). Run on the GPU machine:

    PYTHONUNBUFFERED=1 python benchmarks/proto_levers.py --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from medgemma import benchmark_qa, build_random_medgemma, flop_model, lm_forward_flops, load_config  # noqa: E402

from vqatune.prompts import PromptsConfig, build_messages  # noqa: E402
from vqatune import speed  # noqa: E402

RESULTS: dict = {"train": {}, "generate": {}, "parity": {}, "env": {}}
OUT = Path(".")


def save():
    (OUT / "proto_results.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# --------------------------------------------------------------------------- answer-only loss
# Kept here, not in vqatune.speed: the project's SFTTrainer (TRL >= 1.x) already scores only
# labelled positions (add_fused_lm_head). This stand-in measured what that is worth.
def answer_positions(labels):
    """Positions whose logits predict a supervised token (label t+1 != -100) in any row."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)


def answer_only_loss(model, inputs):
    """The model's causal-LM loss (mean over supervised tokens) from answer-position logits only."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = answer_positions(labels)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    targets = labels[:, 1:].index_select(1, keep)
    loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss, outputs


# --------------------------------------------------------------------------- data
def collate(processor, rows, *, train: bool, prompts=PromptsConfig(), mode="none"):
    """Right-padded training batch (answer + <end_of_turn> supervised) or left-padded prompts."""
    tok = processor.tokenizer
    if train:
        texts = [processor.apply_chat_template(build_messages(r.question, mode, prompts, r.answer),
                                               tokenize=False) for r in rows]
        prompts_txt = [processor.apply_chat_template(build_messages(r.question, mode, prompts),
                                                     tokenize=False, add_generation_prompt=True) for r in rows]
        tok.padding_side = "right"
    else:
        texts = [processor.apply_chat_template(build_messages(r.question, mode, prompts),
                                               tokenize=False, add_generation_prompt=True) for r in rows]
        tok.padding_side = "left"
    batch = processor(text=texts, images=[[r.image] for r in rows], padding=True,
                      return_tensors="pt", add_special_tokens=False)
    if train:
        eot = tok.convert_tokens_to_ids("<end_of_turn>")
        labels = torch.full_like(batch["input_ids"], -100)
        for i, p in enumerate(prompts_txt):
            n_prompt = len(tok(p.replace(processor.boi_token, processor.full_image_sequence),
                               add_special_tokens=False)["input_ids"])
            n_full = int(batch["attention_mask"][i].sum())
            labels[i, n_prompt:n_full - 1] = batch["input_ids"][i, n_prompt:n_full - 1]  # drop final "\n"
            assert labels[i, n_full - 2] == eot, "last supervised token must be <end_of_turn>"
        batch["labels"] = labels
    return batch


DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMAGE_SIZE = 896


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def to_dev(batch):
    return {k: v.to(DEV, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------- model
def load(model_dir, attn):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                       attn_implementation=attn,
                                                       device_map={"": 0 if DEV == "cuda" else "cpu"})


def lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=["up_proj", "gate_proj", "down_proj"])
    return get_peft_model(model, cfg)


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def reset_mem():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def set_ckpt(model, on):
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def train_steps(model, batches, *, answer_only, lr=2e-4, warmup=2, seed=0, record_loss=False):
    """Timed AdamW steps over ``batches`` (on CPU, moved per step); returns (ex/s, losses, peak)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=DEV == "cuda")
    model.train()
    losses = []
    reset_mem()
    n_ex = 0
    t0 = None
    for i, b in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
            n_ex = 0
        b = to_dev(b)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            if answer_only:
                loss, _ = answer_only_loss(model, b)
            else:
                loss = model(**b, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record_loss:
            losses.append(loss.item())
        n_ex += b["input_ids"].shape[0]
    sync()
    dt = time.perf_counter() - t0
    return n_ex / dt, losses, peak_gib(), dt


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def restore(model, state):
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- main
def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--model-dir", default="/tmp/medgemma-random")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny model")
    args = ap.parse_args()
    global IMAGE_SIZE
    if args.tiny:
        IMAGE_SIZE = 64
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)

    import transformers, peft, bitsandbytes  # noqa: E401
    RESULTS["env"] = {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
                      "cuda": torch.version.cuda, "transformers": transformers.__version__,
                      "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    log(RESULTS["env"])

    t = time.perf_counter()
    if not Path(args.model_dir, "config.json").exists():
        build_random_medgemma(args.model_dir, tiny=args.tiny)
    RESULTS["env"]["build_s"] = time.perf_counter() - t
    log("built random model", RESULTS["env"]["build_s"])
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model_dir)
    config = load_config(Path(args.model_dir) / "config.json")
    fm = flop_model(config)
    RESULTS["flop_model"] = fm

    t = time.perf_counter()
    rows = benchmark_qa(args.images, IMAGE_SIZE, seed=0)
    log(f"{len(rows)} QA over {len({r.img_id for r in rows})} images in {time.perf_counter() - t:.1f}s")

    # CPU cost of collation (processor on 896 px images), single process.
    t = time.perf_counter()
    b = collate(processor, rows[:32], train=True)
    RESULTS["env"]["collate_ms_per_example"] = (time.perf_counter() - t) / 32 * 1e3
    seq_len = b["input_ids"].shape[1]
    RESULTS["env"]["train_seq_len_b32"] = seq_len
    RESULTS["env"]["mean_real_tokens"] = float(b["attention_mask"].sum(1).float().mean())
    RESULTS["env"]["mean_answer_tokens"] = float((b["labels"] != -100).sum(1).float().mean())
    log("collate", RESULTS["env"])
    save()

    def batches(bs, n_steps, offset=0):
        out = []
        for s in range(n_steps):
            i = (offset + s * bs) % (len(rows) - bs)
            out.append(collate(processor, rows[i:i + bs], train=True))
        return out

    def flops_train(b, *, answer_only, ckpt, vision_images):
        T = b["attention_mask"].sum(1).float()
        tokens = float(T.sum())
        logit_tok = float((b["labels"][:, 1:] != -100).any(0).sum()) * b["input_ids"].shape[0] if answer_only \
            else b["input_ids"].numel()
        fwd = lm_forward_flops(fm, tokens, logit_tok, float((T / 2).mean()))
        passes = 2 + (1 if ckpt else 0)  # forward + activation-gradient backward (+ recompute)
        return passes * fwd + vision_images * fm["vision_per_image"]

    # ---------------------------------------------------------------- guide recipe (train)
    model = None
    init_lora = guide_state_after = guide_answers = parity_batches = None
    try:
        t = time.perf_counter()
        model = load(args.model_dir, "eager")
        RESULTS["env"]["load_s"] = time.perf_counter() - t
        core = speed._multimodal_core(model)
        RESULTS["env"]["vision_4bit_layers"] = sum(type(m).__name__ == "Linear4bit" for m in core.vision_tower.modules())
        RESULTS["env"]["lm_4bit_layers"] = sum(type(m).__name__ == "Linear4bit" for m in core.language_model.modules())
        RESULTS["env"]["mem_after_load_gib"] = peak_gib()
        log("loaded nf4", RESULTS["env"])
        speed.freeze_for_kbit_training(model, upcast_to_fp32=True, gradient_checkpointing=True)
        model = lora(model)
        init_lora = lora_state(model)
        bl = batches(1, 12)
        eps, _, peak, dt = train_steps(model, bl, answer_only=False)
        fl = sum(flops_train(b, answer_only=False, ckpt=True, vision_images=1) for b in bl[2:])
        RESULTS["train"]["guide_b1"] = {"ex_per_s": eps, "peak_gib": peak, "tflops_per_s": fl / dt / 1e12}
        log("guide train", RESULTS["train"]["guide_b1"])
        save()
        # Parity batches: guide recipe at batch 2 on fixed batches, loss curve recorded.
        restore(model, init_lora)
        try:
            parity_batches = batches(2, 16, offset=7)
            _, guide_losses, peak, _ = train_steps(model, parity_batches, answer_only=False, warmup=0,
                                                   record_loss=True)
        except torch.cuda.OutOfMemoryError:
            reset_mem()
            restore(model, init_lora)
            parity_batches = batches(1, 16, offset=7)
            _, guide_losses, peak, _ = train_steps(model, parity_batches, answer_only=False, warmup=0,
                                                   record_loss=True)
        RESULTS["parity"]["batch"] = parity_batches[0]["input_ids"].shape[0]
        RESULTS["parity"]["guide_losses_b2"] = guide_losses
        RESULTS["parity"]["guide_b2_peak_gib"] = peak
        log("guide parity losses", [round(x, 3) for x in guide_losses])
        save()
        # Guide generation: eager, nf4, LoRA unmerged (random B=0 -> trained one from parity), batch 1.
        model.eval()
        gen_rows = rows[:4]
        times = []
        guide_answers = []
        with torch.no_grad():
            for i, r in enumerate(gen_rows):
                b = to_dev(collate(processor, [r], train=False))
                sync()
                t = time.perf_counter()
                out = model.generate(**b, max_new_tokens=25, min_new_tokens=25, do_sample=False)
                sync()
                if i > 0:
                    times.append(time.perf_counter() - t)
                guide_answers.append(processor.tokenizer.decode(out[0, b["input_ids"].shape[1]:]))
        RESULTS["generate"]["guide_b1"] = {"ex_per_s": len(times) / sum(times)}
        log("guide gen", RESULTS["generate"]["guide_b1"])
        guide_state_after = lora_state(model)
        save()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["train"]["guide_error"] = repr(e)
        save()
    finally:
        del model
        reset_mem()

    # ---------------------------------------------------------------- fast levers (train)
    model = load(args.model_dir, "sdpa")
    speed.freeze_for_kbit_training(model, upcast_to_fp32=False, gradient_checkpointing=True)
    model = lora(model)
    if init_lora is not None:
        restore(model, init_lora)
    init_lora = lora_state(model)
    if parity_batches is None:
        parity_batches = batches(1, 16, offset=7)

    variants = [
        # name, batch, answer_only, cache(None/cuda/cpu), ckpt, steps
        ("sdpa_b8_full_logits", 8, False, None, True, 8),
        ("sdpa_b16_answer_logits", 16, True, None, True, 8),
        ("sdpa_b16_answer_cache", 16, True, "cuda", True, 10),
        ("sdpa_b32_answer_cache", 32, True, "cuda", True, 8),
        ("sdpa_b16_answer_cache_nockpt", 16, True, "cuda", False, 10),
        ("sdpa_b32_answer_cache_nockpt", 32, True, "cuda", False, 8),
        ("sdpa_b64_answer_cache_nockpt", 64, True, "cuda", False, 6),
        ("16gb_b16_answer_cachecpu_ckpt", 16, True, "cpu", True, 10),
        ("16gb_b32_answer_cachecpu_ckpt", 32, True, "cpu", True, 8),
    ]
    # Fill the cache once over all benchmark images (what a training run does first / on the fly).
    for name, bs, answer_only, cache_dev, ckpt, steps in variants:
        cache = None
        try:
            restore(model, init_lora)
            set_ckpt(model, ckpt)
            if cache_dev:
                cache = speed.install_image_feature_cache(model, device=cache_dev if DEV == "cuda" else "cpu")
                # pre-fill on the unique images so the timed steps see a warm cache
                t = time.perf_counter()
                seen = {}
                for r in rows:
                    seen.setdefault(r.img_id, r)
                uniq = list(seen.values())
                core = speed._multimodal_core(model)
                with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
                    for j in range(0, len(uniq), 16):
                        pv = processor.image_processor([u.image for u in uniq[j:j + 16]],
                                                       return_tensors="pt")["pixel_values"].to(DEV)
                        core.get_image_features(pv)  # patched: computes and stores
                sync()
                fill = time.perf_counter() - t
                RESULTS["train"].setdefault("cache_fill", {})[name] = {
                    "images": len(uniq), "s": fill, "images_per_s": len(uniq) / fill,
                    "cache_gib": cache.memory_bytes() / 2**30}
            bl = batches(bs, steps)
            eps, _, peak, dt = train_steps(model, bl, answer_only=answer_only)
            fl = sum(flops_train(b, answer_only=answer_only, ckpt=ckpt,
                                 vision_images=0 if cache_dev else b["input_ids"].shape[0]) for b in bl[2:])
            RESULTS["train"][name] = {"ex_per_s": eps, "peak_gib": peak, "tflops_per_s": fl / dt / 1e12,
                                      "cache_hits": cache.hits if cache else None,
                                      "cache_misses": cache.misses if cache else None}
        except torch.cuda.OutOfMemoryError as e:
            RESULTS["train"][name] = {"error": "OOM", "detail": str(e)[:200]}
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["train"][name] = {"error": repr(e)[:300]}
        finally:
            if cache:
                cache.uninstall()
            del cache
            reset_mem()
        log(name, RESULTS["train"][name])
        save()

    # ---------------------------------------------------------------- loss parity (fast path)
    try:
        set_ckpt(model, True)
        for tag, kw in [("fast_sdpa_answer_cache", dict(answer_only=True, cache=True, seed=0)),
                        ("fast_sdpa_full", dict(answer_only=False, cache=False, seed=0)),
                        ("fast_sdpa_answer_cache_seed1", dict(answer_only=True, cache=True, seed=1))]:
            restore(model, init_lora)
            cache = speed.install_image_feature_cache(model) if kw["cache"] else None
            _, losses, peak, _ = train_steps(model, parity_batches, answer_only=kw["answer_only"], warmup=0,
                                             record_loss=True, seed=kw["seed"])
            if cache:
                cache.uninstall()
            RESULTS["parity"][tag] = losses
            log("parity", tag, [round(x, 3) for x in losses])
        save()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["parity"]["error"] = repr(e)[:300]

    # ---------------------------------------------------------------- generation levers
    model.eval()
    gen = RESULTS["generate"]

    def gen_run(name, bs, n, *, cache_on, min_tokens=25):
        cache = speed.install_image_feature_cache(model) if cache_on else None
        answers = []
        try:
            reset_mem()
            sel = rows[:n]
            bl = [collate(processor, sel[i:i + bs], train=False) for i in range(0, n, bs)]
            # warm-up on the first batch (not timed), then time all
            with torch.no_grad():
                b = to_dev(bl[0])
                model.generate(**b, max_new_tokens=2, do_sample=False)
                sync()
                t = time.perf_counter()
                for b in bl:
                    b = to_dev(b)
                    out = model.generate(**b, max_new_tokens=25, min_new_tokens=min_tokens, do_sample=False)
                    answers += processor.tokenizer.batch_decode(out[:, b["input_ids"].shape[1]:])
                sync()
                dt = time.perf_counter() - t
            gen[name] = {"ex_per_s": n / dt, "peak_gib": peak_gib(), "batch": bs, "n": n}
        except torch.cuda.OutOfMemoryError as e:
            gen[name] = {"error": "OOM", "detail": str(e)[:200]}
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            gen[name] = {"error": repr(e)[:300]}
        finally:
            if cache:
                cache.uninstall()
        log(name, gen[name])
        save()
        return answers

    restore(model, guide_state_after if guide_state_after is not None else init_lora)
    gen_run("sdpa_nf4_b64", 64, 128, cache_on=False)
    gen_run("sdpa_nf4_b64_cache", 64, 128, cache_on=True)
    n_dq = speed.dequantize_for_generation(model)
    gen["dequantized_layers"] = n_dq
    reset_mem()
    gen["mem_after_dequant_gib"] = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    gen_run("sdpa_bf16_b64_cache", 64, 256, cache_on=True)
    gen_run("sdpa_bf16_b128_cache", 128, 256, cache_on=True)
    fast_answers = gen_run("sdpa_bf16_b256_cache", 256, 512, cache_on=True)
    gen_run("sdpa_bf16_b256_nocache", 256, 256, cache_on=False)

    # Parity of greedy answers: batched (bf16, sdpa, left padding, cache) vs one at a time (same
    # model), natural stopping; and vs the guide's nf4/eager one-at-a-time answers (forced 25).
    try:
        n_par = 24
        batched = gen_run("parity_batched_b24", 24, n_par, cache_on=True, min_tokens=0)
        single = []
        t = time.perf_counter()
        with torch.no_grad():
            for r in rows[:n_par]:
                b = to_dev(collate(processor, [r], train=False))
                out = model.generate(**b, max_new_tokens=25, do_sample=False)
                single.append(processor.tokenizer.decode(out[0, b["input_ids"].shape[1]:]))
        RESULTS["parity"]["bf16_b1_ex_per_s"] = n_par / (time.perf_counter() - t)
        RESULTS["parity"]["generation_match_batched_vs_single"] = sum(
            a.replace("<pad>", "") == b.replace("<pad>", "") for a, b in zip(batched, single)) / n_par
        RESULTS["parity"]["examples"] = list(zip(batched[:6], single[:6]))
        if guide_answers:
            fa = fast_answers[:len(guide_answers)]
            RESULTS["parity"]["guide_vs_fast_forced25_match"] = sum(
                a.replace("<pad>", "") == b for a, b in zip(fa, guide_answers)) / len(guide_answers)
            RESULTS["parity"]["guide_examples"] = list(zip(fa, guide_answers))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["parity"]["gen_error"] = repr(e)[:300]
    save()

    # Vision tower alone, bf16 (the cache fill rate): batch 16.
    print("\n=== summary ===")
    for sec in ("train", "generate"):
        for k, v in RESULTS[sec].items():
            print(sec, k, json.dumps(v, default=str)[:200])
    print("parity", json.dumps({k: v for k, v in RESULTS["parity"].items() if "example" not in k})[:3000])


if __name__ == "__main__":
    main()
