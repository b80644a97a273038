"""Data-parallel training (issue 9): the train stage on two processes through `accelerate launch`.

Two CPU processes over gloo stand in for two GPUs: the same code path (the stage relaunching
itself, DDP in the Trainer, only the main process writing) at the same global batch as one
process, which must give the same loss curve and adapter.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqatune.config import ConfigError, load_params
from vqatune.training import distributed

REPO = Path(__file__).resolve().parents[1]


def test_global_batch_is_kept_by_cutting_accumulation_first_then_the_batch():
    assert distributed.split_global_batch(16, 1, 1) == (16, 1)
    assert distributed.split_global_batch(32, 2, 2) == (32, 1)   # each GPU keeps its micro-batch
    assert distributed.split_global_batch(16, 4, 2) == (16, 2)
    assert distributed.split_global_batch(16, 1, 2) == (8, 1)    # nothing to cut: the batch splits
    assert distributed.split_global_batch(16, 2, 4) == (8, 1)    # both halve
    assert distributed.split_global_batch(3, 4, 2) == (3, 2)
    for batch, accumulation, processes in [(32, 2, 2), (16, 1, 2), (16, 2, 4), (6, 3, 2), (8, 6, 4)]:
        per_process, steps = distributed.split_global_batch(batch, accumulation, processes)
        assert per_process * steps * processes == batch * accumulation
    with pytest.raises(ConfigError, match="train.batch_size: 3 .* multiple of 2"):
        distributed.split_global_batch(3, 3, 2)


def test_number_of_processes_from_params_or_environment():
    assert distributed.resolve_num_processes(1, environ={}) == 1
    assert distributed.resolve_num_processes(4, environ={}) == 4
    assert distributed.resolve_num_processes(1, environ={distributed.ENV_NUM_PROCESSES: "2"}) == 2
    assert distributed.resolve_num_processes("auto", environ={}) == max(1, torch.cuda.device_count())
    with pytest.raises(ConfigError, match="VQATUNE_NUM_PROCESSES: 'two'"):
        distributed.resolve_num_processes(1, environ={distributed.ENV_NUM_PROCESSES: "two"})
    with pytest.raises(ConfigError, match="train.num_processes: 0 must be at least 1"):
        distributed.resolve_num_processes(0, environ={})


def test_launch_command_is_an_argument_list_with_the_committed_config():
    command = distributed.launch_command("stages/train.py", ["--out", "a b"], 2,
                                         config_file=REPO / "configs/accelerate/ddp.yaml")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-3:] == ["stages/train.py", "--out", "a b"]
    config = yaml.safe_load((REPO / "configs/accelerate/ddp.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_machines"] == 1


def test_the_launcher_returns_its_status_and_passes_sigterm_on_to_the_processes():
    """The stage's relaunch path, in the library: the launcher's exit status comes back, and a
    SIGTERM to the stage (made a KeyboardInterrupt) is sent on to the launched processes: 130."""
    import os
    import signal
    import threading
    import time

    assert distributed.run_launcher([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ)) == 3
    previous = signal.getsignal(signal.SIGTERM)
    try:
        distributed.interrupt_on_sigterm()
        start = time.monotonic()
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        assert distributed.run_launcher(sleeper, dict(os.environ)) == 130
        assert time.monotonic() - start < 30  # the child was stopped, not waited for
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(tmp_path: Path, name: str, model_dir, data_dir, processes: int) -> tuple[dict, dict, list]:
    params = load_params(REPO / "params.yaml")
    params["train"] = {**params["train"], "max_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2,
                       "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_eval_rows": 8,
                       "num_processes": processes, "lora": {**params["train"]["lora"], "dropout": 0.0}}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    out = folder / "adapter"
    argv = [sys.executable, str(REPO / "stages/train.py"), "--model", str(model_dir), "--data", str(data_dir),
            "--best-params", str(folder / "none.json"), "--out", str(out), "--metrics",
            str(folder / "train.json"), "--plots", str(folder / "plots"), "--checkpoints", str(folder / "ckpt"),
            "--params", str(folder / "params.yaml")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (folder / "adapter.tmp").exists() and not (folder / "adapter.partial").exists()
    metrics = json.loads((folder / "train.json").read_text())
    state = json.loads(max((folder / "ckpt").glob("*/checkpoint-*/trainer_state.json")).read_text())
    logs = [{k: h[k] for k in ("loss", "entropy", "mean_token_accuracy", "num_tokens")}
            for h in state["log_history"] if "loss" in h]
    return metrics, load_file(out / "adapter_model.safetensors"), logs


def test_two_processes_train_what_one_does_and_only_the_main_one_writes(tiny_model_dir, processed_dir, tmp_path):
    one, one_weights, one_logs = _train(tmp_path, "one", tiny_model_dir, processed_dir, 1)
    two, two_weights, two_logs = _train(tmp_path, "two", tiny_model_dir, processed_dir, 2)

    assert "(DDP)" in two["device"] and two["device"].startswith("2 x ") and "DDP" not in one["device"]
    assert one["steps"] == two["steps"] == 4 and one["train_rows"] == two["train_rows"]
    # Same global batch (one process: 2 rows x 2 accumulation steps; two: 2 rows each, no
    # accumulation), same order, no dropout: the curves and the adapter agree up to the order
    # of the gradient sums (gloo all-reduce vs one backward).
    assert len(one_logs) == len(two_logs) == 4
    for key in ("loss", "entropy", "mean_token_accuracy"):
        gap = max(abs(a[key] - b[key]) for a, b in zip(one_logs, two_logs))
        assert gap < 1e-3, (key, one_logs, two_logs)
    # The logged metrics cover the whole global batch (both processes' sums), not one process's half.
    assert [a["num_tokens"] for a in one_logs] == [b["num_tokens"] for b in two_logs]
    assert abs(one["eval_loss"] - two["eval_loss"]) < 1e-3
    assert one_weights.keys() == two_weights.keys()
    for key in one_weights:
        assert torch.allclose(one_weights[key], two_weights[key], atol=1e-4), key
    # Training moved the adapter (a check that could fail if the two runs did nothing alike).
    assert one_logs[0]["loss"] != one_logs[-1]["loss"]


@pytest.mark.slow
def test_sigterm_to_a_two_process_stage_leaves_a_partial_adapter_and_the_rerun_resumes(
        tiny_model_dir, processed_dir, tmp_path):
    """As DVC stops a stage: SIGTERM to `python stages/train.py` running two DDP processes."""
    import os
    import signal
    import time

    params = load_params(REPO / "params.yaml")
    params["train"] = {**params["train"], "max_steps": 40, "batch_size": 2, "eval_steps": 2, "save_steps": 2,
                       "logging_steps": 1, "max_eval_rows": 2, "num_processes": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, ckpt = tmp_path / "adapter", tmp_path / "ckpt"
    cmd = [sys.executable, str(REPO / "stages/train.py"), "--model", str(tiny_model_dir), "--data",
           str(processed_dir), "--best-params", str(tmp_path / "none.json"), "--out", str(out), "--metrics",
           str(tmp_path / "train.json"), "--plots", str(tmp_path / "curves"), "--checkpoints", str(ckpt),
           "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not list(ckpt.glob("*/checkpoint-4/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert list(ckpt.glob("*/checkpoint-4/trainer_state.json")) and not out.exists()
    # The main process saved what it had, marked partial; DVC saw a failed stage (130).
    assert (tmp_path / "adapter.partial" / "PARTIAL").exists(), err[-3000:]

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, "\n".join(l for l in rerun.stderr.splitlines() if "it/s" not in l)[-5000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed"] and metrics["resumed_from_step"] >= 4 and metrics["steps"] == 40
    assert "(DDP)" in metrics["device"] and (out / "adapter_model.safetensors").exists()


_DDP_COMPILE_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch._dynamo.backends import distributed as dynamo_ddp
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from peft import LoraConfig, get_peft_model
from vqatune.models.compile import compile_layers

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
splitters = []
original_init = dynamo_ddp.DDPOptimizer.__init__
def spy(self, *args, **kwargs):
    splitters.append(1)
    original_init(self, *args, **kwargs)
dynamo_ddp.DDPOptimizer.__init__ = spy
torch.manual_seed(0)
config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8)
model = get_peft_model(Gemma3ForCausalLM(config), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
layers = compile_layers(model, towers=("DecoderLayer",))
if sys.argv[1] == "ddp_optimizer":  # what Dynamo does by default
    torch._dynamo.config.optimize_ddp = True
ddp = torch.nn.parallel.DistributedDataParallel(model)
ids = torch.randint(0, 128, (2, 12))
ddp(input_ids=ids, labels=ids).loss.backward()
grads = sum(p.grad is not None for p in model.parameters() if p.requires_grad)
print(json.dumps({"layers": layers, "splitters": len(splitters), "grads": grads}))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["project", "ddp_optimizer"])
def test_compiled_layers_are_not_cut_into_buckets_under_ddp(mode):
    # Dynamo's DDPOptimizer cut each compiled MedGemma layer in two inside its MLP on every DDP
    # process (speed._compile_modules); the project turns it off. The default run shows the spy
    # does see it, so the project's zero is not a spy that never fires.
    port = "29571" if mode == "project" else "29572"
    done = subprocess.run([sys.executable, "-c", _DDP_COMPILE_SCRIPT, mode, port], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["layers"] == 2 and out["grads"] == 12  # 2 layers x 3 projections x (lora_A, lora_B)
    assert out["splitters"] == (0 if mode == "project" else 2)
