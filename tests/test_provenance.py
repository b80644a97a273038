"""vqatune.provenance.record: the "provenance" block every stage writes into its metrics file."""
from __future__ import annotations

import json

from vqatune.config import ModelConfig
from vqatune.training.card import model_card
from vqatune.provenance import fingerprint, record
from vqatune.training.config import TrainConfig


def test_record_holds_versions_device_fingerprints_and_effective_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("rows")
    (tmp_path / "best.json").write_text("{}")
    cfg = TrainConfig(learning_rate=1e-3)
    block = record(params={"train": cfg, "model.id": "m"}, inputs=["data", "best.json"])

    assert {"python", "device", "torch", "transformers", "peft", "dvc"} <= set(block["environment"])
    assert block["inputs"] == {"data": fingerprint("data"), "best.json": fingerprint("best.json")}
    assert block["params"]["train"]["learning_rate"] == 1e-3
    assert block["params"]["train"]["lora"]["r"] == cfg.lora.r  # nested sections become dicts
    assert block["params"]["model.id"] == "m"
    assert "outputs" not in block
    # JSON as written, and the same on a second call: nothing time- or run-dependent in it.
    assert json.dumps(block) == json.dumps(record(params={"train": cfg, "model.id": "m"},
                                                  inputs=["data", "best.json"]))


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"abc")
    before = fingerprint(folder)
    (folder / "x.bin").write_bytes(b"abc")  # same bytes, new mtime
    assert fingerprint(folder) == before
    (folder / "x.bin").write_bytes(b"abd")
    assert fingerprint(folder) != before


def test_model_card_lists_input_fingerprints_and_leaves_out_run_speed(tmp_path):
    block = record(params={"train": TrainConfig()}, inputs=[])
    block["inputs"] = {"data/processed": "0123456789abcdef"}
    metrics = {"eval_loss": 0.5, "seconds": 12.3, "examples_per_s": 4.5, "peak_memory_gib": 0.7,
               "resumed": True, "resumed_from_step": 2, "provenance": block}
    card = model_card(base_model=ModelConfig().id, dataset="data/processed", train_params={}, metrics=metrics,
                      environment=block["environment"], hyperparameter_source="params.yaml")
    assert "| `data/processed` | 0123456789abcdef |" in card
    assert "| eval_loss | 0.5 |" in card
    assert "seconds" not in card and "examples_per_s" not in card and "peak_memory_gib" not in card
    assert "resumed" not in card  # a killed and resumed run writes the adapter folder of an uninterrupted one


# -- The code in the run keys ------------------------------------------------------------------

def _package_copy(tmp_path):
    import shutil

    from vqatune.provenance import PACKAGE_ROOT

    root = tmp_path / PACKAGE_ROOT.name
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edited(root, rel: str, entry: str) -> str:
    """The code signature of ``entry`` with a comment appended to ``rel``, then the file restored."""
    from vqatune.provenance import code_signature

    file = root / rel
    original = file.read_text()
    file.write_text(original + "\n# an edit\n")
    try:
        return code_signature(entry, root)
    finally:
        file.write_text(original)


def test_the_training_key_hashes_the_training_code_and_not_the_cli(tmp_path):
    """Editing the CLI (or evaluation, export, the search) keeps a killed training's checkpoints;
    editing any module the training runs does not."""
    from vqatune.provenance import code_signature
    from vqatune.training.checkpoints import TRAINING_ENTRY

    root = _package_copy(tmp_path)
    key = code_signature(TRAINING_ENTRY, root)
    assert code_signature(TRAINING_ENTRY) == key  # the copy is the package
    for other in ("cli/main.py", "cli/ask.py", "evaluation/run.py", "export/gguf.py", "search/study.py",
                  "models/tiny.py", "data/prepare.py"):
        assert _edited(root, other, TRAINING_ENTRY) == key, other
    for training in ("training/run.py", "training/collate.py", "training/trainer.py", "models/loading.py",
                     "models/lora.py", "vision/feature_cache.py", "prompts.py", "config.py"):
        assert _edited(root, training, TRAINING_ENTRY) != key, training
    # A module moved into a subpackage the training imports stays in the key.
    (root / "training" / "run.py").rename(root / "training" / "steps.py")
    (root / "training" / "run.py").write_text("from .steps import *  # noqa\n")
    moved = code_signature(TRAINING_ENTRY, root)
    assert moved != key and _edited(root, "training/steps.py", TRAINING_ENTRY) != moved


def test_the_search_key_hashes_the_search_and_training_code_and_not_the_cli(tmp_path):
    from vqatune.provenance import code_signature
    from vqatune.search.objective import SEARCH_ENTRY

    root = _package_copy(tmp_path)
    key = code_signature(SEARCH_ENTRY, root)
    for other in ("cli/main.py", "cli/ask.py", "search/report.py", "evaluation/plots.py"):
        assert _edited(root, other, SEARCH_ENTRY) == key, other
    for searched in ("search/objective.py", "search/study.py", "training/run.py", "models/precision.py"):
        assert _edited(root, searched, SEARCH_ENTRY) != key, searched


def test_import_closure_follows_imports_inside_functions_and_package_inits():
    from vqatune.provenance import PACKAGE_ROOT, import_closure

    files = {f.relative_to(PACKAGE_ROOT).as_posix() for f in import_closure(["vqatune.training.run"])}
    # run_training imports the model set-up and the trainer inside functions
    assert {"training/trainer.py", "models/loading.py", "models/lora.py", "vision/feature_cache.py",
            "__init__.py", "training/__init__.py", "models/__init__.py"} <= files
    assert not any(f.startswith(("cli/", "search/", "evaluation/", "export/", "generation/")) for f in files)
