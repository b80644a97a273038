"""Faults and bad input: a process killed anywhere, a corrupt file, a bad config, a hostile path,
a full disk. Each test injects the fault and asserts what survives (everything that was complete)
and how the failure is reported (one line, naming the key or the path). docs/reliability.md lists
them with what is not covered yet."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest_dvc import SMALL_TOWER

from vqatune.training.checkpoints import checkpoint_problem, last_complete_checkpoint
from vqatune.training.run import run_training

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# Small enough for 2 CPU cores: 5 steps, a checkpoint every 2.
TRAIN = {"max_steps": 5, "batch_size": 4, "eval_batch_size": 8, "gradient_accumulation_steps": 1,
         "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_eval_rows": 8, "warmup": 0.0,
         "early_stopping_patience": 0, "save_total_limit": 5}


def train_config():
    from vqatune.config import section
    from vqatune.training.config import TrainConfig, apply_overrides

    return apply_overrides(section(good_params(), "train", TrainConfig), TRAIN)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


def killed(script: str, argv: list[str], fault: str, cwd: Path) -> subprocess.CompletedProcess:
    """``stages/<script>`` as its own process (forked: conftest_fork) with the fault point
    ``fault`` armed (vqatune.faults); it must die by SIGKILL."""
    from conftest_fork import run_stage_forked

    proc = run_stage_forked(script, argv, cwd=cwd, env={"VQATUNE_FAULT": fault})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


# --------------------------------------------------------------------------------------
# 1. A kill while a checkpoint is written; corrupt checkpoint files
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, processed_dir, tmp_path_factory):
    """An uninterrupted 5-step run: its adapter and its checkpoints 2, 4 and 5 (the end)."""
    tmp = tmp_path_factory.mktemp("whole")
    result = run_training(train_config(), tiny_model_dir, processed_dir, tmp / "adapter",
                          checkpoint_dir=tmp / "ckpt")
    run_dir = Path(result.checkpoint_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    return result, tmp / "adapter", run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    """Checkpoints 2 and 4 of the whole run (the last, 5, left out: 4 is the newest)."""
    return shutil.copytree(run_dir, dest, ignore=lambda _, names: [n for n in names if n == "checkpoint-5"])


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous_one(
        whole_run, tiny_model_dir, processed_dir, tmp_path, caplog):
    whole, whole_adapter, _ = whole_run
    ckpt = tmp_path / "ckpt"
    from conftest_fork import run_forked

    proc = run_forked(lambda: run_training(train_config(), tiny_model_dir, processed_dir, tmp_path / "killed",
                                           checkpoint_dir=ckpt) and None,
                      cwd=tmp_path, env={"VQATUNE_FAULT": "checkpoint-write:4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (run_dir,) = ckpt.iterdir()
    torn = run_dir / "checkpoint-4" / "trainer_state.json"
    assert torn.exists() and torn.stat().st_size > 0
    with pytest.raises(ValueError):
        json.loads(torn.read_text())            # the old check (the file exists) would resume this
    assert not (tmp_path / "killed").exists()  # no adapter claimed done

    with caplog.at_level(logging.WARNING, logger="vqatune.training.checkpoints"):
        resumed = run_training(train_config(), tiny_model_dir, processed_dir, tmp_path / "resumed",
                               checkpoint_dir=ckpt)
    lines = [r.getMessage() for r in caplog.records if "incomplete or corrupt" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint-4" in lines[0] and "resuming from checkpoint-2" in lines[0], lines
    assert resumed.resumed and resumed.resumed_from_step == 2 and resumed.steps == whole.steps == 5
    a, b = adapter_tensors(whole_adapter), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size // 4)))


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("file", ["trainer_state.json", "adapter_model.safetensors", "optimizer.pt",
                                  "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("damage", [_truncate, _garbage, _delete], ids=["truncated", "garbage", "missing"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(whole_run, tmp_path, caplog, file, damage):
    _, _, run_dir = whole_run
    copy = copy_run(run_dir, tmp_path / "run")
    assert checkpoint_problem(copy / "checkpoint-4") is None
    if damage is _delete and file in ("scheduler.pt", "rng_state.pth"):
        pytest.skip("the trainer resumes without them (it warns)")
    damage(copy / "checkpoint-4" / file)
    assert checkpoint_problem(copy / "checkpoint-4") is not None
    with caplog.at_level(logging.WARNING, logger="vqatune.training.checkpoints"):
        assert last_complete_checkpoint(copy, discard=True) == copy / "checkpoint-2"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "checkpoint-4" in line and file.split("_")[0].split(".")[0] in line and "resuming from checkpoint-2" in line
    assert not (copy / "checkpoint-4").exists()  # deleted: rotation and the next resume never see it
    assert (copy / "checkpoint-2" / "optimizer.pt").exists()


def test_every_checkpoint_corrupt_starts_over_and_says_so(whole_run, tmp_path, caplog):
    _, _, run_dir = whole_run
    copy = copy_run(run_dir, tmp_path / "run")
    _truncate(copy / "checkpoint-4" / "adapter_model.safetensors")
    (copy / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')
    with caplog.at_level(logging.WARNING, logger="vqatune.training.checkpoints"):
        assert last_complete_checkpoint(copy) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("starting over" in line for line in lines), lines


# --------------------------------------------------------------------------------------
# 2. Bad configuration: one line naming the key (or the file and line), exit code 2
# --------------------------------------------------------------------------------------

STAGE_NAMES = ["base_model", "prepare", "tune", "train", "evaluate", "merge", "export"]


def good_params() -> dict:
    """params.yaml on one thread: stages here run forked (conftest_fork keeps a child at one) and
    in this process, and both must compute the same bits."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["cpu_threads"] = params["evaluate"]["cpu_threads"] = 1
    return params


def with_value(dotted: str, value) -> dict:
    params = good_params()
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return params


def run_stage(name: str, params_file: Path, capsys, tmp_path: Path) -> tuple[int, list[str]]:
    from conftest_stages import load_stage

    argv = ["--params", str(params_file)]
    if name == "prepare":  # never write the repo's data/
        argv += ["--out", str(tmp_path / "processed"), "--metrics", str(tmp_path / "prepare.json")]
    code = load_stage(name).main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


MALFORMED = [
    ("unclosed", "model:\n  id: builtin-tiny-gemma3\ntrain:\n  batch_size: [4, 8\n  epochs: 1\n", 5),
    ("tab", "model:\n\tid: x\n", 2),
    ("bad-indent", "train:\n  batch_size: 4\n epochs: 1\n", 3),
]


@pytest.mark.parametrize("stage", STAGE_NAMES)
@pytest.mark.parametrize("case, text, line", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_params_yaml_is_one_line_naming_file_and_line(stage, case, text, line, tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    code, err = run_stage(stage, bad, capsys, tmp_path)
    assert code == 2 and len(err) == 1, err
    assert f"{bad}:{line}:" in err[0] and "malformed YAML" in err[0] and "Traceback" not in err[0]


def test_params_that_are_not_utf8_are_a_config_error(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(b"model:\n  id: caf\xe9\n")
    code, err = run_stage("base_model", bad, capsys, tmp_path)
    assert code == 2 and len(err) == 1 and "not UTF-8" in err[0] and str(bad) in err[0], err


BAD_VALUES = [  # (stage that reads it, key, value, what the line must say)
    ("train", "train.batch_size", 0, r"train\.batch_size: must be a positive integer"),
    ("train", "train.batch_size", "four", r"train\.batch_size: expected an integer"),
    ("train", "train.learning_rate", -1e-4, r"train\.learning_rate: must be positive"),
    ("train", "train.max_steps", 0, r"train\.max_steps: must be -1"),
    ("train", "train.prompt_mode", "fancy", r"train\.prompt_mode: 'fancy' is not allowed"),
    ("train", "train.lora.r", 0, r"train\.lora\.r: must be a positive integer"),
    ("train", "train.bach_size", 4, r"train\.bach_size: unknown key"),
    ("tune", "tune.n_trials", 0, r"tune\.n_trials: must be at least 1"),
    ("tune", "tune.n_trials", -3, r"tune\.n_trials: must be at least 1"),
    ("evaluate", "evaluate.max_new_tokens", 0, r"evaluate\.max_new_tokens: must be at least 1"),
    ("base_model", "model.tiny_layers", 0, r"model\.tiny_layers: must be at least 1"),
    ("base_model", "model.tiny_hidden_size", -64, r"model\.tiny_hidden_size: must be a multiple of 16"),
    ("base_model", "model.tiny_vision_pretraining_scenes", 10,
     r"model\.tiny_vision_pretraining_scenes: must be 0 \(a random tower\) or at least 64"),
    ("base_model", "model.tiny_image_size", 0, r"model\.tiny_image_size"),
    ("base_model", "model.tiny_vision_tower", "downloaded", r"model\.tiny_vision_tower: must be bundled .* or pretrain"),
    # the bundled tower fits the committed sizes only; another size says what to do instead
    ("base_model", "model.tiny_vision_hidden_size", 32,
     r"model\.tiny_vision_tower: .*hidden_size 64.*hidden_size 32.*set model\.tiny_vision_tower: pretrain"),
    ("prepare", "prepare.image_size", 0, r"prepare\.image_size: must be at least 16"),
    ("prepare", "prepare.max_image_pixels", -1, r"prepare\.max_image_pixels: must be positive"),
    ("prepare", "prepare.synthetic_images", "many", r"prepare\.synthetic_images: expected an integer"),
    ("merge", "merge.verify_rtol", 0, r"merge\.verify_rtol: must be a positive number"),
    ("export", "export.name", "Bad Name!", r"export\.name"),
    ("train", "train", [1, 2], r"train: expected a mapping"),
]


@pytest.mark.parametrize("stage, key, value, message", BAD_VALUES,
                         ids=[f"{k}={v!r}" for _, k, v, _ in BAD_VALUES])
def test_a_bad_value_stops_the_stage_with_one_line_naming_the_key(stage, key, value, message, tmp_path, capsys):
    import re

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_value(key, value)))
    code, err = run_stage(stage, params, capsys, tmp_path)
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_a_missing_local_dataset_path_is_named_before_any_work(source, tmp_path, capsys):
    import yaml

    params = with_value("prepare.source", source)
    params["prepare"]["path"] = str(tmp_path / "nowhere")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_stage("prepare", tmp_path / "params.yaml", capsys, tmp_path)
    assert code == 2 and len(err) == 1 and "prepare.path" in err[0] and "nowhere" in err[0], err
    assert not (tmp_path / "processed").exists() and not (tmp_path / "prepare.json").exists()


# --------------------------------------------------------------------------------------
# 3. Paths that leave the dataset or batch folder: `..`, absolute, a symlink leading out
# --------------------------------------------------------------------------------------

def _png(path: Path, shape=(40, 48, 3), seed=0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)
    return path


def test_imagefolder_refuses_paths_leaving_the_folder_and_counts_them(tmp_path):
    from vqatune.config import PrepareConfig
    from vqatune.data.prepare import prepare_dataset
    from vqatune.prompts import PromptsConfig

    folder, outside = tmp_path / "ds", tmp_path / "secret"
    folder.mkdir(), outside.mkdir()
    secret = _png(outside / "secret.png")
    for i in range(6):
        _png(folder / f"ok{i}.png", seed=i)
    (folder / "link_out.png").symlink_to(secret)                  # a symlink leading out
    (folder / "link_in.png").symlink_to(folder / "ok0.png")       # a symlink staying inside: fine
    names = [f"ok{i}.png" for i in range(6)] + ["link_in.png", "../secret/secret.png", str(secret),
                                                 str(folder / "ok1.png"), "link_out.png"]
    lines = ["file_name,question,answer,img_id"] + [f"{n},How many polyps?,{i},img{i}" for i, n in enumerate(names)]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(source="imagefolder", path=str(folder), test_size=0.3)
    stats = prepare_dataset(cfg, PromptsConfig(), tmp_path / "out")
    # `..`, the absolute path outside, the absolute path inside (metadata paths are relative) and the link out.
    assert stats["dropped"]["unsafe_path"] == 4, stats["dropped"]
    assert stats["rows_in"] == 11 and sum(stats["rows_out"].values()) == 7


@pytest.fixture(scope="module")
def ask_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ask")
    _png(folder / "a.png")
    return folder


def ask(capsys, model_dir, *args, params=None) -> tuple[int, str, str]:
    from vqatune.cli.main import main

    code = main(["ask", "--params", str(params or REPO / "params.yaml"), "--model", str(model_dir),
                 "--max-new-tokens", "3", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_batch_refuses_image_paths_leaving_its_folder(ask_dir, tiny_model_dir, tmp_path, capsys):
    from vqatune.cli.ask import EXIT_ROWS

    batch_dir, outside = tmp_path / "batch", tmp_path / "outside"
    batch_dir.mkdir(), outside.mkdir()
    secret = _png(outside / "secret.png")
    shutil.copy(ask_dir / "a.png", batch_dir / "a.png")
    (batch_dir / "link_out.png").symlink_to(secret)
    (batch_dir / "link_in.png").symlink_to(batch_dir / "a.png")
    rows = [("ok", "a.png"), ("dotdot", "../outside/secret.png"), ("absolute", str(secret)),
            ("link_out", "link_out.png"), ("link_in", "link_in.png")]
    (batch_dir / "q.jsonl").write_text("".join(json.dumps({"id": i, "image": p, "question": "How many polyps?"})
                                               + "\n" for i, p in rows))
    code, out, err = ask(capsys, tiny_model_dir, "--batch", str(batch_dir / "q.jsonl"))
    got = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert code == EXIT_ROWS and "2 of 5 rows answered, 3 with an error" in err, err
    for refused in ("dotdot", "absolute", "link_out"):
        assert got[refused]["answer"] is None and "leaves the batch file's folder" in got[refused]["error"]
    assert got["ok"]["error"] is None and got["link_in"]["error"] is None
    assert got["ok"]["answer"] == got["link_in"]["answer"]


# --------------------------------------------------------------------------------------
# 4. Bad input to `vqatune ask`: a clear one-line error (single) or a row error (batch)
# --------------------------------------------------------------------------------------

def error_lines(stderr: str) -> list[str]:
    """stderr without transformers' progress bars (loading the weights draws one)."""
    import re

    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and "it/s]" not in line]


BAD_QUESTIONS = [
    ("whitespace", " \t\n ", "the question is empty"),
    ("100k characters", "How many polyps? " * 6000, "the model's context is 2048 tokens"),
    ("NUL", "How many\x00 polyps?", "control character '\\x00'"),
    ("escape sequence", "How many \x1b[2J polyps?", "control character '\\x1b'"),
]


@pytest.mark.parametrize("case, question, message", BAD_QUESTIONS, ids=[b[0] for b in BAD_QUESTIONS])
def test_a_bad_question_is_one_line_with_its_exit_code(case, question, message, ask_dir, tiny_model_dir, capsys):
    from vqatune.cli.ask import EXIT_QUESTION

    code, out, err = ask(capsys, tiny_model_dir, "--image", str(ask_dir / "a.png"), "--question", question)
    assert code == EXIT_QUESTION and out == "" and len(error_lines(err)) == 1 and message in err, err
    assert "Traceback" not in err


def test_bad_images_are_one_line_errors(ask_dir, tiny_model_dir, tmp_path, capsys):
    import yaml

    from vqatune.cli.ask import EXIT_IMAGE

    (tmp_path / "notes.png").write_text("these are my notes, not an image\n")
    code, out, err = ask(capsys, tiny_model_dir, "--image", str(tmp_path / "notes.png"), "--question", "How many?")
    assert code == EXIT_IMAGE and out == "" and "cannot be used (undecodable image)" in err and err.count("\n") == 1
    code, _, err = ask(capsys, tiny_model_dir, "--image", str(tmp_path), "--question", "How many?")
    assert code == EXIT_IMAGE and "not found" in err and err.count("\n") == 1  # a folder, not a file
    # A decompression bomb: more pixels than prepare.max_image_pixels (PIL's limit; here lowered
    # so the bomb is small: a 40x48 image against a 500-pixel limit).
    params = good_params()
    params["prepare"]["max_image_pixels"] = 500
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, out, err = ask(capsys, tiny_model_dir, "--image", str(ask_dir / "a.png"), "--question", "How many?",
                         params=tmp_path / "params.yaml")
    assert code == EXIT_IMAGE and out == "" and "decompression bomb" in err and err.count("\n") == 1, err


def test_a_batch_answers_its_good_rows_around_bad_input(ask_dir, tiny_model_dir, tmp_path, capsys):
    from vqatune.cli.ask import EXIT_ROWS

    shutil.copy(ask_dir / "a.png", tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not an image")
    rows = [("good1", "a.png", "How many polyps?"), ("blank", "a.png", "   "),
            ("huge", "a.png", "x" * 100_000), ("ctrl", "a.png", "How\x07 many?"),
            ("notimage", "notes.png", "How many?"), ("good2", "a.png", "Is there a polyp?")]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": i, "image": p, "question": q}) + "\n"
                                              for i, p, q in rows))
    code, out, err = ask(capsys, tiny_model_dir, "--batch", str(tmp_path / "q.jsonl"), "--batch-size", "2")
    got = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_ROWS and "2 of 6 rows answered, 4 with an error" in err and "Traceback" not in err
    assert [r["id"] for r in got] == [r[0] for r in rows]
    assert [r["answer"] is not None for r in got] == [True, False, False, False, False, True]
    assert "empty" in got[1]["error"] and "the model's context is 2048 tokens" in got[2]["error"]
    assert "control character" in got[3]["error"] and "undecodable" in got[4]["error"]


def test_a_batch_file_that_is_not_utf8_is_one_line(tiny_model_dir, tmp_path, capsys):
    from vqatune.cli.ask import EXIT_BATCH

    (tmp_path / "q.csv").write_bytes(b"image,question\na.png,Combien de polypes \xe0 l'image?\n")
    code, out, err = ask(capsys, tiny_model_dir, "--batch", str(tmp_path / "q.csv"))
    assert code == EXIT_BATCH and out == "" and err.count("\n") == 1 and "cannot be read" in err, err
    assert "utf-8" in err.lower()


# --------------------------------------------------------------------------------------
# 5. A full disk: RLIMIT_FSIZE in the stage's process, SIGXFSZ ignored so writes fail with EFBIG
# --------------------------------------------------------------------------------------

def run_with_disk_limit(script: str, args: list[str], limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """The stage as its own process (forked: conftest_fork) under RLIMIT_FSIZE, SIGXFSZ ignored."""
    from conftest_fork import run_stage_forked

    return run_stage_forked(script, args, cwd=cwd, file_limit=limit_bytes)


def assert_one_line_disk_error(proc, stage: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    import re

    # (progress bars on stderr end without a newline: the line may follow one)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "\n", proc.stderr)  # cursor moves of progress bars
    mine = re.findall(rf"(?<![.\w]){stage}: cannot write[^\r\n]*", text)
    assert len(mine) == 1, proc.stderr[-600:]
    last = mine[0]
    assert last.startswith(f"{stage}: cannot write") and "disk full or file-size limit" in last, last
    return last


def test_prepare_on_a_full_disk_fails_in_one_line_and_leaves_no_output(tmp_path):
    out, metrics = tmp_path / "processed", tmp_path / "prepare.json"
    proc = run_with_disk_limit("prepare.py", ["--out", str(out), "--metrics", str(metrics), "--params",
                                              str(REPO / "params.yaml")], 256 * 1024, tmp_path)
    line = assert_one_line_disk_error(proc, "prepare")
    assert "File too large" in line and str(out) in line  # names the output it could not write
    assert not out.exists() and not metrics.exists()           # nothing DVC would take as done


def test_train_on_a_full_disk_fails_in_one_line_and_the_rerun_completes(tiny_model_dir, processed_dir, tmp_path):
    import yaml

    params = good_params()
    params["train"] = {**params["train"], **TRAIN, "max_steps": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, metrics, ckpt = tmp_path / "adapter", tmp_path / "train.json", tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--data", str(processed_dir), "--best-params",
            str(tmp_path / "none.json"), "--out", str(out), "--metrics", str(metrics), "--plots",
            str(tmp_path / "curves"), "--checkpoints", str(ckpt), "--params", str(tmp_path / "params.yaml")]
    proc = run_with_disk_limit("train.py", args, 16 * 1024, tmp_path)
    line = assert_one_line_disk_error(proc, "train")
    assert str(out) in line or str(ckpt) in line, line
    assert list(ckpt.glob("*/checkpoint-*")), "the limit should hit the first checkpoint"
    assert not out.exists() and not metrics.exists()
    # The half-written checkpoint is never resumed: the rerun (disk freed) starts over and finishes.
    from conftest_fork import run_stage_forked

    proc = run_stage_forked("train.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "incomplete or corrupt" in proc.stderr and "starting over" in proc.stderr
    assert json.loads(metrics.read_text())["steps"] == 4 and (out / "adapter_model.safetensors").exists()


def test_merge_on_a_full_disk_fails_in_one_line_and_leaves_no_output(tiny_model_dir, tmp_path):
    from conftest_adapters import make_perturbed_adapter

    adapter = make_perturbed_adapter(tiny_model_dir, tmp_path / "adapter")
    out, metrics = tmp_path / "merged", tmp_path / "merge.json"
    proc = run_with_disk_limit("merge.py", ["--base", str(tiny_model_dir), "--adapter", str(adapter), "--out",
                                            str(out), "--metrics", str(metrics), "--params",
                                            str(REPO / "params.yaml")], 64 * 1024, tmp_path)
    assert str(out) in assert_one_line_disk_error(proc, "merge")
    assert not out.exists() and not metrics.exists()


def test_export_on_a_full_disk_fails_in_one_line_and_leaves_no_output(merged_dir, tmp_path):
    from vqatune.export.converter import install_converter

    install_converter()  # before the limit: unpacking the converter writes files too
    out, metrics = tmp_path / "gguf", tmp_path / "export.json"
    proc = run_with_disk_limit("export.py", ["--merged", str(merged_dir), "--out", str(out), "--metrics",
                                             str(metrics), "--params", str(REPO / "params.yaml")],
                               256 * 1024, tmp_path)
    line = assert_one_line_disk_error(proc, "export")
    assert str(out) in line or f".{out.name}.partial" in line, line
    assert not out.exists() and not metrics.exists()


# --------------------------------------------------------------------------------------
# 6. SIGKILL while prepare, merge or export writes its output; then the stage again
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_params(tmp_path_factory) -> Path:
    """params.yaml with prepare shrunk to 12 synthetic images and export's GGUF reload check off
    (seconds, not minutes)."""
    import yaml

    params = good_params()
    params["prepare"]["synthetic_images"] = 12
    params["export"]["verify"] = False
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def stage_inputs(tiny_model_dir, merged_dir, small_params) -> dict:
    """Each killable stage's argv but --out and --metrics."""
    adapter = merged_dir.parent / "adapter"
    return {"prepare": ["--params", str(small_params)],
            "merge": ["--base", str(tiny_model_dir), "--adapter", str(adapter), "--params", str(small_params)],
            "export": ["--merged", str(merged_dir), "--params", str(small_params)]}


# Where each stage is killed: its largest staging file half written, just before the rename; for
# export, once the text GGUF is written and before the converter's second run (mmproj), which
# spares the test one conversion (~6 s of CPU: the converter imports torch afresh).
STAGE_WRITE_FAULTS = {"prepare": "prepare-write", "merge": "merge-write", "export": "export-text-write"}


@pytest.mark.parametrize("stage", list(STAGE_WRITE_FAULTS))
def test_sigkill_while_a_stage_writes_its_output_leaves_nothing_done_and_the_rerun_matches(
        stage, stage_inputs, tmp_path):
    from conftest_metrics import without_run_measures
    from conftest_stages import load_stage

    from vqatune.provenance import fingerprint

    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    argv = [*stage_inputs[stage], "--out", str(out), "--metrics", str(metrics)]
    # The uninterrupted run, moved aside: the others write to the same paths (the metrics name them).
    assert load_stage(stage).main(argv) == 0
    whole = fingerprint(out), without_run_measures(json.loads(metrics.read_text()))
    shutil.rmtree(out), metrics.unlink()

    killed(f"{stage}.py", argv, STAGE_WRITE_FAULTS[stage], tmp_path)
    assert not out.exists() and not metrics.exists()   # nothing DVC would take as done
    (staging,) = [p for p in tmp_path.iterdir() if p.name not in ("out", "metrics.json")]
    assert staging.name in ("out.tmp", ".out.partial"), staging  # the half-written staging folder

    assert load_stage(stage).main(argv) == 0           # the rerun
    assert not staging.exists()
    assert (fingerprint(out), without_run_measures(json.loads(metrics.read_text()))) == whole


# --------------------------------------------------------------------------------------
# 7. DVC: two `dvc repro` in one checkout; a corrupt object in .dvc/cache
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dvc_clone(tmp_path_factory) -> tuple[Path, dict]:
    """A clone of this working tree with prepare shrunk to 12 images and a local-folder remote."""
    import yaml

    from conftest_dvc import clone_working_tree, dvc_env

    root = tmp_path_factory.mktemp("dvc")
    env = {**dvc_env(), **child_env()}
    clone = clone_working_tree(root / "clone", env)
    env["PYTHONPATH"] = str(clone / "src")  # the stages run the clone's code
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["prepare"]["synthetic_images"] = 12
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["dvc", "remote", "modify", "--local", "backup", "url", str(root / "remote")],
                ["git", "commit", "-qam", "small prepare"]):
        subprocess.run(cmd, cwd=clone, env=env, check=True, capture_output=True)
    return clone, env


def dvc(clone: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_a_second_dvc_repro_is_refused_by_the_lock_and_the_first_is_unharmed(dvc_clone, tmp_path):
    import time

    from vqatune.provenance import fingerprint

    clone, env = dvc_clone
    release = tmp_path / "release"
    first = subprocess.Popen(["dvc", "repro", "prepare"], cwd=clone, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**env, "VQATUNE_FAULT": f"pause-prepare-write:{release}"})
    try:
        deadline = time.monotonic() + 300
        while not release.with_name("release.waiting").exists():  # held just before its rename
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-2000:]
            time.sleep(0.1)
        second = dvc(clone, env, "repro", "prepare", check=False)
        assert second.returncode != 0
        # DVC's read-write lock on the stage's outputs names the process holding them.
        assert "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr, \
            second.stderr
        assert "Running stage" not in second.stdout
    finally:
        release.touch()
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert "Running stage 'prepare'" in out
    # Unharmed: its outputs are the lock's, and a stage run outside DVC writes the same data.
    assert "Data and pipelines are up to date" in dvc(clone, env, "status", "prepare").stdout
    from conftest_stages import load_stage

    assert load_stage("prepare").main(["--params", str(clone / "params.yaml"), "--out", str(tmp_path / "processed"),
                                       "--metrics", str(tmp_path / "prepare.json")]) == 0
    assert fingerprint(clone / "data/processed") == fingerprint(tmp_path / "processed")


def _largest_cached_file(clone: Path, out: str) -> Path:
    """The cache object of the largest file of a DVC output folder (from dvc.lock and its .dir)."""
    import yaml

    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    dir_md5 = next(o["md5"] for s in lock.values() for o in s.get("outs", []) if o["path"] == out)
    md5 = Path(clone / ".dvc/cache/files/md5")
    objects = [md5 / e["md5"][:2] / e["md5"][2:] for e in json.loads((md5 / dir_md5[:2] / dir_md5[2:]).read_text())]
    return max(objects, key=lambda p: p.stat().st_size)


def _damage(obj: Path, keep_stat: bool) -> None:
    """Overwrite 64 bytes in the middle: like a tool writing through (the file made writable, a
    new mtime) or, ``keep_stat``, like bit rot (mode and mtime as they were)."""
    st = obj.stat()
    obj.chmod(0o644)
    with obj.open("r+b") as fh:
        fh.seek(st.st_size // 2)
        fh.write(os.urandom(64))
    if keep_stat:
        os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))
        obj.chmod(st.st_mode)


def test_a_corrupt_dvc_cache_object_is_fetched_again_from_the_remote(dvc_clone):
    from vqatune.dvc_cache import corrupt_objects
    from vqatune.dvc_cache import main as check_cache
    from vqatune.provenance import fingerprint

    clone, env = dvc_clone
    dvc(clone, env, "repro", "prepare")  # (up to date when the lock test ran first)
    dvc(clone, env, "push", "prepare")
    good = fingerprint(clone / "data/processed")
    obj = _largest_cached_file(clone, "data/processed")

    # Written through: DVC re-hashes the object, deletes it and `dvc pull` fetches it again.
    _damage(obj, keep_stat=False)
    shutil.rmtree(clone / "data/processed")
    pulled = dvc(clone, env, "pull", "prepare")
    assert "1 file fetched" in pulled.stdout, pulled.stdout
    assert fingerprint(clone / "data/processed") == good and corrupt_objects(clone / ".dvc/cache") == []

    # Bit rot (mode and mtime kept): no DVC command notices; `dvc pull` would check the damage
    # out. vqatune.dvc_cache finds it, removes it, and `dvc fetch` + `dvc checkout` recover.
    _damage(obj, keep_stat=True)
    assert "Data and pipelines are up to date" in dvc(clone, env, "status", "prepare").stdout
    assert corrupt_objects(clone / ".dvc/cache") == [obj]
    cwd = os.getcwd()
    os.chdir(clone)
    try:
        assert check_cache(["--remove"]) == 1 and not obj.exists()
    finally:
        os.chdir(cwd)
    assert "1 file fetched" in dvc(clone, env, "fetch", "prepare").stdout
    shutil.rmtree(clone / "data/processed")
    dvc(clone, env, "checkout", "prepare")
    assert fingerprint(clone / "data/processed") == good and corrupt_objects(clone / ".dvc/cache") == []


# --------------------------------------------------------------------------------------
# 8. A search worker SIGKILLed mid-trial on a PostgreSQL study (another machine's worker)
# --------------------------------------------------------------------------------------

def test_a_dead_workers_trial_on_postgresql_is_run_again_after_the_heartbeat_grace(tmp_path, postgres_url):
    import datetime
    import time

    import optuna

    from conftest_search import finish, start_worker

    from vqatune.config import build
    from vqatune.search.config import TuneConfig
    from vqatune.search.study import open_study
    from vqatune.search.workers import trial_counts

    grace = 3
    open_study(build(TuneConfig, {"storage": postgres_url}, "tune"), "shared")
    # On another machine: this host cannot see its pid die, only its heartbeat stop.
    dead = start_worker(tmp_path, postgres_url, 3, 600, 0, grace_seconds=grace, host="elsewhere")
    deadline = time.monotonic() + 120
    while not optuna.load_study(study_name="shared", storage=postgres_url).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        assert dead.poll() is None and time.monotonic() < deadline, "the worker never started a trial"
        time.sleep(0.2)
    dead.kill()
    dead.wait()
    killed_at = datetime.datetime.now()

    alive = start_worker(tmp_path, postgres_url, 3, 0.1, 1, grace_seconds=grace)
    finish(alive)
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    (abandoned,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert abandoned.user_attrs["worker"]["host"] == "elsewhere"
    assert "fail_reason" not in abandoned.user_attrs  # failed by its stale heartbeat, not by pid
    assert (abandoned.datetime_complete - killed_at).total_seconds() >= grace - 1  # (1 s: the last beat)
    counts = trial_counts(study)
    assert counts["complete"] == 3 and counts["abandoned"] == 1 and counts["failed"] == counts["running"] == 0
    # Its slot ran again on the live worker, after it was failed.
    rerun = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_start)
    assert rerun.user_attrs["worker"]["pid"] == alive.pid and rerun.datetime_start >= abandoned.datetime_complete


def test_a_question_is_limited_by_the_models_context_in_tokens(ask_dir, tiny_model_dir, capsys):
    """Refused exactly when prompt + image + question + answer tokens exceed the context (the tiny
    model's 2048): the longest question that fits is answered, one word more is refused."""
    import re

    from vqatune.cli.ask import EXIT_QUESTION

    def asked(words: int):
        return ask(capsys, tiny_model_dir, "--image", str(ask_dir / "a.png"), "--question", "polyp " * words)

    code, _, err = asked(5000)
    assert code == EXIT_QUESTION and len(error_lines(err)) == 1, err
    question, room = map(int, re.search(r"the question is (\d+) tokens; .* leaves (\d+) for the question", err).groups())
    assert question > room > 1000  # thousands of characters fit: the old 2000-character cap is gone
    per_word = question / 5000
    fits = int(room / per_word)
    code, out, err = asked(fits)
    assert code == 0 and out.strip() and error_lines(err) == [], err
    code, _, err = asked(fits + 1)
    assert code == EXIT_QUESTION and f"leaves {room} for the question" in err, err


# --------------------------------------------------------------------------------------
# 9. Damaged inputs to evaluate and ask: one line naming the file and how to restore it
# --------------------------------------------------------------------------------------

DAMAGED_MODEL = [  # (folder, file, damage, what the line says)
    ("base", "config.json", lambda p: p.write_text('{"model_type": "gem'), "config.json is damaged"),
    ("base", "model.safetensors", _truncate, "model.safetensors is damaged"),
    ("adapter", "adapter_model.safetensors", _garbage, "adapter_model.safetensors is damaged"),
    ("adapter", "adapter_config.json", _truncate, "adapter_config.json is damaged"),
]


@pytest.fixture(scope="module")
def adapter_dir(merged_dir) -> Path:
    return merged_dir.parent / "adapter"


def _damaged_copy(folder: Path, file: str, damage, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    damage(dest / file)
    return dest


@pytest.mark.parametrize("which, file, damage, message", DAMAGED_MODEL, ids=[f"{w}-{f}" for w, f, *_ in DAMAGED_MODEL])
def test_ask_on_a_damaged_model_or_adapter_is_one_line_naming_the_file(
        which, file, damage, message, ask_dir, tiny_model_dir, adapter_dir, tmp_path, capsys):
    from vqatune.cli.ask import EXIT_MODEL
    from vqatune.cli.main import main

    base, adapter = tiny_model_dir, adapter_dir
    if which == "base":
        base = _damaged_copy(tiny_model_dir, file, damage, tmp_path / "base")
    else:
        adapter = _damaged_copy(adapter_dir, file, damage, tmp_path / "adapter")
    code = main(["ask", "--params", str(REPO / "params.yaml"), "--base", str(base), "--adapter", str(adapter),
                 "--image", str(ask_dir / "a.png"), "--question", "How many polyps?", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == EXIT_MODEL and len(error_lines(err)) == 1 and "Traceback" not in err, err
    folder = base if which == "base" else adapter
    assert message in err and str(folder / file) in err and f"dvc checkout --force {folder}" in err, err


DAMAGED_DATA = [  # (file of data/processed, damage)
    ("test/data-00000-of-00001.arrow", _truncate),
    ("train/data-00000-of-00001.arrow", _garbage),
    ("test/state.json", _truncate),
    ("dataset_dict.json", _delete),
]


def _evaluate_stage(base, adapter, data, tmp_path, capsys) -> tuple[int, list[str]]:
    """The evaluate stage on these inputs, outputs under tmp_path: (exit code, its stderr lines)."""
    from conftest_stages import load_stage

    argv = ["--base", str(base), "--adapter", str(adapter), "--data", str(data),
            "--metrics", str(tmp_path / "eval.json"), "--by-category", str(tmp_path / "by_category.json"),
            "--predictions", str(tmp_path / "predictions"), "--plots", str(tmp_path / "plots"),
            "--params", str(REPO / "params.yaml")]
    code = load_stage("evaluate").main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate:")]


@pytest.mark.parametrize("file, damage", DAMAGED_DATA, ids=[f"{f}-{d.__name__[1:]}" for f, d in DAMAGED_DATA])
def test_evaluate_on_damaged_inputs_is_one_line_naming_the_folder(
        file, damage, tiny_model_dir, adapter_dir, processed_dir, tmp_path, capsys):
    data = _damaged_copy(processed_dir, file, damage, tmp_path / "processed")
    code, err = _evaluate_stage(tiny_model_dir, adapter_dir, data, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"{data} cannot be read as prepared data" in err[0] and f"dvc checkout --force {data}" in err[0]
    assert not (tmp_path / "eval.json").exists()


def test_evaluate_on_a_damaged_base_model_is_one_line(tiny_model_dir, adapter_dir, processed_dir, tmp_path, capsys):
    base = _damaged_copy(tiny_model_dir, "model.safetensors", _truncate, tmp_path / "base")
    code, err = _evaluate_stage(base, adapter_dir, processed_dir, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and f"{base / 'model.safetensors'} is damaged" in err[0], err
    assert not (tmp_path / "eval.json").exists()


# --------------------------------------------------------------------------------------
# 10. SIGKILL of base_model, tune (mid-search and mid-write) and evaluate (mid-write)
# --------------------------------------------------------------------------------------

def test_sigkill_while_base_model_writes_leaves_nothing_done_and_the_rerun_matches(tiny_model_dir, tmp_path):
    from conftest_stages import load_stage

    import dataclasses

    import yaml

    from vqatune.config import ModelConfig
    from vqatune.provenance import fingerprint

    # The session's tiny model (ModelConfig's defaults) is the uninterrupted run.
    params = {**good_params(), "model": dataclasses.asdict(ModelConfig())}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "base"
    argv = ["--out", str(out), "--params", str(tmp_path / "params.yaml")]
    killed("base_model.py", argv, "base_model-write", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.tmp", "params.yaml"]  # nothing looks done
    staging = tmp_path / "base.tmp"
    assert staging.is_dir() and fingerprint(staging) != fingerprint(tiny_model_dir)  # half written
    assert load_stage("base_model").main(argv) == 0      # the rerun
    assert not staging.exists() and fingerprint(out) == fingerprint(tiny_model_dir)


@pytest.fixture(scope="module")
def tune_params(tmp_path_factory) -> Path:
    """A search of 2 tiny trials (1 step of at most 2 batches of 4, one evaluation of 8 rows) on
    its own SQLite file."""
    import yaml

    root = tmp_path_factory.mktemp("tune")
    params = good_params()
    params["tune"].update({"storage": f"sqlite:///{root}/study.db", "n_trials": 2, "max_steps": 1,
                           "evals_per_trial": 1, "eval_rows": 8, "train_fraction": 0.2,
                           "heartbeat_seconds": 30, "grace_seconds": 600})  # the dead pid is seen at once
    params["tune"]["search_space"]["gradient_accumulation_steps"] = {"kind": "categorical", "choices": [1, 2]}
    params["train"].update({"batch_size": 4, "eval_batch_size": 8})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def tune_argv(params: Path, model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--best-params", str(out / "best_params.json"),
            "--metrics", str(out / "tune.json"), "--plots", str(out / "plots"), "--params", str(params)]


def load_tune_study(params: Path):
    import optuna

    storage = yaml_value(params, "tune", "storage")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def yaml_value(path: Path, *keys):
    import yaml

    node = yaml.safe_load(path.read_text())
    for key in keys:
        node = node[key]
    return node


@pytest.fixture(scope="module")
def killed_search(tune_params, tiny_model_dir, processed_dir, tmp_path_factory):
    """The tune stage SIGKILLed inside trial 1 (after its first evaluation), then run again."""
    from conftest_stages import load_stage

    out = tmp_path_factory.mktemp("tune-out")
    argv = tune_argv(tune_params, tiny_model_dir, processed_dir, out)
    killed("tune.py", argv, "trial-eval:1", out)
    left = sorted(p.name for p in out.iterdir())
    study = load_tune_study(tune_params)
    before = [(t.number, t.state.name, t.params, t.value) for t in study.trials]
    assert load_stage("tune").main(argv) == 0
    return out, left, before


def test_a_search_killed_mid_trial_resumes_keeping_its_finished_trials(killed_search, tune_params):
    from vqatune.search.report import best_params_record
    from vqatune.search.workers import trial_counts

    out, left, before = killed_search
    # Killed: trial 0 complete, trial 1 running; no output that looks done.
    assert [(n, s) for n, s, *_ in before] == [(0, "COMPLETE"), (1, "RUNNING")], before
    assert left == [], left
    study = load_tune_study(tune_params)
    after = {t.number: t for t in study.trials}
    assert (after[0].params, after[0].value) == (before[0][2], before[0][3])   # kept as it was
    assert after[1].state.name == "FAIL" and "died mid-trial" in after[1].user_attrs["fail_reason"]
    counts = trial_counts(study)
    assert counts["complete"] == 2 and counts["abandoned"] == 1 and counts["failed"] == counts["running"] == 0
    # Outputs consistent with the study: the best complete trial, and the counts.
    best = json.loads((out / "best_params.json").read_text())
    assert best == json.loads(json.dumps(best_params_record(study)))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert best["best_value"] == min(t.value for t in complete) and best["trial"] == study.best_trial.number
    metrics = json.loads((out / "tune.json").read_text())
    assert (metrics["trials_complete"], metrics["trials_abandoned"], metrics["best_trial"]) == (2, 1, best["trial"])
    history = (out / "plots" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3   # header + 2 complete + the abandoned trial


@pytest.mark.parametrize("fault", ["tune-write", "atomic-write:best_params.json"])
def test_sigkill_while_tune_writes_leaves_nothing_done_and_the_rerun_matches(
        fault, killed_search, tune_params, tiny_model_dir, processed_dir, tmp_path):
    """On the finished study of ``killed_search``: no trial runs again, only the outputs are written."""
    from conftest_metrics import without_run_measures
    from conftest_stages import load_stage

    from vqatune.provenance import fingerprint

    whole = killed_search[0]
    argv = tune_argv(tune_params, tiny_model_dir, processed_dir, tmp_path)
    trials = len(load_tune_study(tune_params).trials)
    killed("tune.py", argv, fault, tmp_path)
    assert not (tmp_path / "best_params.json").exists() and not (tmp_path / "tune.json").exists()
    if fault == "tune-write":
        assert not (tmp_path / "plots").exists() and (tmp_path / "plots.tmp").is_dir()
    else:  # the half-written temporary is never taken for the file
        (torn,) = tmp_path.glob(f".{fault.split(':')[1]}.*.tmp")
    assert load_stage("tune").main(argv) == 0
    assert len(load_tune_study(tune_params).trials) == trials
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_params.json", "plots", "tune.json"]
    assert (tmp_path / "best_params.json").read_bytes() == (whole / "best_params.json").read_bytes()
    assert without_run_measures(json.loads((tmp_path / "tune.json").read_text())) == \
        without_run_measures(json.loads((whole / "tune.json").read_text()))
    assert fingerprint(tmp_path / "plots") == fingerprint(whole / "plots")


@pytest.fixture(scope="module")
def eval_params(tmp_path_factory) -> Path:
    """evaluate on 6 test rows, 4 new tokens, BERTScore from the first layer: every configuration,
    score and plot, in seconds."""
    import yaml

    params = good_params()
    params["evaluate"].update({"subset_size": 6, "max_new_tokens": 4, "batch_size": 6, "bertscore_layers": 1})
    path = tmp_path_factory.mktemp("eval-params") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def eval_argv(params: Path, base: Path, adapter: Path, data: Path, out: Path) -> list[str]:
    return ["--base", str(base), "--adapter", str(adapter), "--data", str(data), "--metrics", str(out / "eval.json"),
            "--by-category", str(out / "by_category.json"), "--predictions", str(out / "predictions"),
            "--plots", str(out / "plots"), "--params", str(params)]


# Each fault point of evaluate's writes, in the order the stage reaches them, and what the killed
# run leaves: never eval.json (the stage is not done), at most the folders renamed into place
# before the kill, the staging folder it was writing, or the half-written temporary of eval.json.
EVAL_FAULTS = [
    ("evaluate-predictions-write", ["predictions.tmp"]),
    ("evaluate-plots-write", ["plots.tmp", "predictions"]),
    ("atomic-write:eval.json", [".eval.json.tmp", "by_category.json", "plots", "predictions"]),
]


def test_sigkill_while_evaluate_writes_leaves_no_eval_json_and_the_rerun_matches(
        eval_params, tiny_model_dir, adapter_dir, processed_dir, tmp_path):
    """Killed at each fault point in turn, each run the rerun of the one before in the same
    folder (what it left is cleaned up), the last one uninterrupted: its predictions, plots and
    metrics (less timings) are those of an uninterrupted run in a fresh folder."""
    import re

    from conftest_metrics import without_run_measures
    from conftest_stages import load_stage

    from vqatune.provenance import fingerprint

    whole = tmp_path / "whole"
    assert load_stage("evaluate").main(eval_argv(eval_params, tiny_model_dir, adapter_dir, processed_dir, whole)) == 0
    out = tmp_path / "out"
    out.mkdir()
    argv = eval_argv(eval_params, tiny_model_dir, adapter_dir, processed_dir, out)
    for fault, left in EVAL_FAULTS:
        killed("evaluate.py", argv, fault, tmp_path)
        assert sorted(re.sub(r"^\.eval\.json\..*\.tmp$", ".eval.json.tmp", p.name) for p in out.iterdir()) == left
        if fault.startswith("atomic-write"):
            (torn,) = out.glob(".eval.json.*.tmp")
            with pytest.raises(ValueError):
                json.loads(torn.read_text())            # half written, under another name
    assert load_stage("evaluate").main(argv) == 0       # the last rerun
    assert sorted(p.name for p in out.iterdir()) == ["by_category.json", "eval.json", "plots", "predictions"]
    assert fingerprint(out / "predictions") == fingerprint(whole / "predictions")
    assert fingerprint(out / "plots") == fingerprint(whole / "plots")
    for name in ("eval.json", "by_category.json"):
        assert without_run_measures(json.loads((out / name).read_text())) == \
            without_run_measures(json.loads((whole / name).read_text())), name


# --------------------------------------------------------------------------------------
# 8. SIGKILL through `dvc repro`: two stages killed in turn, then the pipeline completes
# --------------------------------------------------------------------------------------

# The train stage's share of the pipeline, shrunk as TRAIN above (5 steps, a checkpoint every 2),
# on 12 synthetic images, with the search off (tune writes a best_params.json that says so).
DVC_KILL_PARAMS = {"model": SMALL_TOWER,
                   "prepare": {"synthetic_images": 12}, "tune": {"enabled": False},
                   "train": {**TRAIN, "save_total_limit": 5}}


def lock_stages(clone: Path) -> dict:
    """dvc.lock's stages: what DVC records as done (it writes a stage's entry only after it exits 0)."""
    import yaml

    lock = clone / "dvc.lock"
    return yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}


def lock_outs(clone: Path) -> dict:
    """{output path: its hash in dvc.lock} for every output of every stage done."""
    return {out["path"]: out.get("md5") for entry in lock_stages(clone).values() for out in entry.get("outs", [])}


def test_sigkill_under_dvc_repro_then_dvc_repro_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """`dvc repro train` SIGKILLed inside prepare (its output half written), again inside train
    (checkpoint-4 half written), then once more without a fault: it completes, runs only what the
    kills left undone, training resumes from checkpoint-2, and every output hash in dvc.lock is
    that of an uninterrupted `dvc repro train` in a copy of the same checkout (run alongside)."""
    import re

    import yaml

    from conftest_dvc import clone_working_tree, dvc_env
    from conftest_metrics import without_run_measures

    env = {**dvc_env(), **child_env()}
    clone = clone_working_tree(tmp_path / "killed", env)
    env["PYTHONPATH"] = str(clone / "src")  # the stages run the clone's code
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for section, values in DVC_KILL_PARAMS.items():
        params[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Without the committed dvc.lock (the default params' run): it holds only what runs here.
    for cmd in (["git", "rm", "-q", "dvc.lock"], ["git", "commit", "-qam", "small pipeline"]):
        subprocess.run(cmd, cwd=clone, env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(["git", "clone", "-q", str(clone), str(whole)], env=env, check=True, capture_output=True)
    whole_env = {**env, "PYTHONPATH": str(whole / "src")}
    uninterrupted = subprocess.Popen(["dvc", "repro", "train"], cwd=whole, env=whole_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def repro(fault: str | None) -> subprocess.CompletedProcess:
            run_env = {**env, "VQATUNE_FAULT": fault} if fault else env
            proc = subprocess.run(["dvc", "repro", "train"], cwd=clone, env=run_env, capture_output=True,
                                  text=True, timeout=600)
            assert (proc.returncode != 0) == (fault is not None), proc.stdout[-3000:] + proc.stderr[-3000:]
            proc.ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
            return proc

        # 1. prepare killed with its staging folder half written: base_model done, prepare not.
        first = repro("prepare-write")
        assert first.ran == {"base_model", "prepare"}, first.stdout[-2000:]
        assert set(lock_stages(clone)) == {"base_model"}
        assert not (clone / "data/processed").exists() and not (clone / "metrics/prepare.json").exists()
        assert (clone / "data/processed.tmp").is_dir()

        # 2. train killed while checkpoint-4 is written: prepare and tune done, train not.
        second = repro("checkpoint-write:4")
        assert second.ran == {"prepare", "tune", "train"}, second.stdout[-2000:]
        assert set(lock_stages(clone)) == {"base_model", "prepare", "tune"}
        assert not (clone / "data/processed.tmp").exists()
        assert not (clone / "models/adapter").exists() and not (clone / "metrics/train.json").exists()
        (run_dir,) = (clone / "models/train_checkpoints").iterdir()
        assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        with pytest.raises(ValueError):
            json.loads((run_dir / "checkpoint-4/trainer_state.json").read_text())

        # 3. No fault: only train runs, from checkpoint-2; the checkout is clean.
        third = repro(None)
        assert third.ran == {"train"}, third.stdout[-2000:]
        log = third.stdout + third.stderr
        assert re.search(r"checkpoint-4 is incomplete or corrupt.*resuming from checkpoint-2", log), log[-3000:]
        assert "resumed from step 2" in log, log[-3000:]
        status = subprocess.run(["dvc", "status", "train"], cwd=clone, env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
        assert not [p for p in clone.rglob("*") if p.name.endswith((".tmp", ".partial")) and ".git" not in p.parts]
    except BaseException:
        os.killpg(uninterrupted.pid, signal.SIGKILL)  # dvc and the stage it runs
        uninterrupted.wait()
        raise
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out[-3000:]

    # The same outputs as the uninterrupted run: the hash in dvc.lock of every output (the adapter
    # folder included: its card leaves out that the run resumed) but the metrics files, and those
    # less what measures the run (time, speed, memory) and says it was resumed.
    done, expected = lock_outs(clone), lock_outs(whole)
    assert set(done) == set(expected)
    metrics = {p for p in done if p.endswith(".json") and p.startswith(("metrics/", "plots/"))}
    assert {p: done[p] for p in set(done) - metrics} == {p: expected[p] for p in set(expected) - metrics}

    def result(path: Path) -> dict:
        tree = without_run_measures(json.loads(path.read_text()))
        for key in ("resumed", "resumed_from_step"):
            tree.pop(key, None)
        return tree

    for path in sorted(metrics):
        assert result(clone / path) == result(whole / path), path
