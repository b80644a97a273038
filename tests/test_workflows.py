"""DVC workflows end to end in temporary clones (issue 7), on one shrunk pipeline, in this order:

1. rerun only what changed: a full `dvc repro`, then one that runs nothing; each stage reads only
   the params keys and data files its dvc.yaml entry declares; an export param reruns only export,
   a prepare param prepare and everything after it, a train param tune (it declares `train` too)
   and everything after it, an evaluation param only evaluation; reverting a param restores the
   earlier outputs from the run cache without running anything;
6. deterministic: a forced rerun of every stage gives the same metrics and output hashes;
   provenance: every stage's metrics file says what it ran on and from;
3. sweep: `dvc exp run -S` and a queued sweep show in `dvc exp show`;
2. compare: `dvc metrics diff` and `dvc plots diff` between two commits;
4-5. back up and reproduce: `dvc push`, and a colleague's fresh clone `dvc pull`s a clean run.

Runs the real embedded pipeline, shrunk (fewer images, one epoch, two trials), on CPU: 11 min 20 s
on 2 shared cores (the first repro and the forced rerun ~2 min each, a prepare or train change
~2 min, the queued sweep ~80 s, the rest seconds).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest_dvc import SMALL_TOWER, clone_working_tree, dvc_env
from conftest_metrics import without_run_measures
from vqatune.provenance import fingerprint

pytestmark = pytest.mark.workflow

SMALL = {
    **{("model", key): value for key, value in SMALL_TOWER.items()},
    ("prepare", "synthetic_images"): 30,
    ("prepare", "test_size"): 0.2,  # 6 test images, more rows than subset_size: a new seed draws new rows
    ("tune", "n_trials"): 2,
    ("train", "epochs"): 1,
    ("train", "eval_steps"): 5,
    ("train", "save_steps"): 5,
    ("train", "logging_steps"): 2,  # a few training-loss points for the curves in `dvc plots diff`
    ("evaluate", "subset_size"): 24,
}
AFTER_BASE = {"prepare", "tune", "train", "evaluate", "merge", "export"}

@dataclasses.dataclass
class Pipeline:
    clone: Path
    remote: Path
    first_repro: str
    compare_base: str = ""  # the commit `dvc metrics/plots diff` compares HEAD with


def run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def run_json(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(path: Path, values: dict) -> None:
    params = yaml.safe_load(path.read_text())
    for (section, key), value in values.items():
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit(clone: Path, env, message: str) -> None:
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", message, "--allow-empty"], clone, env)


def revert_params_and_restore(clone: Path, env, changed: set[str]) -> None:
    """Back to the committed params: `dvc repro` restores the committed outputs from the run
    cache (every stage the change had rerun) without running anything, byte for byte."""
    run(["git", "checkout", "--", "params.yaml"], clone, env)
    out = run(["dvc", "repro"], clone, env)
    assert ran_stages(out) == set(), out
    assert set(re.findall(r"Stage '([^']+)' is cached - skipping run", out)) == changed, out
    assert run(["git", "status", "--porcelain"], clone, env) == ""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dvc_env()
    env["VQATUNE_TRACE"] = str(tmp_path_factory.mktemp("trace") / "trace.jsonl")
    return env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, env):
    """A clone of this working tree (uncommitted changes included), shrunk params, one repro,
    committed."""
    root = tmp_path_factory.mktemp("workflow")
    clone, remote = clone_working_tree(root / "a", env), root / "remote"
    set_params(clone / "params.yaml", SMALL)
    run(["dvc", "remote", "modify", "--local", "backup", "url", str(remote)], clone, env)
    commit(clone, env, "small params")
    out = run(["dvc", "repro"], clone, env)
    commit(clone, env, "run")
    return Pipeline(clone, remote, out)


def stage_specs(clone: Path) -> dict:
    return yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]


def _name(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


# -- 1. Rerun only what changed ------------------------------------------------------------

def test_first_repro_runs_every_stage_and_second_runs_none(pipeline, env):
    assert ran_stages(pipeline.first_repro) == set(stage_specs(pipeline.clone))
    again = run(["dvc", "repro"], pipeline.clone, env)
    assert ran_stages(again) == set() and "up to date" in again


def _covered(key: str, declared: list[str], sep: str = ".") -> bool:
    return any(key == d or key.startswith(d.rstrip(sep) + sep) for d in declared)


def test_stages_read_only_what_dvc_yaml_declares(pipeline, env):
    stages = stage_specs(pipeline.clone)
    by_script = {}
    for name, stage in stages.items():
        script = re.search(r"stages/\w+\.py", stage["cmd"]).group(0)
        by_script[script] = (name, stage)
    records = [json.loads(line) for line in Path(env["VQATUNE_TRACE"]).read_text().splitlines()]
    seen = set()
    for rec in records:
        script = next((a for a in rec["argv"] if a.startswith("stages/")), None)
        if script not in by_script:
            continue
        name, stage = by_script[script]
        seen.add(name)
        declared = [_name(p) for p in stage.get("params", [])]
        undeclared = [k for k in rec["params"] if not _covered(k, declared)]
        assert not undeclared, f"stage {name} reads params it does not declare: {undeclared}"
        paths = [d for d in stage.get("deps", [])]
        for group in ("outs", "metrics", "plots"):
            paths += [_name(o) for o in stage.get(group, [])]
        # .gitignore/.dvcignore are read by dvclive's repo checks. models/train_checkpoints/ is
        # training's resumable scratch area, kept out of DVC on purpose. Modules come from the
        # import record (a .pyc is read in place of its .py), so .py opens are left to it.
        data = [f for f in rec["files"] if not f.endswith(".py")
                and f not in ("params.yaml", ".gitignore", ".dvcignore")
                and not f.startswith("models/train_checkpoints/")]
        unknown = [f for f in data if not _covered(f, paths, sep="/")]
        assert not unknown, f"stage {name} reads files it does not declare: {unknown}"
        assert rec["modules"], f"stage {name}: no vqatune module recorded"
        undeclared_code = [m for m in rec["modules"] if not _covered(m, paths, sep="/")]
        assert not undeclared_code, f"stage {name} imports modules it does not declare: {undeclared_code}"
    assert seen == set(stages)


# -- Provenance ----------------------------------------------------------------------------

METRICS_FILE = {"prepare": "metrics/prepare.json", "tune": "metrics/tune.json", "train": "metrics/train.json",
                "evaluate": "metrics/eval.json", "merge": "metrics/merge.json", "export": "metrics/export.json"}


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def _lookup(params: dict, dotted: str):
    for part in dotted.split("."):
        params = params[part]
    return params


def test_every_stage_records_its_provenance(pipeline):
    clone = pipeline.clone
    stages = stage_specs(clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    best = json.loads((clone / "models/best_params.json").read_text())["params"]
    blocks = {}
    for stage, path in METRICS_FILE.items():
        block = json.loads((clone / path).read_text())["provenance"]
        blocks[stage] = block
        env_ = block["environment"]
        assert env_["python"] == platform.python_version() and env_["device"].startswith("cpu")
        assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "dvc"} <= set(env_)
        # The data fingerprint: every data and model input dvc.yaml declares, hashed by content.
        data_deps = [d for d in stages[stage]["deps"] if d.startswith(("data/", "models/"))]
        assert block["inputs"] == {d: fingerprint(clone / d) for d in data_deps}, stage
        # The effective params: exactly the keys the stage declares, with the values it used.
        assert set(block["params"]) == {_name(p) for p in stages[stage]["params"]}, stage
        for key, used in block["params"].items():
            expected = _flat(_lookup(params, key))
            if stage == "train" and key == "train":
                expected.update(best)  # the search's values replace params.yaml's
            recorded = _flat(used)
            assert {k: recorded.get(k) for k in expected} == expected, (stage, key)
        # Nothing that would differ between two clones or two runs of the same inputs.
        text = json.dumps(block)
        assert str(clone) not in text and str(Path.home()) not in text
    assert blocks["prepare"]["outputs"] == {"data/processed": fingerprint(clone / "data/processed")}
    # Traceable: what prepare wrote is what every later stage read.
    for stage in ("tune", "train", "evaluate"):
        assert blocks[stage]["inputs"]["data/processed"] == blocks["prepare"]["outputs"]["data/processed"]
    assert blocks["train"]["params"]["train"]["learning_rate"] == best["learning_rate"]
    card = (clone / "models/adapter/README.md").read_text()
    assert f"| `data/processed` | {blocks['train']['inputs']['data/processed']} |" in card


# -- 6. Deterministic ----------------------------------------------------------------------

def _results(clone: Path) -> tuple[dict, dict, str]:
    """(every metrics file less its run measures, md5 of every cached DVC output, adapter sha256)."""
    stages = stage_specs(clone)
    metrics = {_name(m): without_run_measures(json.loads((clone / _name(m)).read_text()))
               for stage in stages.values() for m in stage.get("metrics", [])}
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    uncached = {_name(o) for stage in stages.values() for group in ("outs", "metrics", "plots")
                for o in stage.get(group, [])
                if not isinstance(o, str) and not next(iter(o.values())).get("cache", True)}
    outs = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])
            if o["path"] not in uncached}
    adapter = hashlib.sha256((clone / "models/adapter/adapter_model.safetensors").read_bytes()).hexdigest()
    return metrics, outs, adapter


def test_a_forced_rerun_gives_identical_metrics_and_adapter(pipeline, env):
    clone = pipeline.clone
    metrics, outs, adapter = _results(clone)
    assert {"data/processed", "models/best_params.json", "models/adapter", "models/merged", "models/gguf"} <= set(outs)
    # The study and the checkpoints are caches keyed by their inputs: left in place, the forced
    # run would resume the finished study and the last checkpoint instead of searching and training.
    shutil.rmtree(clone / "models/tune")
    shutil.rmtree(clone / "models/train_checkpoints")
    out = run(["dvc", "repro", "--force"], clone, env)
    assert ran_stages(out) == set(stage_specs(clone))
    metrics2, outs2, adapter2 = _results(clone)
    assert adapter2 == adapter
    assert outs2 == outs  # data, base model, best params, adapter folder, predictions, merged, GGUF
    for path in metrics:
        assert metrics2[path] == metrics[path], path
    commit(clone, env, "forced rerun")


# -- 1. (continued) Each stage's params rerun it and what follows --------------------------

def test_an_export_param_reruns_only_export(pipeline, env):
    set_params(pipeline.clone / "params.yaml", {("export", "name"): "kvasir-test"})
    out = run(["dvc", "repro"], pipeline.clone, env)
    assert ran_stages(out) == {"export"}
    assert (pipeline.clone / "models/gguf/kvasir-test.gguf").is_file()
    revert_params_and_restore(pipeline.clone, env, {"export"})


def test_a_prepare_param_reruns_prepare_and_everything_after_it(pipeline, env):
    # Another synthetic draw: new data, so every stage downstream of prepare has a changed input.
    set_params(pipeline.clone / "params.yaml", {("prepare", "seed"): 43})
    out = run(["dvc", "repro"], pipeline.clone, env)
    assert ran_stages(out) == AFTER_BASE
    revert_params_and_restore(pipeline.clone, env, AFTER_BASE)


def _experiments(clone: Path, env) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params.yaml values, for the HEAD commit."""
    shown = run_json(["dvc", "exp", "show", "--json"], clone, env)
    exps = {}
    for commit_row in shown:
        for exp in commit_row.get("experiments") or []:
            rev = exp["revs"][0]
            exps[exp["name"]] = {"params": rev["data"]["params"]["params.yaml"]["data"],
                                 "metrics": rev["data"]["metrics"], "error": rev.get("error")}
    return exps


def test_a_train_param_via_exp_run_reruns_tune_train_and_after(pipeline, env):
    """`dvc exp run -S train.max_steps=4`: train and everything after it reruns, and tune too,
    because tune declares all of `train:` (its trials train with it). A cheap one: max_steps is
    part of a trial's own budget, so the search's key is unchanged, the rerun tune resumes its
    finished study (no trial runs) and writes the same best params; training runs 4 steps.
    (A key in tune.search_space, learning_rate say, would be replaced by the search's value.)"""
    clone = pipeline.clone
    out = run(["dvc", "exp", "run", "-n", "max-steps-4", "-S", "train.max_steps=4"], clone, env)
    assert ran_stages(out) == {"tune", "train", "evaluate", "merge", "export"}
    assert json.loads((clone / "metrics/train.json").read_text())["steps"] == 4
    exps = _experiments(clone, env)
    assert exps["max-steps-4"]["params"]["train"]["max_steps"] == 4
    assert exps["max-steps-4"]["metrics"]["metrics/train.json"]["data"]["steps"] == 4
    revert_params_and_restore(clone, env, {"tune", "train", "evaluate", "merge", "export"})


def test_a_queued_sweep_runs_and_shows_in_exp_show(pipeline, env):
    """Two queued experiments, run by a queue worker. An evaluation param keeps each one to the
    evaluate stage (~30 s here): the sweep machinery is what is tested, not training."""
    clone = pipeline.clone
    for tokens in (8, 16):
        run(["dvc", "exp", "run", "--queue", "-n", f"tokens-{tokens}", "-S", f"evaluate.max_new_tokens={tokens}"],
            clone, env)
    run(["dvc", "queue", "start", "--jobs", "1"], clone, env)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], clone, env)
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            break
        time.sleep(3)
    run(["dvc", "queue", "stop"], clone, env)
    assert len(re.findall(r"tokens-\d+ .*Success", status)) == 2, status
    exps = _experiments(clone, env)
    for tokens in (8, 16):
        exp = exps[f"tokens-{tokens}"]
        assert exp["params"]["evaluate"]["max_new_tokens"] == tokens and not exp["error"]
        assert exp["metrics"]["metrics/eval.json"]["data"]["generation"]["max_new_tokens"] == tokens
        log = run(["dvc", "queue", "logs", f"tokens-{tokens}"], clone, env)
        # export reruns too: its GGUF agreement check compares with evaluate's predictions
        assert ran_stages(log) == {"evaluate", "export"}, log
    assert run(["git", "status", "--porcelain"], clone, env) == ""  # queued runs leave the workspace alone


def test_an_evaluation_param_reruns_only_evaluation_and_export(pipeline, env):
    clone = pipeline.clone
    pipeline.compare_base = run(["git", "rev-parse", "HEAD"], clone, env).strip()
    # Another test subset (subset_size rows drawn with this seed): the scores change.
    set_params(clone / "params.yaml", {("evaluate", "seed"): 1})
    out = run(["dvc", "repro"], clone, env)
    assert ran_stages(out) == {"evaluate", "export"}  # export: its agreement check reads the predictions
    commit(clone, env, "another test subset")


# -- 2. Compare ----------------------------------------------------------------------------

def test_metrics_diff_between_two_commits_shows_every_eval_metric(pipeline, env):
    clone, base = pipeline.clone, pipeline.compare_base
    assert base, "runs after test_an_evaluation_param_reruns_only_evaluation_and_export"
    old = run_json(["git", "show", f"{base}:metrics/eval.json"], clone, env)
    new = json.loads((clone / "metrics/eval.json").read_text())
    diff = run_json(["dvc", "metrics", "diff", base, "HEAD", "--all", "--json"], clone, env)
    shown = diff["metrics/eval.json"]
    flat_old, flat_new = _flat(old), _flat(new)
    numbers = [k for k, v in flat_new.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for key in numbers:  # every number in eval.json, old and new
        assert shown[key]["old"] == flat_old[key] and shown[key]["new"] == flat_new[key], key
    configurations = [f"{model}.{mode}" for model in ("base", "tuned") for mode in ("none", "static", "adaptive")]
    scores = [f"{c}.{metric}" for c in configurations + ["majority"]
              for metric in ("exact_match", "set_exact_match", "set_f1", "token_f1", "rougeL", "bertscore_f1", "n")]
    assert set(scores) <= set(numbers)
    assert any(shown[k]["old"] != shown[k]["new"] for k in scores if k.endswith("exact_match"))
    # The default view lists what changed, the cause included.
    text = run(["dvc", "metrics", "diff", base, "HEAD"], clone, env)
    assert "provenance.params.evaluate.seed" in text
    changed = [k for k in scores if shown[k]["old"] != shown[k]["new"]]
    assert all(k in text for k in changed)


def test_plots_diff_renders_prompt_modes_and_training_curves(pipeline, env, tmp_path):
    clone, base = pipeline.clone, pipeline.compare_base
    out_dir = tmp_path / "plots"
    run(["dvc", "plots", "diff", base, "HEAD", "-o", str(out_dir)], clone, env)
    html = (out_dir / "index.html").read_text()
    for plot_id in ("eval_exact_match", "eval_set_f1", "eval_bertscore_f1"):  # dvc.yaml's top-level plots
        assert plot_id in html
    for curve in ("plots/train/plots/metrics/train/loss.tsv", "plots/train/plots/metrics/eval/loss.tsv"):
        assert curve in html
    # The seaborn pictures of the prompt-mode comparison, one per revision.
    assert len(list((out_dir / "static").glob("*plots_eval_configurations.png"))) == 2


# -- 4-5. Back up, and a colleague reproduces the run -------------------------------------

def test_push_then_a_colleague_pulls_a_clean_up_to_date_run(pipeline, env, tmp_path):
    clone, remote = pipeline.clone, pipeline.remote
    commit(clone, env, "run")
    run(["dvc", "push"], clone, env)
    assert remote.is_dir() and any(remote.rglob("*"))
    colleague = tmp_path / "b"
    run(["git", "clone", "-q", str(clone), str(colleague)], tmp_path, env)
    run(["dvc", "remote", "modify", "--local", "backup", "url", str(remote)], colleague, env)
    run(["dvc", "pull"], colleague, env)
    for out in ("data/processed", "models/adapter", "models/merged", "models/gguf"):
        assert (colleague / out).exists(), out
    status = run(["dvc", "status"], colleague, env)
    assert "up to date" in status, status
    again = run(["dvc", "repro"], colleague, env)
    assert ran_stages(again) == set(), again
