"""Where a 384-row evaluate configuration's time goes on MedGemma-4B shapes (random weights), on
the evaluate stage's own path (static KV cache, CUDA-graph decoding, compiled RMSNorms, image
features cached), and what attention variants change: prefill-only and full generation per
prompt mode, tokens decoded, and ``torch.profiler``'s top kernels for one prefill and one full
configuration. Writes ``profile_eval_paths.json`` to ``--out``.

    source benchmarks/offline_gpu_setup.sh && python benchmarks/profile_eval_paths.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_bench as gb  # noqa: E402

log = logging.getLogger("profile_eval_paths")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="sdpa,sdpa_grouped,grouped_mlp_compiled")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    gb.DEV = gb.Device()
    scale = gb.TINY if args.tiny else gb.FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(args.work or tmp), out, scale, args.tiny, args.variants.split(","))


def run(work, out, scale, tiny, variants):
    from vqatune.evaluation.config import EvaluateConfig
    from vqatune.evaluation.run import generation_levers
    from vqatune.generation.attention import use_grouped_attention
    from vqatune.generation.generate import generate_answers
    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.prompts import PROMPT_MODES
    from vqatune.vision.pixel_cache import ImagePixelCache

    DEV = gb.DEV
    model_dir, data_dir, world = gb.build_world(work, scale, tiny)
    res = {"device": DEV.name, "torch": torch.__version__, "world": world, "rows": scale.gen_rows,
           "batch": scale.gen_batch, "new_tokens": scale.new_tokens, "variants": {}}

    def save():
        (out / "profile_eval_paths.json").write_text(json.dumps(res, indent=2, default=str) + "\n")

    cfg = EvaluateConfig(batch_size=scale.gen_batch, quantization="none", attn_implementation="sdpa",
                         device=DEV.type, max_new_tokens=scale.new_tokens, cache_implementation="static_graphs")
    processor = load_processor(model_dir)
    model = load_base_model(model_dir, quantization="none", dtype=str(DEV.compute_dtype)[6:],
                            attn_implementation="sdpa", device=DEV.type).eval()
    generation_levers(model, cfg)
    test, messages, images = gb.evaluation_inputs(data_dir, scale)
    keys, pixel_cache = test["img_id"], ImagePixelCache()
    rows = len(keys)

    def gen(mode, new_tokens, stats):
        DEV.sync()
        t = time.perf_counter()
        answers = generate_answers(model, processor, messages[mode], images, batch_size=cfg.batch_size,
                                   max_new_tokens=new_tokens, image_keys=keys, pixel_cache=pixel_cache,
                                   cache_implementation=cfg.cache_implementation, stats=stats)
        DEV.sync()
        return answers, time.perf_counter() - t

    gen("none", 2, {})  # warm-up: compiled norms, features, pixels
    reference = {}
    for variant in variants:
        if variant == "sdpa_grouped":
            use_grouped_attention(model)
        elif variant == "grouped_mlp_compiled":  # on top of sdpa_grouped: GeLU x up fused in one kernel
            from vqatune.models.compile import compile_layers

            use_grouped_attention(model)
            res.setdefault("compiled_mlps", compile_layers(model, towers=("Gemma3MLP",)))
        entry = res["variants"].setdefault(variant, {})
        gen("none", 2, {})  # the variant's first call
        for mode in PROMPT_MODES:
            pstats, fstats = {}, {}
            _, prefill_s = gen(mode, 1, pstats)
            answers, full_s = gen(mode, scale.new_tokens, fstats)
            steps = fstats.get("decode_steps", 0)
            decode_s = full_s - prefill_s - fstats.get("graph_capture_s", 0.0)
            entry[mode] = {"prefill_call_s": round(prefill_s, 3), "prefill_s": round(pstats.get("prefill_s", 0), 3),
                           "full_s": round(full_s, 3), "graph_capture_s": round(fstats.get("graph_capture_s", 0), 3),
                           "decode_steps": steps, "decode_step_ms": round(1000 * decode_s / max(steps - 1, 1), 2),
                           "examples_per_s": round(rows / full_s, 2)}
            if variant == variants[0]:
                reference[mode] = answers
            else:
                entry[mode]["answers_equal_first_variant"] = sum(a == b for a, b in zip(answers, reference[mode])) / rows
            log.info("%s %s %s", variant, mode, entry[mode])
            save()
        entry["examples_per_s_three_modes"] = round(3 * rows / sum(entry[m]["full_s"] for m in PROMPT_MODES), 2)
        for label, new_tokens in (("prefill", 1), ("full", scale.new_tokens)):
            entry[f"profile_{label}"] = gb.profiled(lambda: gen("static", new_tokens, {}), rows=25)
            log.info("%s profile %s\n%s", variant, label, entry[f"profile_{label}"]["top_device"])
            save()
    return res


if __name__ == "__main__":
    main()
