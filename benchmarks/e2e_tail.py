"""merge, export and one llama.cpp question at MedGemma-4B size, on an adapter made up for it.

``e2e.py`` runs every stage through ``dvc repro`` (about 12 minutes on an H100, two device calls).
When a device call has only a few minutes, this runs the stages that come after training, the
ones that had never run at real size, on their own: the random MedGemma-4B of ``e2e.py``, a LoRA
adapter on its language model's MLP (the profile's targets and rank) with random non-zero weights,
then ``stages/merge.py`` and ``stages/export.py`` as dvc.yaml calls them (profile and overrides as
in ``e2e.py``; ``export.agreement_rows`` 0, since no evaluate stage ran), and the product's llama.cpp
client on the exported pair with one synthetic 896 px image. Writes ``e2e_tail_<card>.json`` and
``.md`` to --out.

    source benchmarks/offline_gpu_setup.sh && source benchmarks/e2e_gpu.sh && \
        python benchmarks/e2e_tail.py --out results/ --converter .e2e/converter
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import (OVERRIDES, GpuMemory, apply_overrides, ask_llama, card_slug, copy_pipeline,  # noqa: E402
                 disk_bytes, measured, stage_env, use_converter, versions)

QUESTION = "What type of procedure is the image taken from?"


def make_adapter(base_dir: Path, out_dir: Path, r: int, alpha: int) -> Path:
    """LoRA r/alpha on the language model's gate/up/down projections (the medgemma profile's
    targets), B drawn at random so that the merge changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vqatune.models.loading import free_model, load_base_model

    torch.manual_seed(0)
    model = load_base_model(base_dir, quantization="none", dtype="bfloat16", device="cpu")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=r".*language_model.*\.(gate_proj|up_proj|down_proj)", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    peft_model.save_pretrained(str(out_dir))
    free_model(peft_model)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vqatune-e2e-tail"))
    ap.add_argument("--profile", default="medgemma-16gb", choices=("medgemma", "medgemma-16gb"))
    ap.add_argument("--converter", type=Path, default=None)
    ap.add_argument("--llama-wait", type=float, default=300)
    ap.add_argument("--smoke", action="store_true", help="CPU: MedGemma's tokenizer, tiny sizes")
    args = ap.parse_args(argv)

    import torch
    import yaml
    from medgemma import build_random_medgemma, small_config

    from vqatune.cli.profile import apply_profile
    from vqatune.data import synthetic

    out, work = args.out, args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = (out / "e2e_tail_log.txt").open("a")
    gpu = GpuMemory()
    card = gpu.name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "versions": versions(), "profile": args.profile,
              "command": "python benchmarks/e2e_tail.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": []}
    slug = "cpu-smoke" if args.smoke else card_slug(card)

    def record(row):
        result["steps"].append(row)
        (out / f"e2e_tail_{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"e2e_tail: {json.dumps(row)}", flush=True)

    if args.converter:
        use_converter(args.converter)

    start = time.perf_counter()
    model_dir = work / "medgemma-4b-random"
    if not (model_dir / "config.json").is_file():
        build_random_medgemma(model_dir, config=small_config() if args.smoke else None)
    repo = copy_pipeline(work)
    overrides = {k: v.format(work=work) if isinstance(v, str) else v for k, v in OVERRIDES.items()}
    overrides["export.agreement_rows"] = 0
    apply_profile(args.profile, repo / "params.yaml", repo)
    apply_overrides(repo, overrides)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    lora = params["train"]["lora"]
    adapter = make_adapter(model_dir, work / "adapter", lora["r"], lora["alpha"])
    record({"step": "build (random model, random LoRA on the MLP)", "status": "ok",
            "wall_s": round(time.perf_counter() - start, 1), "output_bytes": disk_bytes([model_dir, adapter])})

    env = stage_env(work, repo)
    commands = {
        "merge": [sys.executable, "stages/merge.py", "--base", str(model_dir), "--adapter", str(adapter),
                  "--out", "models/merged", "--metrics", "metrics/merge.json"],
        "export": [sys.executable, "stages/export.py", "--merged", "models/merged", "--out", "models/gguf",
                   "--metrics", "metrics/export.json"],
    }
    for stage, cmd in commands.items():
        log.write(f"\n===== {' '.join(cmd)}\n")
        log.flush()
        row = {"step": stage, **measured(cmd, repo, env, gpu, log)}
        row["status"] = "ok" if row.pop("rc") == 0 else "failed"
        row["output_bytes"] = disk_bytes([repo / "models" / ("merged" if stage == "merge" else "gguf")])
        metrics = repo / "metrics" / f"{stage}.json"
        if metrics.is_file():
            row["summary"] = {k: v for k, v in json.loads(metrics.read_text()).items() if k != "provenance"}
        record(row)
        if row["status"] != "ok":
            log.close()
            return 1

    rng = random.Random(0)
    scene, _, _ = synthetic.make_scene("Polyps", rng)
    image = work / "llama_image.png"
    scene.convert("RGB").resize((896, 896)).save(image)
    reply = ask_llama(repo, work, image, QUESTION, gpu, log, args.llama_wait, env)
    row = {"step": "llama.cpp: one image question", "status": "failed" if "error" in reply else "ok",
           "question": QUESTION, "image_px": [896, 896], **reply}
    record(row)
    log.close()
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
