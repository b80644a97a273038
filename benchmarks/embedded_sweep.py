"""Variants of the embedded run's training, trained side by side and scored on the test split.

Each run is a `params.yaml` and `best_params.json` (the committed ones by default) with some
`train:` keys changed (dotted `lora.*` keys too; the search's keys go to best_params.json, which
the train stage lets win) and, optionally, another base model folder (e.g. one built with
`model.tiny_layers: 3`). Each is trained by `stages/train.py`, the DVC stage's own script, in its
own process, `--parallel` at a time, then scored as the evaluate stage scores: the tuned model's
greedy answers (`generate_answers`) to the test split under the prompt modes asked for, exact
match overall, per category and per question.

One H100 machine (16 CPU cores) trains a dozen embedded runs at once in a few minutes: there the
runs train in fp32 without compilation (`train.precision: fp32`, `compute_dtype: float32`,
`compile: false`, `dequantize_base: false`), the embedded run's CPU numerics as near as a GPU gets,
so what wins there is worth one CPU run to confirm. On CPU (`--device cpu`) each run is the
embedded training itself (minutes on 2 cores).

    python benchmarks/embedded_sweep.py --runs runs.json --out results/ [--device cuda] [--parallel 12]

runs.json: {"name": {"train": {"epochs": 7.0, "lora.vision_tower": false}, "model": "models/base"}, ...}
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_FP32 = {"precision": "fp32", "compute_dtype": "float32", "compile": False, "dequantize_base": False}

# stages/train.py writes its curves through dvclive. A GPU machine without internet may lack it
# (it pulls in DVC); the sweep reads no curves, so there the runs import this stand-in instead.
DVCLIVE_STAND_IN = '''class Live:
    """embedded_sweep.py's stand-in: the curves are not read."""
    def __init__(self, *args, **kwargs): pass
    def __getattr__(self, name): return lambda *args, **kwargs: None
    def __enter__(self): return self
    def __exit__(self, *exc): return False
'''


def run_files(name: str, spec: dict, params: dict, best: dict, device: str, folder: Path) -> tuple[Path, Path]:
    """Write the run's params.yaml and best_params.json under ``folder``; returns both paths."""
    unknown = set(spec) - {"train", "model"}
    if unknown:
        raise SystemExit(f"run {name}: unknown keys {sorted(unknown)} (allowed: train, model)")
    params, best = copy.deepcopy(params), dict(best)
    searched = set(params["tune"]["search_space"]) | set(best)  # what best_params.json sets, it wins
    if device == "cuda":
        params["train"].update(GPU_FP32)
    for key, value in spec.get("train", {}).items():
        if key in searched:
            best[key] = value
        elif key.startswith("lora."):
            params["train"]["lora"][key[5:]] = value
        elif key in params["train"]:
            params["train"][key] = value
        else:
            raise SystemExit(f"run {name}: train.{key} is not a key of params.yaml's train section")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "best_params.json").write_text(json.dumps({"searched": True, "params": best}))
    return folder / "params.yaml", folder / "best_params.json"


def train_and_score(name: str, spec: dict, args, params: dict, best: dict, env: dict) -> dict:
    folder = Path(args.work) / name
    params_file, best_file = run_files(name, spec, params, best, args.device, folder)
    model = spec.get("model", args.model)
    start = time.perf_counter()
    train = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "--model", model, "--data", args.data,
         "--best-params", str(best_file), "--out", str(folder / "adapter"), "--metrics", str(folder / "train.json"),
         "--plots", str(folder / "curves"), "--checkpoints", str(folder / "checkpoints"), "--params", str(params_file),
         "--fresh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.train_timeout)
    seconds = time.perf_counter() - start
    result = {"changes": spec, "wall_s": round(seconds, 1)}
    if train.returncode != 0:
        return {**result, "error": (train.stderr or train.stdout)[-1500:]}
    metrics = json.loads((folder / "train.json").read_text())
    result.update({key: metrics.get(key) for key in ("steps", "epochs", "seconds", "eval_loss_start", "eval_loss",
                                                     "examples_per_s", "device")})
    score = subprocess.run([sys.executable, __file__, "--score", str(folder), "--model", model, "--data", args.data,
                            "--modes", args.modes],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.train_timeout)
    if score.returncode != 0:
        return {**result, "error": (score.stderr or score.stdout)[-1500:]}
    return {**result, **json.loads((folder / "scores.json").read_text())}


def score(folder: Path, model: str, data: str, modes: list[str]) -> None:
    """scores.json in ``folder``: the tuned adapter's exact match on the test split, per mode, asked
    with the prepared messages as the evaluate stage asks them."""
    import torch

    from vqatune.data.processed import load_prepared
    from vqatune.evaluation.metrics import exact_match, mean_scores_by
    from vqatune.evaluation.run import prompt_messages
    from vqatune.generation.generate import generate_answers
    from vqatune.models.loading import load_tuned_model

    torch.set_num_threads(2)
    test = load_prepared(data)["test"]
    model, processor = load_tuned_model(model, folder / "adapter", device="cpu")
    out = {}
    for mode in modes:
        messages = [prompt_messages(stored) for stored in test[f"messages_{mode}"]]
        answers = generate_answers(model, processor, messages, list(test["image"]), batch_size=32,
                                   max_new_tokens=40, image_keys=test["img_id"])
        rows = [{"exact_match": exact_match(a, r)} for a, r in zip(answers, test["answer"])]
        out[mode] = {"exact_match": round(sum(r["exact_match"] for r in rows) / len(rows), 4), "rows": len(rows),
                     **{key: {group: scores["exact_match"] for group, scores in mean_scores_by(rows, test[column]).items()}
                        for key, column in (("per_category", "category"), ("per_question", "question"))}}
    (folder / "scores.json").write_text(json.dumps({"scores": out}, indent=1))


def table(results: dict, mode: str = "none") -> str:
    categories = sorted({c for r in results.values() for c in r.get("scores", {}).get(mode, {}).get("per_category", {})})
    lines = ["| run | changes | train s | eval loss | EM | " + " | ".join(categories) + " |",
             "|---|---|---|---|---|" + "---|" * len(categories)]
    for name, r in results.items():
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].get("train", {}).items()) or "as committed"
        if "model" in r["changes"]:
            changes += f", model {r['changes']['model']}"
        if "error" in r:
            lines.append(f"| {name} | {changes} | failed | | | " + " | " * len(categories))
            continue
        s = r["scores"][mode]
        lines.append(f"| {name} | {changes} | {r['seconds']:.0f} | {r['eval_loss']:.3f} | {s['exact_match']:.3f} | "
                     + " | ".join(f"{s['per_category'].get(c, float('nan')):.2f}" for c in categories) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", help="JSON file: {name: {train: {key: value}, model: folder}}")
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--best-params", default="models/best_params.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--parallel", type=int, default=12)
    parser.add_argument("--modes", default="none", help="prompt modes scored, comma-separated")
    parser.add_argument("--train-timeout", type=int, default=3600, help="seconds a run may train")
    parser.add_argument("--work", default=None, help="the runs' folders (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="embedded_sweep")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # internal: score one run folder
    args = parser.parse_args(argv)
    if args.score:
        return score(Path(args.score), args.model, args.data, args.modes.split(","))
    if not args.runs:
        parser.error("--runs is required")

    runs = json.loads(Path(args.runs).read_text())
    params = yaml.safe_load(Path(args.params).read_text())
    best_file = Path(args.best_params)
    best = json.loads(best_file.read_text())["params"] if best_file.exists() else {}
    args.work = args.work or tempfile.mkdtemp(prefix="embedded_sweep_")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["OMP_NUM_THREADS"] = "1"  # a dozen processes share the machine's cores
    try:
        import dvclive  # noqa: F401
    except ImportError:
        stand_in = Path(args.work) / "stand_in" / "dvclive"
        stand_in.mkdir(parents=True, exist_ok=True)
        (stand_in / "__init__.py").write_text(DVCLIVE_STAND_IN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(stand_in.parent)]))

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {name: pool.submit(train_and_score, name, spec, args, params, best, env)
                   for name, spec in runs.items()}
        results = {name: future.result() for name, future in futures.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"device": args.device, "runs": results}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(f"# Embedded training sweep ({args.device})\n\n" + table(results) + "\n")
    print(table(results))
    failed = [name for name, r in results.items() if "error" in r]
    for name in failed:
        print(f"{name} failed:\n{results[name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
