"""The whole pipeline, every stage through `dvc repro`, on MedGemma-4B's architecture.

On a GPU machine (see offline_gpu_setup.sh; llama-cpp-python built there for the last step):

    source benchmarks/offline_gpu_setup.sh && python benchmarks/e2e.py --out results/

In a work folder outside the checkout (``--work``, default /tmp/vqatune-e2e):

1. builds a random-weight MedGemma-4B folder (``medgemma4b_config.json`` with MedGemma's tokenizer
   shape, ``medgemma.build_random_medgemma``) and a tiny random BERT for BERTScore (the packaged
   MiniLM is an 88 MB package the GPU machine may not have);
2. copies the pipeline there (dvc.yaml, params.yaml, stages/, src/, configs/), ``dvc init --no-scm``
   (cache by hard links: no second copy of 8.6 GB folders), switches params.yaml with
   ``vqatune profile medgemma`` and applies ``OVERRIDES``, what ``dvc exp run -S key=value`` would
   set: the local model, synthetic data at the profile's 896 px, a 2-trial search and a few steps;
3. runs ``dvc repro STAGE`` for each stage in dvc.yaml's order, recording its wall time, peak GPU
   memory (NVML: the card's used memory, polled), peak host memory (the sum of the stage's process
   tree's RSS, polled) and its outputs' size on disk; then ``dvc status`` must be clean;
4. asks the exported GGUF pair one question about a test image through llama.cpp
   (llama-cpp-python, ``vqatune.export.agreement``) and sets it beside the evaluate stage's answer.

Writes ``e2e_<card>.json`` and ``e2e_<card>.md`` to --out after every step. ``--stages`` runs some
stages only (a later call with the same --work goes on: stages DVC finds up to date keep their
record). ``--smoke``: the same on CPU with MedGemma's tokenizer and tiny sizes
(``medgemma.small_config``), ~10 minutes on two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# What the real run changes after `vqatune profile medgemma`, as `-S key=value` would. The
# profile's own values stay for everything else (nf4, LoRA on the MLP, batch 32, auto evaluation
# batch, 896 px, the seed guide's search space but for the accumulation below).
OVERRIDES = {
    "model.id": "{work}/medgemma-4b-random",      # a local folder: random weights, no hub
    "prepare.source": "synthetic",                 # Kvasir-like images drawn at prepare.image_size (896)
    "prepare.synthetic_images": 240,               # ~2,200 QA: 190 train / 50 test images
    "tune.n_trials": 2,
    "tune.sampler_startup_trials": 2,
    "tune.pruner_startup_trials": 1,
    "tune.max_steps": 4,                           # a trial: 4 optimizer steps, one evaluation
    "tune.evals_per_trial": 1,
    "tune.eval_rows": 32,
    "tune.search_space.gradient_accumulation_steps": {"kind": "categorical", "choices": [1, 2]},
    "train.max_steps": 8,
    "train.eval_steps": 4,
    "train.save_steps": 4,
    "train.max_eval_rows": 64,
    "evaluate.subset_size": 64,                    # 64 test rows x 7 configurations
    "evaluate.bertscore_model": "{work}/tiny-bert",  # a random BERT: the packaged MiniLM did not travel
    "export.agreement_rows": 4,                    # llama.cpp on the CPU: ~5 s a row at 4B and 896 px
}
# --smoke (CPU, tiny sizes): on top of OVERRIDES.
SMOKE = {
    "prepare.image_size": 224,                     # small_config's vision input
    "prepare.synthetic_images": 24,
    "prepare.num_proc": 1,
    "tune.max_steps": 1,
    "tune.eval_rows": 8,
    "train.max_steps": 2,
    "train.eval_steps": 2,
    "train.save_steps": 2,
    "train.batch_size": 4,
    "train.eval_batch_size": 4,
    "train.max_eval_rows": 8,
    "train.dataloader_num_workers": 0,
    "evaluate.subset_size": 8,
}
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "stages", "src", "configs")


# --------------------------------------------------------------------------- the world

def build_tiny_bert(out_dir: Path) -> Path:
    """A random 2-layer BERT with a small WordPiece vocabulary of the answers' words (BERTScore)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from vqatune.data.kvasir import ANSWER_VOCAB, QUESTIONS

    words = sorted({w for text in [*QUESTIONS, *(a for v in ANSWER_VOCAB.values() for a in v)]
                    for w in text.lower().replace(";", " ; ").replace("?", " ? ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list("abcdefghijklmnopqrstuvwxyz0123456789"), *words]
    vocab = list(dict.fromkeys(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # model_max_length: bert-score truncates to it (unset, it is 1e30 and the tokenizer overflows)
    BertTokenizer(str(out_dir / "vocab.txt"), model_max_length=512).save_pretrained(out_dir)
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(out_dir)
    return out_dir


def copy_pipeline(work: Path) -> Path:
    repo = work / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, repo / name)
    return repo


def use_converter(folder: Path) -> None:
    """Copy an installed llama.cpp converter to vqatune's default place, unless one is there (the
    export stage would otherwise fetch the sdist from PyPI)."""
    from vqatune.export.converter import default_converter_dir

    dest = default_converter_dir()
    if not (dest / ".sha256").is_file():
        try:
            shutil.copytree(folder, dest, dirs_exist_ok=True)
        except OSError as err:  # the export stage will say what is missing
            print(f"e2e: could not install the converter in {dest}: {err}", file=sys.stderr)


def apply_overrides(repo: Path, overrides: dict) -> list[str]:
    """Write dotted ``overrides`` into repo/params.yaml the way a profile is written (comments
    stay, every key must exist, the result is validated): a one-off profile `e2e-overrides`."""
    import yaml

    from vqatune.cli.profile import apply_profile

    overlay: dict = {}
    for dotted, value in overrides.items():
        node = overlay
        *parents, last = dotted.split(".")
        # search-space keys are dotted themselves (lora.r): only tune.search_space's first level nests
        if parents[:2] == ["tune", "search_space"]:
            parents, last = parents[:2], ".".join([*parents[2:], last])
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    (repo / "configs" / "profiles" / "e2e-overrides.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return apply_profile("e2e-overrides", repo / "params.yaml", repo)


def python_shim(work: Path) -> Path:
    """``python`` on PATH for dvc.yaml's commands: this interpreter (a wrapper, not a link, so a
    virtual environment's interpreter keeps its site-packages)."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def stage_env(work: Path, repo: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{python_shim(work)}{os.pathsep}{env.get('PATH', '')}"
    # The stages run the code DVC hashes (repo/src), whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc(args: list[str], repo: Path, env: dict, log=None, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if log is not None:
        log.write(f"$ dvc {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        log.flush()
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
    return proc


# --------------------------------------------------------------------------- measuring

class GpuMemory:
    """The card's used memory (GiB) through NVML, else nvidia-smi; None without a GPU."""

    def __init__(self):
        self.handle = None
        self.smi = None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        except Exception:
            self.smi = shutil.which("nvidia-smi")
            self.name = None

    def used_gib(self):
        if self.handle is not None:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30
        if self.smi:
            try:
                out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                return float(out.strip().splitlines()[0]) / 1024
            except Exception:
                return None
        return None


class Monitor(threading.Thread):
    """Polls the GPU's used memory and the RSS of a process tree until stopped; keeps the peaks."""

    def __init__(self, gpu: GpuMemory, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.gpu, self.pid, self.interval = gpu, pid, interval
        self.peak_gpu = None
        self.peak_rss = 0
        self.peak_single_rss = 0
        self.stopped = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stopped.is_set():
            used = self.gpu.used_gib()
            if used is not None:
                self.peak_gpu = used if self.peak_gpu is None else max(self.peak_gpu, used)
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_single_rss = max(self.peak_single_rss, rss)
            self.peak_rss = max(self.peak_rss, total)
            self.stopped.wait(self.interval)


def measured(cmd: list[str], cwd: Path, env: dict, gpu: GpuMemory, log) -> dict:
    """Run ``cmd`` with its output into ``log``; wall time, peaks, exit code."""
    baseline = gpu.used_gib()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    monitor = Monitor(gpu, proc.pid)
    monitor.start()
    rc = proc.wait()
    monitor.stopped.set()
    monitor.join()
    return {"rc": rc, "wall_s": round(time.perf_counter() - start, 1),
            "gpu_baseline_gib": None if baseline is None else round(baseline, 2),
            "peak_gpu_gib": None if monitor.peak_gpu is None else round(monitor.peak_gpu, 2),
            "peak_host_gib": round(monitor.peak_rss / 2**30, 2),
            "peak_host_process_gib": round(monitor.peak_single_rss / 2**30, 2)}


def disk_bytes(paths) -> int:
    seen, total = set(), 0
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            st = f.lstat()
            if (st.st_dev, st.st_ino) not in seen:  # DVC's cache hard links count once
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def stage_outputs(repo: Path, stage: str) -> list[str]:
    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def stage_summary(repo: Path, stage: str) -> dict:
    """A few numbers from the stage's own metrics file."""
    def load(name):
        path = repo / "metrics" / name
        return json.loads(path.read_text()) if path.is_file() else {}

    if stage == "prepare":
        m = load("prepare.json")
        return {k: m.get(k) for k in ("train_rows", "test_rows", "train_images", "test_images", "seconds") if k in m}
    if stage == "tune":
        m = load("tune.json")
        keep = ("n_trials", "complete", "pruned", "failed", "best_value", "seconds", "trials")
        return {k: m[k] for k in keep if k in m and not isinstance(m[k], (dict, list))}
    if stage == "train":
        m = load("train.json")
        return {k: m.get(k) for k in ("steps", "train_rows", "examples_per_s", "seconds", "peak_memory_gib",
                                      "compiled_layers", "trainable_params", "quantization", "device")}
    if stage == "evaluate":
        m = load("eval.json")
        gen = m.get("generation", {})
        configs = {}
        for name, v in m.items():  # {"majority": {...}, "tuned": {"none": {...}}, "image_ablation": {...}}
            if isinstance(v, dict) and "exact_match" in v:
                configs[name] = round(v["exact_match"], 3)
            elif isinstance(v, dict):
                configs.update({f"{name}/{mode}": round(s["exact_match"], 3) for mode, s in v.items()
                                if isinstance(s, dict) and "exact_match" in s})
        return {"exact_match": configs, **{k: gen.get(k) for k in (
            "batch_size", "batch_size_from", "peak_memory_gib", "examples_per_s", "test_rows") if k in gen}}
    if stage == "merge":
        m = load("merge.json")
        return {k: m[k] for k in m if k != "provenance" and not isinstance(m[k], (dict, list))}
    if stage == "export":
        m = load("export.json")
        return {k: m[k] for k in ("outtype", "text_tensors", "text_bytes", "mmproj_tensors", "mmproj_bytes",
                                  "text_max_abs_logit_diff", "text_max_abs_logit", "llama_cpp_mismatches",
                                  "seconds") if k in m}
    return {}


# --------------------------------------------------------------------------- llama.cpp

def ask_llama(repo: Path, work: Path, image: Path, question: str, gpu: "GpuMemory", log, timeout: float,
              env: dict | None = None) -> dict:
    """``question`` about ``image`` through llama.cpp on repo's exported pair (the product's client,
    ``vqatune/export/llama_cpp_client.py``, CPU), under the static prompt (the Modelfile's SYSTEM):
    the client's reply and the run's time and memory, or ``error``."""
    import yaml

    from vqatune.export.agreement import CLIENT, NOT_IMPORTABLE, llama_cpp_python

    deadline = time.time() + timeout
    python = llama_cpp_python()
    while python is None and time.time() < deadline:  # llama-cpp-python may still be building
        time.sleep(10)
        python = llama_cpp_python()
    if python is None:
        return {"error": NOT_IMPORTABLE}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    name, gguf = params["export"]["name"], repo / "models" / "gguf"
    cmd = [python, str(CLIENT), "--model", str(gguf / f"{name}.gguf"), "--mmproj", str(gguf / f"mmproj-{name}.gguf"),
           "--image", str(image), "--question", question, "--system", params["prompts"]["static"],
           "--max-tokens", "25"]
    answer_file = work / "llama_answer.json"
    with answer_file.open("w") as fh:
        stats = measured(cmd, repo, env or dict(os.environ), gpu, fh)
    rc = stats.pop("rc")
    lines = answer_file.read_text().strip().splitlines()
    if rc != 0 or not lines:
        log.write(answer_file.read_text())
        return {"error": f"llama_cpp_client exited {rc}: {lines[-1] if lines else ''}", **stats}
    reply = json.loads(lines[-1])
    return {"answer": reply["answer"], **stats,
            **{k: reply[k] for k in ("prompt_tokens", "completion_tokens", "llama_cpp_python") if k in reply}}


def llama_answer(repo: Path, work: Path, gpu: "GpuMemory", log, timeout: float) -> dict:
    """The first row the evaluate stage answered (tuned model, static prompt) asked again through
    llama.cpp, beside the evaluate stage's answer."""
    from datasets import load_from_disk

    from vqatune.export.agreement import agreement

    evaluated = [json.loads(line) for line in
                 (repo / "metrics" / "predictions" / "tuned_static.jsonl").read_text().splitlines() if line]
    row = evaluated[0]
    test = load_from_disk(str(repo / "data" / "processed"))["test"]
    index = next(i for i, (img, q) in enumerate(zip(test["img_id"], test["question"]))
                 if img == row["img_id"] and q == row["question"])
    pil = test[index]["image"]
    image = work / "llama_image.png"
    pil.convert("RGB").save(image)
    reply = ask_llama(repo, work, image, row["question"], gpu, log, timeout)
    if "error" in reply:
        return reply
    answer = reply.pop("answer")
    return {"question": row["question"], "image_px": list(pil.size), "reference": row.get("answer"),
            "llama_cpp_answer": answer, "evaluate_answer": row["prediction"],
            "same_as_evaluate": agreement([answer], [row])["gguf_agreement"] == 1.0, **reply}


# --------------------------------------------------------------------------- report

def card_slug(name: str) -> str:
    lower = name.lower()
    for key in ("h200", "h100", "a100", "l40s", "l4"):
        if key in lower:
            return key
    return "".join(c for c in lower if c.isalnum())[:16] or "cpu"


def write_report(out: Path, result: dict) -> None:
    slug = result["card_slug"]
    (out / f"e2e_{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The whole pipeline at MedGemma-4B size: `dvc repro`, stage by stage",
             "",
             f"Card: **{result['card']}**; {result['date']}; torch {result['versions'].get('torch')}, "
             f"transformers {result['versions'].get('transformers')}, dvc {result['versions'].get('dvc')}.",
             f"Model: {result['model']}. Profile `{result['profile']}` then the overrides below.",
             "",
             "| step | status | wall s | peak GPU GiB (card) | peak host GiB (tree / largest process) | outputs on disk |",
             "|---|---|---|---|---|---|"]
    for row in result["steps"]:
        gpu = "-" if row.get("peak_gpu_gib") is None else f"{row['peak_gpu_gib']:.2f}"
        size = "-" if row.get("output_bytes") is None else f"{row['output_bytes'] / 1e9:.2f} GB"
        lines.append(f"| {row['step']} | {row['status']} | {row.get('wall_s', '-')} | {gpu} | "
                     f"{row.get('peak_host_gib', '-')} / {row.get('peak_host_process_gib', '-')} | {size} |")
    lines += ["", "Per stage (from its own metrics file):", ""]
    for row in result["steps"]:
        if row.get("summary"):
            lines.append(f"- **{row['step']}**: `{json.dumps(row['summary'], ensure_ascii=False)}`")
    llama = result.get("llama_cpp")
    if llama:
        lines += ["", "## llama.cpp on the exported pair", ""]
        if "error" in llama:
            lines.append(f"Not run: {llama['error']}")
        else:
            lines += [f"- question: {llama['question']!r} (image {llama['image_px'][0]}x{llama['image_px'][1]} px, "
                      f"system prompt: prompts.static)",
                      f"- llama.cpp answered: {llama['llama_cpp_answer']!r} ({llama['wall_s']} s on CPU, "
                      f"loading included; {llama.get('prompt_tokens')} prompt tokens, image included)",
                      f"- the evaluate stage (tuned, static) answered: {llama['evaluate_answer']!r}; "
                      f"same: {llama['same_as_evaluate']}",
                      "- the weights are random: the answer's words mean nothing, only that the pair loads, "
                      "reads the image and decodes"]
    lines += ["", f"## Overrides after `vqatune profile {result['profile']}`", "", "```"]
    lines += [f"-S {k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in result["overrides"].items()]
    lines += ["```", "", f"Command: `{result['command']}`", ""]
    if result.get("dvc_status"):
        lines += [f"`dvc status` after the run: {result['dvc_status']}", ""]
    (out / f"e2e_{slug}.md").write_text("\n".join(lines))


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "dvc", "llama_cpp_python"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vqatune-e2e"))
    ap.add_argument("--smoke", action="store_true", help="CPU: MedGemma's tokenizer, tiny sizes")
    ap.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp question")
    ap.add_argument("--llama-wait", type=float, default=600, help="seconds to wait for llama-cpp-python")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no stage after this many seconds (a later call with the same --work goes on)")
    ap.add_argument("--profile", default="medgemma", choices=("medgemma", "medgemma-16gb"),
                    help="the committed profile applied before the overrides (medgemma-16gb: every stage "
                         "should stay at or under 15 GiB of the card)")
    ap.add_argument("--converter", type=Path, default=None,
                    help="an installed llama.cpp converter folder to use (copied to vqatune's default place)")
    args = ap.parse_args(argv)

    import vqatune  # noqa: F401  (pins the CPU numerics as the stages do)
    from medgemma import build_random_medgemma, small_config

    from vqatune.cli.profile import apply_profile

    started = time.perf_counter()
    out, work = args.out, args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = (out / "e2e_log.txt").open("a")
    state_path = work / "e2e_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"steps": []}
    gpu = GpuMemory()
    import torch

    card = gpu.name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    overrides = {k: v.format(work=work) if isinstance(v, str) else v
                 for k, v in {**OVERRIDES, **(SMOKE if args.smoke else {})}.items()}
    result = {"card": card, "card_slug": ("cpu-smoke" if args.smoke else card_slug(card))
              + ("_16gb" if args.profile == "medgemma-16gb" else ""),
              "date": time.strftime("%Y-%m-%d"), "versions": versions(),
              "model": "MedGemma-4B architecture (benchmarks/medgemma4b_config.json), random bf16 weights, "
                       "MedGemma's tokenizer shape" if not args.smoke else "medgemma.small_config() (tiny sizes)",
              "profile": args.profile, "overrides": overrides,
              "command": "python benchmarks/e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": state["steps"]}

    def record(row: dict) -> None:
        result["steps"] = [r for r in result["steps"] if r["step"] != row["step"]] + [row]
        state["steps"] = result["steps"]
        state_path.write_text(json.dumps(state, indent=1))
        write_report(out, result)
        print(f"e2e: {json.dumps(row)}", flush=True)

    if args.converter:
        use_converter(args.converter)

    # 1. the world: model, BERT, pipeline copy, params
    model_dir = Path(overrides["model.id"])
    repo = work / "repo"
    if not (repo / ".dvc").is_dir():
        start = time.perf_counter()
        if not (model_dir / "config.json").is_file():
            shutil.rmtree(model_dir, ignore_errors=True)
            build_random_medgemma(model_dir, config=small_config() if args.smoke else None)
        build_tiny_bert(Path(overrides["evaluate.bertscore_model"]))
        copy_pipeline(work)
        env = stage_env(work, repo)
        dvc(["init", "--no-scm", "-q"], repo, env, log)
        dvc(["config", "core.analytics", "false"], repo, env, log)
        dvc(["config", "cache.type", "hardlink,symlink"], repo, env, log)
        changed = apply_profile(args.profile, repo / "params.yaml", repo)
        changed_e2e = apply_overrides(repo, overrides)
        log.write(f"profile {args.profile} set {changed}\noverrides set {changed_e2e}\n")
        record({"step": "build (random model, BERT, params)", "status": "ok",
                "wall_s": round(time.perf_counter() - start, 1), "output_bytes": disk_bytes([model_dir])})
    env = stage_env(work, repo)

    import yaml

    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    wanted = stages if not args.stages else [s for s in stages if s in args.stages.split(",")]
    for stage in wanted:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"e2e: --budget-s {args.budget_s:.0f} spent; {stage} and later left for the next call", flush=True)
            break
        pending = json.loads(dvc(["status", "--json", stage], repo, env).stdout or "{}")
        if not pending and any(r["step"] == stage and r["status"] == "ok" for r in result["steps"]):
            print(f"e2e: {stage} up to date, kept", flush=True)
            continue
        log.write(f"\n===== dvc repro {stage}\n")
        log.flush()
        row = {"step": stage, **measured([sys.executable, "-m", "dvc", "repro", stage], repo, env, gpu, log)}
        row["status"] = "ok" if row.pop("rc") == 0 else "failed"
        row["output_bytes"] = disk_bytes(repo / p for p in stage_outputs(repo, stage))
        row["summary"] = stage_summary(repo, stage)
        record(row)
        if row["status"] != "ok":
            print(f"e2e: {stage} failed; see {out / 'e2e_log.txt'}", file=sys.stderr)
            return 1
        if stage == "base_model" and model_dir.is_dir():
            shutil.rmtree(model_dir)  # copied to models/base; the disk holds three 8.6 GB folders at most

    if set(wanted) == set(stages) or "export" in wanted:
        status = dvc(["status"], repo, env, log, check=False)
        result["dvc_status"] = " ".join((status.stdout + status.stderr).split())[:300]
    if not args.no_llama and (repo / "models" / "gguf").is_dir():
        llama = llama_answer(repo, work, gpu, log, args.llama_wait)
        result["llama_cpp"] = llama
        record({"step": "llama.cpp: one image question", "status": "ok" if "error" not in llama else "failed",
                **{k: llama[k] for k in ("wall_s", "peak_gpu_gib", "peak_host_gib", "peak_host_process_gib")
                   if k in llama}})
    write_report(out, result)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
