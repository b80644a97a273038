"""Unsloth's training step on the benchmark's model, as the GPU-bound peer of gpu_bench.py.

Run by ``gpu_bench.py --unsloth`` in its own process, with Unsloth's own package tree first on
PYTHONPATH (``.unsloth/``: unsloth, unsloth_zoo, its trl/datasets pins, torchao without its
large kernels; ../shared/reference/gpu-anchor.md says how it was carried), so nothing of it
touches the project's process. Prints one line ``UNSLOTH_RESULT {json}``.

Settings (the peer measured on 2026-11-27): ``FastVisionModel.from_pretrained(load_in_4bit=True,
use_gradient_checkpointing="unsloth")`` (nf4), LoRA r16/alpha16, dropout 0, on the language
model's attention and MLP, vision frozen, ``for_training``, AdamW (lr 2e-4) under bf16 autocast,
the architecture's 305-token examples (bos, 30 prompt tokens, 256 image tokens between
<start_of_image> and <end_of_image>, 8 turn tokens, a 6-token answer with the loss, end of turn
and 1 more), random 896 px pixels. Unsloth runs the vision tower in every step (it has no
feature cache); that is its recipe, as the project's cache is the project's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT, IMAGE, TURN, ANSWER, TAIL = 30, 256, 8, 6, 1  # 1 + 30 + 1 + 256 + 1 + 8 + 6 + 1 (end of turn) + 1 = 305


def make_batch(n: int, ids: dict, vocab: int, image_size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    specials = {ids["boi_token_index"], ids["eoi_token_index"], ids["image_token_index"], *ids["eos_token_id"]}
    pool = torch.tensor([i for i in range(4, vocab) if i not in specials])

    def text(k):
        return pool[torch.randint(len(pool), (n, k), generator=g)]

    col = lambda v: torch.full((n, 1), v)  # noqa: E731
    parts = [col(2), text(PROMPT), col(ids["boi_token_index"]), col(ids["image_token_index"]).expand(n, IMAGE),
             col(ids["eoi_token_index"]), text(TURN), text(ANSWER), col(ids["eos_token_id"][-1]), text(TAIL)]
    input_ids = torch.cat(parts, dim=1)
    labels = torch.full_like(input_ids, -100)
    start = 1 + PROMPT + 1 + IMAGE + 1 + TURN
    labels[:, start:start + ANSWER + 1] = input_ids[:, start:start + ANSWER + 1]
    token_type_ids = (input_ids == ids["image_token_index"]).long()
    pixel_values = torch.randn(n, 3, image_size, image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "token_type_ids": token_type_ids, "pixel_values": pixel_values}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the benchmark's random-weight model folder")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (compilation)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per batch size")
    args = ap.parse_args(argv)
    result = {"batches": {}, "settings": "FastVisionModel nf4, LoRA r16/a16 LM attention+MLP, vision frozen, "
              "use_gradient_checkpointing='unsloth', AdamW lr 2e-4, bf16 autocast, 305-token examples"}
    try:
        t0 = time.perf_counter()
        import unsloth  # noqa: F401  (before transformers: it patches it)
        from unsloth import FastVisionModel
        import torch

        result["unsloth"] = unsloth.__version__
        result["import_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        model, _ = FastVisionModel.from_pretrained(args.model, load_in_4bit=True,
                                                   use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=16, lora_alpha=16, lora_dropout=0, bias="none", random_state=0)
        FastVisionModel.for_training(model)
        result["load_s"] = round(time.perf_counter() - t0, 1)
        import transformers

        result["transformers"] = transformers.__version__
        with open(os.path.join(args.model, "vqatune_benchmark.json")) as fh:
            ids = json.load(fh)
        with open(os.path.join(args.model, "config.json")) as fh:
            config = json.load(fh)
        vocab = min(1024, config["text_config"]["vocab_size"])  # the stand-in tokenizer's ids
        image_size = config["vision_config"]["image_size"]
        params = [p for p in model.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=2e-4)
        for n in args.batches:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            batches = [make_batch(n, ids, vocab, image_size, seed=s) for s in range(args.warmup + args.steps)]
            entry = {"batch": n, "tokens_per_example": batches[0]["input_ids"].shape[1]}
            try:
                t_start = time.perf_counter()
                for i, batch in enumerate(batches):
                    if i == args.warmup:
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        entry["warmup_s"] = round(t - t_start, 1)
                    batch = {k: v.cuda() for k, v in batch.items()}
                    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(**batch).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t
                entry.update(examples_per_s=n * args.steps / seconds, loss=float(loss),
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except Exception as err:  # e.g. out of memory at the larger batch: keep the smaller
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                opt.zero_grad(set_to_none=True)
            result["batches"][str(n)] = entry
            print("UNSLOTH_PROGRESS " + json.dumps(entry), flush=True)
        rates = [e["examples_per_s"] for e in result["batches"].values() if "examples_per_s" in e]
        if rates:
            result["best_examples_per_s"] = max(rates)
    except Exception as err:
        traceback.print_exc()
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    print("UNSLOTH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
