"""`vqatune ask` end to end on the tiny model: the answer is evaluation's answer, the merged model
answers as base + adapter does, batches keep bad rows, and every failure has its exit code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest_adapters import make_perturbed_adapter
from vqatune.cli.ask import EXIT_BATCH, EXIT_IMAGE, EXIT_MODEL, EXIT_QUESTION, EXIT_ROWS
from vqatune.cli.main import main

QUESTION = "How many polyps are in the image?"


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory):
    """An adapter, the merged model, and two images (one 100x120, not the model's size)."""
    from vqatune.export.merge import MergeConfig, merge_adapter

    root = tmp_path_factory.mktemp("ask")
    adapter = make_perturbed_adapter(tiny_model_dir, root / "adapter")
    merge_adapter(tiny_model_dir, adapter, root / "merged", MergeConfig(dtype="float32", verify=False))
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (120, 100, 3)), ("b.jpg", (64, 64, 3))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _ask(capsys, *args) -> tuple[int, str, str]:
    code = main(["ask", "--params", str(Path(__file__).resolve().parents[1] / "params.yaml"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _evaluation_answer(model_dir, image_path, question, mode, adapter=None):
    """What evaluation's code path answers: prepare's image decoding, build_messages, and
    generate_answers."""
    from vqatune.config import PrepareConfig
    from vqatune.data.prepare import decode_image
    from vqatune.generation.generate import generate_answers
    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.prompts import PromptsConfig, build_messages

    model = load_base_model(model_dir, device="cpu")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    processor = load_processor(model_dir)
    prepare = PrepareConfig()
    image, _ = decode_image({"bytes": Path(image_path).read_bytes()}, 64, prepare.resample,
                            prepare.max_image_pixels)
    return generate_answers(model, processor, [build_messages(question, mode, PromptsConfig())],
                            [image], max_new_tokens=12)[0]


def test_ask_prints_the_answer_evaluation_gives(work, tiny_model_dir, capsys):
    code, out, _ = _ask(capsys, "--image", str(work / "a.png"), "--question", QUESTION,
                        "--model", str(work / "merged"), "--prompt-mode", "adaptive",
                        "--max-new-tokens", "12")
    assert code == 0
    answer = out.rstrip("\n")
    assert answer and "\n" not in answer
    assert answer == _evaluation_answer(work / "merged", work / "a.png", QUESTION, "adaptive")


def test_merged_model_answers_as_base_plus_adapter(work, tiny_model_dir, capsys):
    args = ["--image", str(work / "b.jpg"), "--question", QUESTION, "--max-new-tokens", "12"]
    code_m, merged, _ = _ask(capsys, *args, "--model", str(work / "merged"))
    code_a, adapted, _ = _ask(capsys, *args, "--adapter", str(work / "adapter"), "--base", str(tiny_model_dir))
    code_b, base, _ = _ask(capsys, *args, "--model", str(tiny_model_dir))
    assert code_m == code_a == code_b == 0
    assert merged == adapted
    assert merged != base  # the adapter changes the answer, so the equality above means something


def test_batch_answers_good_rows_and_reports_bad_ones(work, capsys):
    batch = work / "batch.csv"
    batch.write_text("id,image,question\n"
                     f"q1,a.png,{QUESTION}\n"
                     "q2,broken.png,What colour is the polyp?\n"
                     "q3,../escape.png,Where is it?\n"
                     "q4,b.jpg,\n"
                     f"q5,b.jpg,{QUESTION}\n")
    output = work / "answers.jsonl"
    code, _, err = _ask(capsys, "--batch", str(batch), "--output", str(output), "--model",
                        str(work / "merged"), "--max-new-tokens", "12", "--batch-size", "2")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert code == EXIT_ROWS and "2 of 5 rows answered, 3 with an error" in err
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert [r["error"] is None for r in rows] == [True, False, False, False, True]
    assert "undecodable" in rows[1]["error"] and "leaves the batch file's folder" in rows[2]["error"]
    assert "question is empty" in rows[3]["error"]
    # A batch row gets the answer the single question gets.
    code, single, _ = _ask(capsys, "--image", str(work / "a.png"), "--question", QUESTION,
                           "--model", str(work / "merged"), "--max-new-tokens", "12")
    assert rows[0]["answer"] == single.rstrip("\n") and rows[0]["prompt_mode"] == "static"


def test_jsonl_batch_to_stdout(work, capsys):
    batch = work / "batch.jsonl"
    batch.write_text(json.dumps({"image": "b.jpg", "question": QUESTION}) + "\n")
    code, out, _ = _ask(capsys, "--batch", str(batch), "--model", str(work / "merged"),
                        "--max-new-tokens", "4")
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["id"] == "0" and row["error"] is None and isinstance(row["answer"], str)


@pytest.mark.parametrize("case, code, message", [
    ("missing image", EXIT_IMAGE, "image {work}/nope.png not found"),
    ("broken image", EXIT_IMAGE, "cannot be used (undecodable image)"),
    ("empty question", EXIT_QUESTION, "the question is empty; pass --question TEXT"),
    ("missing model", EXIT_MODEL, "model folder {work}/nomodel not found"),
    ("missing adapter", EXIT_MODEL, "adapter folder {work}/noadapter not found"),
    ("missing batch", EXIT_BATCH, "batch file {work}/none.csv not found"),
    ("batch without columns", EXIT_BATCH, "every row needs 'image' and 'question'"),
])
def test_errors_are_one_line_with_their_exit_code(work, tiny_model_dir, capsys, case, code, message):
    image, question = str(work / "a.png"), QUESTION
    args = {
        "missing image": ["--image", str(work / "nope.png"), "--question", question],
        "broken image": ["--image", str(work / "broken.png"), "--question", question],
        "empty question": ["--image", image, "--question", "   "],
        "missing model": ["--image", image, "--question", question, "--model", str(work / "nomodel")],
        "missing adapter": ["--image", image, "--question", question, "--adapter",
                            str(work / "noadapter"), "--base", str(tiny_model_dir)],
        "missing batch": ["--batch", str(work / "none.csv")],
        "batch without columns": ["--batch", str(work / "cols.csv")],
    }[case]
    (work / "cols.csv").write_text("picture,text\na.png,hi\n")
    got, out, err = _ask(capsys, *args)
    assert got == code, err
    assert out == "" and err.count("\n") == 1 and err.startswith("vqatune ask: ")
    assert message.format(work=work) in err


def test_info_still_works(capsys):
    assert main(["info"]) == 0
    assert "transformers:" in capsys.readouterr().out


# -- The default prompt mode is the training's (vqatune_training.json) ---------------------

@pytest.fixture(scope="module")
def trained(work, tiny_model_dir):
    """The adapter as the train stage leaves it (trained on `none`), and its merge."""
    import shutil

    from vqatune.export.merge import MergeConfig, merge_adapter
    from vqatune.models.metadata import write_training_metadata

    adapter = work / "adapter_none"
    shutil.copytree(work / "adapter", adapter)
    write_training_metadata(adapter, prompt_mode="none")
    merge_adapter(tiny_model_dir, adapter, work / "merged_none", MergeConfig(dtype="float32", verify=False))
    return adapter, work / "merged_none"


def _batch_mode(work, capsys, *args) -> str:
    batch = work / "one.jsonl"
    batch.write_text(json.dumps({"image": "b.jpg", "question": QUESTION}) + "\n")
    code, out, _ = _ask(capsys, "--batch", str(batch), "--max-new-tokens", "2", *args)
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    return row["prompt_mode"]


def test_ask_defaults_to_the_trained_prompt_mode_and_an_explicit_one_wins(work, trained, tiny_model_dir, capsys):
    from vqatune.models.metadata import trained_prompt_mode

    adapter, merged = trained
    assert trained_prompt_mode(merged) == "none"  # the merge carries the record along
    assert _batch_mode(work, capsys, "--model", str(merged)) == "none"
    assert _batch_mode(work, capsys, "--adapter", str(adapter), "--base", str(tiny_model_dir)) == "none"
    assert _batch_mode(work, capsys, "--model", str(merged), "--prompt-mode", "static") == "static"
    # Nothing recorded (the base model, an older adapter): the static prompt, as before.
    assert _batch_mode(work, capsys, "--model", str(tiny_model_dir)) == "static"


def test_a_mixed_training_is_asked_without_a_prompt(work, tmp_path, capsys):
    import shutil

    from vqatune.models.metadata import inference_prompt_mode, write_training_metadata

    assert [inference_prompt_mode(m) for m in ("none", "static", "adaptive", "mix", None)] == \
        ["none", "static", "adaptive", "none", "static"]
    merged = tmp_path / "merged_mix"
    shutil.copytree(work / "merged", merged)
    write_training_metadata(merged, prompt_mode="mix")
    assert _batch_mode(work, capsys, "--model", str(merged)) == "none"
