"""The export stage: llama.cpp's converter writes both GGUF files, they read back as gemma3 and
clip/gemma3 with every tensor, the text model reloads in transformers with the merged model's
logits, and the Modelfile parses as Ollama parses it."""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest_stages import load_stage
from vqatune.export.converter import ConverterError, install_converter, unpack_converter
from vqatune.export.gguf import (ExportConfig, ExportError, export_gguf, hparam_mismatches,
                                 llama_cpp_layer_types, marker_token_types, text_logit_difference)
from vqatune.export.ollama import GEMMA3_TEMPLATE, STOP_TOKEN
from vqatune.prompts import PromptsConfig

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-vqa"
# f16 weights: each rounds by <= 2^-11 relative; on logits of ~0.7 that is ~1e-3 at most.
F16_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def exported(merged_dir):
    """models/gguf and metrics/export.json as the stage writes them (the real params.yaml,
    with a test name)."""
    work = merged_dir.parent
    params = work / "params.yaml"
    text = (ROOT / "params.yaml").read_text().replace("name: medgemma-kvasir", f"name: {NAME}")
    params.write_text(text)
    out, metrics = work / "gguf", work / "export.json"
    # No evaluate predictions here (test_gguf_answers_like_the_evaluated_model measures them).
    code = load_stage("export").main(["--merged", str(merged_dir), "--out", str(out),
                                  "--metrics", str(metrics), "--params", str(params),
                                  "--data", str(work / "no-data"), "--predictions", str(work / "no-predictions")])
    assert code == 0
    return out, json.loads(metrics.read_text())


def _config(merged_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(merged_dir))


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def test_text_gguf_is_gemma3_with_every_language_model_tensor(merged_dir, exported):
    import gguf

    out, metrics = exported
    text = _reader(out / f"{NAME}.gguf")
    cfg = _config(merged_dir).get_text_config()
    assert _field(text, "general.architecture") == "gemma3"
    # Hand count: token_embd + output_norm, and per layer 4 projections, q/k norms and 4 norms
    # around attention and MLP, gate/up/down. No output.weight: llama.cpp reuses token_embd.
    assert len(text.tensors) == 2 + 13 * cfg.num_hidden_layers == metrics["text_tensors"]
    names = {t.name for t in text.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    # outtype f16 (params.yaml): matrices in F16, norms stay F32.
    types = {t.name: t.tensor_type for t in text.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "<start_of_turn>" in _field(text, "tokenizer.chat_template")
    assert _field(text, "tokenizer.ggml.model") == "llama"  # SentencePiece, from tokenizer.model
    # Turn markers are single special tokens for llama.cpp, not spelled out letter by letter.
    assert set(marker_token_types(out / f"{NAME}.gguf").values()) <= {"CONTROL", "USER_DEFINED"}


def test_mmproj_gguf_is_clip_with_gemma3_projector(merged_dir, exported):
    out, metrics = exported
    mmproj = _reader(out / f"mmproj-{NAME}.gguf")
    vision = _config(merged_dir).vision_config
    assert _field(mmproj, "general.architecture") == "clip"
    assert _field(mmproj, "general.type") == "mmproj"
    assert _field(mmproj, "clip.projector_type") == "gemma3"
    # Hand count: patch embedding (weight, bias) + positions, 16 per SigLIP layer, the final
    # layer norm (2), the projector's matrix and norm.
    assert len(mmproj.tensors) == 3 + 16 * vision.num_hidden_layers + 2 + 2 == metrics["mmproj_tensors"]
    assert {"mm.input_projection.weight", "mm.soft_emb_norm.weight"} <= {t.name for t in mmproj.tensors}


def test_text_gguf_reloads_in_transformers_with_the_merged_logits(merged_dir, exported):
    out, metrics = exported
    diff, scale = text_logit_difference(merged_dir, out / f"{NAME}.gguf")
    assert scale > 0.1  # logits of a real size, not a degenerate model
    assert diff < F16_TOLERANCE
    assert metrics["text_max_abs_logit_diff"] == pytest.approx(diff)


def test_gguf_hyperparameters_are_what_llama_cpp_will_run(merged_dir, exported):
    out, metrics = exported
    text_config = _config(merged_dir).get_text_config()
    text = _reader(out / f"{NAME}.gguf")
    # The tiny model's [sliding, full] is not Gemma 3's 5:1, which llama.cpp assumes unless the
    # GGUF says otherwise: convert_hooks.py writes the pattern, one bool (sliding) per layer.
    assert text_config.layer_types != llama_cpp_layer_types(text_config.num_hidden_layers)
    assert _field(text, "gemma3.attention.sliding_window_pattern") == [
        t == "sliding_attention" for t in text_config.layer_types]
    assert hparam_mismatches(out / f"{NAME}.gguf", text_config) == []
    assert metrics["llama_cpp_mismatches"] == []  # mmproj: none


def test_gguf_chat_template_puts_the_processors_blank_lines_around_the_image(tiny_model_dir, exported):
    """llama.cpp renders an image as a media marker in message text and replaces it with
    <start_of_image> ... <end_of_image>; the processor writes "\n\n" before and after. The GGUF's
    template (rendered as llama-cpp-python renders it) adds them, so the text llama.cpp
    tokenizes is the processor's, marker for image."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from vqatune.models.loading import load_processor
    from vqatune.prompts import build_messages

    out, _ = exported
    template = _field(_reader(out / f"{NAME}.gguf"), "tokenizer.chat_template")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    processor = load_processor(tiny_model_dir)
    for mode in ("none", "static", "adaptive"):
        messages = build_messages("How many polyps are in the image?", mode, PromptsConfig())
        hf = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        as_llama_cpp = [dict(m, content=[{"type": "text", "text": "<__media__>"} if p["type"] == "image"
                                         else p for p in m["content"]]) for m in messages]
        got = env.from_string(template).render(messages=as_llama_cpp, add_generation_prompt=True,
                                               bos_token="<bos>")
        assert got == hf.replace("<start_of_image>", "\n\n<__media__>\n\n")
    # llama-server and llama-mtmd-cli: a string content with the (server: random) marker.
    got = env.from_string(template).render(messages=[{"role": "user", "content": "<__media_x1__>Why?"}],
                                           add_generation_prompt=True, bos_token="<bos>")
    assert got == "<bos><start_of_turn>user\n\n\n<__media_x1__>\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"


def test_hyperparameter_drift_is_reported(merged_dir, exported):
    out, _ = exported
    drifted = copy.deepcopy(_config(merged_dir).get_text_config())
    drifted.rope_parameters["full_attention"]["rope_theta"] = 12345.0
    found = hparam_mismatches(out / f"{NAME}.gguf", drifted)
    assert len(found) == 1 and "rope.freq_base is 1000000.0, config says 12345.0" in found[0]
    drifted = copy.deepcopy(_config(merged_dir).get_text_config())
    drifted.layer_types = ["full_attention"] * drifted.num_hidden_layers
    found = hparam_mismatches(out / f"{NAME}.gguf", drifted)
    assert len(found) == 1 and found[0].startswith("layer types: llama.cpp runs ['sliding_attention'")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's parser reads them (ollama parser/parser.go):
    a value ends at whitespace once it unquotes, \"\"\"...\"\"\" spans lines, # starts a comment."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or len(text)
            continue
        j = i
        while j < len(text) and text[j].isalpha():
            j += 1
        name = text[i:j].lower()
        assert text[j] in " \t", f"invalid command at {text[i:j + 10]!r}"
        if name == "parameter":
            j += 1
            k = j
            while text[k] not in " \t":
                k += 1
            name, j = text[j:k], k
        start = j + 1
        end = start
        while True:
            while end < len(text) and text[end] not in " \t\r\n":
                end += 1
            value = text[start:end].strip()
            if value.startswith('"""'):
                done = len(value) >= 6 and value.endswith('"""')
                value = value[3:-3]
            elif value.startswith('"'):
                done = len(value) >= 2 and value.endswith('"')
                value = value[1:-1]
            else:
                done = True
            if done or end >= len(text):
                assert done, f"unterminated string in {name}"
                break
            end += 1
        commands.append((name, value))
        i = end
    return commands


def test_modelfile_names_both_files_template_stop_and_system_prompt(merged_dir, exported):
    out, _ = exported
    commands = parse_modelfile((out / "Modelfile").read_text())
    assert [arg for cmd, arg in commands if cmd == "from"] == [f"./{NAME}.gguf", f"./mmproj-{NAME}.gguf"]
    assert dict(commands)["template"] == GEMMA3_TEMPLATE
    assert ("stop", STOP_TOKEN) in commands
    # The static prompt ends in a quote: it must survive the closing \"\"\" intact.
    assert dict(commands)["system"] == PromptsConfig().static
    assert dict(commands)["system"].endswith('"Ulcerative Colitis"')
    for cmd, arg in commands:
        if cmd == "from":
            assert (out / arg).is_file()

    safetensors = parse_modelfile((out / "Modelfile.safetensors").read_text())
    source = [arg for cmd, arg in safetensors if cmd == "from"]
    assert source == ["../merged"] and (out / source[0] / "config.json").is_file()


def test_export_refuses_the_transformers5_vision_layout(merged_dir, tmp_path):
    """A checkpoint saved as transformers 5 names it (vision_tower.embeddings.*) fails the mmproj
    conversion; the stage says so before converting."""
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "merged"
    shutil.copytree(merged_dir, renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    tensors = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in tensors.items()}
    save_file(tensors, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"vision_tower\.(embeddings|encoder|post_layernorm).*layout"):
        export_gguf(renamed, tmp_path / "gguf", ExportConfig(name=NAME), "system")
    assert not (tmp_path / "gguf").exists()


def test_export_refuses_turn_markers_llama_cpp_would_spell_out(merged_dir, tmp_path):
    """transformers 5 saves no added_tokens_decoder; without it the converter makes
    <start_of_turn> a normal piece, and llama.cpp tokenizes it as 11 characters."""
    stripped = tmp_path / "merged"
    shutil.copytree(merged_dir, stripped)
    config = json.loads((stripped / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (stripped / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="<start_of_turn> is a NORMAL token.*added_tokens_decoder"):
        export_gguf(stripped, tmp_path / "gguf", ExportConfig(name=NAME, verify=False), "system")
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("line, key", [("name: ../evil name", "export.name"),
                                       ("agreement_rows: -1", "export.agreement_rows")])
def test_a_bad_export_value_stops_with_the_key(tmp_path, capsys, line, key):
    params = tmp_path / "params.yaml"
    params.write_text(f"export:\n  {line}\n")
    code = load_stage("export").main(["--merged", str(tmp_path), "--out", str(tmp_path / "gguf"),
                                  "--metrics", str(tmp_path / "m.json"), "--params", str(params)])
    assert code == 2 and key in capsys.readouterr().err


def _tarball(path: Path, members: dict[str, bytes], links: dict[str, str] = {}) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_converter_unpacks_only_its_files(tmp_path):
    vendor = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    sdist = _tarball(tmp_path / "sdist.tar.gz", {
        vendor + "convert_hf_to_gguf.py": b"print('converter')\n",
        vendor + "conversion/gemma.py": b"",
        vendor + "gguf-py/gguf/__init__.py": b"",
        vendor + "ggml/src/ggml.c": b"int main;",
        "llama_cpp_python-0.3.36/setup.py": b"",
    }, links={vendor + "conversion/escape.py": "/etc/passwd"})
    dest = unpack_converter(sdist, tmp_path / "converter")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["conversion/gemma.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]


def test_converter_refuses_an_sdist_with_another_hash(tmp_path):
    sdist = _tarball(tmp_path / "llama_cpp_python-0.3.36.tar.gz", {"x": b"not the release"})
    with pytest.raises(ConverterError, match="sha256 .* is not the pinned"):
        install_converter(tmp_path / "converter", sdist=sdist)
    assert not (tmp_path / "converter").exists()


def _llama_cpp_python() -> str | None:
    """A Python with llama-cpp-python (built from source): $VQATUNE_LLAMA_CPP_PYTHON or ours."""
    candidate = os.environ.get("VQATUNE_LLAMA_CPP_PYTHON", sys.executable)
    probe = subprocess.run([candidate, "-c", "import llama_cpp.mtmd_cpp"], capture_output=True)
    return candidate if probe.returncode == 0 else None


@pytest.mark.slow
def test_llama_cpp_answers_a_question_about_an_image(merged_dir, exported, tmp_path):
    """llama.cpp itself loads the pair, encodes the image and answers (the tiny model's text is
    noise; what counts is that both files load and the image becomes tokens)."""
    import numpy as np
    from PIL import Image

    python = _llama_cpp_python()
    if python is None:
        pytest.skip("needs llama-cpp-python built from source; set VQATUNE_LLAMA_CPP_PYTHON")
    out, _ = exported
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    client = ROOT / "src" / "vqatune" / "export" / "llama_cpp_client.py"
    base = [python, str(client), "--model", str(out / f"{NAME}.gguf"),
            "--mmproj", str(out / f"mmproj-{NAME}.gguf"), "--question", "How many polyps are there?",
            "--max-tokens", "8"]
    with_image = subprocess.run(base + ["--image", str(image)], capture_output=True, text=True, timeout=300)
    assert with_image.returncode == 0, with_image.stderr[-2000:]
    reply = json.loads(with_image.stdout.strip().splitlines()[-1])
    assert reply["completion_tokens"] >= 1 and isinstance(reply["answer"], str)
    # llama.cpp's prompt is transformers' token for token (16 image tokens from 8x8 patches
    # pooled 2x2, one <start_of_turn>, the "\n\n" the processor wraps around the image, which
    # the GGUF's chat template adds for llama.cpp).
    from vqatune.models.loading import load_processor
    from vqatune.prompts import build_messages

    processor = load_processor(merged_dir)
    prompt = processor.apply_chat_template(build_messages("How many polyps are there?", "none",
                                                          PromptsConfig()),
                                           add_generation_prompt=True, tokenize=False)
    hf_tokens = processor(text=[prompt], images=[[Image.open(image)]],
                          add_special_tokens=False)["input_ids"][0]
    assert reply["prompt_tokens"] == len(hf_tokens)
    print(json.dumps(reply))


GO_RENDERER = r'''
// Renders an Ollama .Messages template as ollama's template.Execute does: System = the system
// messages joined by a blank line, Messages = every message, system ones included.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	var system []string
	var msgs []*Message
	for i := range in.Messages {
		if in.Messages[i].Role == "system" {
			system = append(system, in.Messages[i].Content)
		}
		msgs = append(msgs, &in.Messages[i])
	}
	t := template.Must(template.New("").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs}); err != nil {
		panic(err)
	}
}
'''


def test_ollama_template_renders_as_the_chat_template(tiny_model_dir, tmp_path):
    """Go's text/template (Ollama's engine) renders the Modelfile template to exactly what the
    Hugging Face chat template gives evaluation, but for <bos> (the GGUF adds it) and the image
    tag (Ollama writes [img-0] where the processor expands <start_of_image>)."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("VQATUNE_REQUIRE_GO"):  # CI (.ci/run) installs golang-go
            pytest.fail("VQATUNE_REQUIRE_GO is set but there is no `go` on PATH")
        pytest.skip("needs the Go toolchain (apt-get install golang-go)")
    from vqatune.models.loading import load_processor
    from vqatune.prompts import build_messages

    (tmp_path / "main.go").write_text(GO_RENDERER)
    env = {**os.environ, "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(tmp_path / "render"), str(tmp_path / "main.go")],
                   check=True, env=env, capture_output=True, timeout=300)
    processor, prompts = load_processor(tiny_model_dir), PromptsConfig()

    def ollama(messages):
        result = subprocess.run([str(tmp_path / "render")], capture_output=True, text=True, check=True,
                                input=json.dumps({"template": GEMMA3_TEMPLATE, "messages": messages}))
        return "<bos>" + result.stdout.replace("[img-0]", "<start_of_image>")

    question = "How many polyps are in the image?"
    system = {"role": "system", "content": prompts.static}
    cases = [
        (build_messages(question, "static", prompts), [system, {"role": "user", "content": "[img-0]" + question}]),
        (build_messages(question, "none", prompts), [{"role": "user", "content": "[img-0]" + question}]),
        (build_messages(question, "static", prompts, answer="1")
         + [{"role": "user", "content": [{"type": "text", "text": "And what colour?"}]}],
         [system, {"role": "user", "content": "[img-0]" + question}, {"role": "assistant", "content": "1"},
          {"role": "user", "content": "And what colour?"}]),
    ]
    for hf_messages, ollama_messages in cases:
        expected = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        assert ollama(ollama_messages) == expected


@pytest.mark.slow
def test_llama_cpp_logits_match_transformers(merged_dir, exported, tmp_path):
    """llama.cpp's own logits for the text GGUF equal transformers' for the merged model, layer
    pattern included (the GGUF carries the tiny model's [sliding, full]; convert_hooks.py)."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    python = _llama_cpp_python()
    if python is None:
        pytest.skip("needs llama-cpp-python built from source; set VQATUNE_LLAMA_CPP_PYTHON")
    out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How many polyps are there?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    script = ("import json, sys, numpy, llama_cpp\n"
              "m = llama_cpp.Llama(model_path=sys.argv[1], logits_all=True, n_ctx=256, verbose=False)\n"
              "ids = json.loads(sys.argv[2]); m.eval(ids)\n"
              "numpy.save(sys.argv[3], numpy.array(m.scores[:len(ids)]))\n")
    result = subprocess.run([python, "-c", script, str(out / f"{NAME}.gguf"), json.dumps(ids),
                             str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    llama_logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))

    model = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32)
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids])).logits[0, :, :llama_logits.shape[1]]
    assert want.abs().max() > 0.1
    assert (llama_logits - want).abs().max() < F16_TOLERANCE


# -- The GGUF answers like the evaluated model ----------------------------------------------

def test_a_llama_cpp_crash_says_what_to_do(tmp_path):
    """llama.cpp dying by a signal prints nothing (the client loads quietly): the error names the
    signal and the libstdc++ preload that fixed it on a GPU machine."""
    from vqatune.export.agreement import gguf_replies

    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"signal 11.*LD_PRELOAD=\$\(g\+\+ -print-file-name=libstdc"):
        gguf_replies(str(crashing), tmp_path / "m.gguf", tmp_path / "p.gguf",
                     [{"image": tmp_path / "i.png", "question": "q"}])


def test_agreement_counts_and_lists_every_difference():
    from vqatune.export.agreement import agreement, system_text
    from vqatune.prompts import build_messages

    rows = [{"img_id": "a", "question": "q1", "prediction": "yes"},
            {"img_id": "b", "question": "q2", "prediction": "Pink; red"},
            {"img_id": "c", "question": "q3", "prediction": "1"}]
    got = agreement(["yes", "pink;  red", "2"], rows)
    assert got["gguf_agreement"] == round(1 / 3, 4) and got["gguf_agreement_n"] == 3
    assert [(d["img_id"], d["same_ignoring_case"]) for d in got["gguf_differences"]] == [("b", True), ("c", False)]
    prompts = PromptsConfig()
    assert system_text(build_messages("How many polyps?", "none", prompts)) is None
    assert system_text(build_messages("How many polyps?", "static", prompts)) == prompts.static


def test_export_metrics_say_why_the_agreement_is_not_there(exported):
    from vqatune.export.agreement import llama_cpp_python

    _, metrics = exported
    assert metrics["gguf_agreement"] is None
    reason = metrics["gguf_agreement_reason"]
    assert ("not importable" in reason) if llama_cpp_python() is None else ("not found: run the evaluate" in reason)


def test_agreement_sample_is_fixed_and_spread_over_categories():
    from vqatune.export.agreement import sample_rows

    rows = [{"img_id": str(i), "question": f"q{i}", "category": c, "prediction": "x"}
            for i, c in enumerate(["size"] * 5 + ["colour"] * 3 + ["counting"])]
    sample = sample_rows(rows, 6)
    assert [r["category"] for r in sample] == ["colour", "counting", "size", "colour", "size", "colour"]
    assert sample == sample_rows(rows, 6) and sample_rows(rows, 0) == [] and len(sample_rows(rows, 99)) == 9




@pytest.mark.slow
def test_gguf_answers_like_the_evaluated_model(merged_dir, exported, tmp_path):
    """The export stage's measurement, end to end: test rows (prepared-size images, as the
    prepare stage writes them) answered by transformers (generate_answers, the evaluate stage's
    path) are asked of the exported pair through llama.cpp with the trained prompt mode.

    The fixture's model is random (its logits are nearly flat, and it emits stray byte tokens),
    so the f16 export can flip a near tie, and a byte token that forms no UTF-8 text decodes
    differently; what must hold is that llama.cpp sees the same prompt, token for token, and
    that every difference is one of those two. The rate is printed; the trained pipeline's is
    in metrics/export.json."""
    import numpy as np
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, Value

    from vqatune.export.agreement import llama_cpp_python, measure_agreement
    from vqatune.generation.generate import generate_answers
    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.models.metadata import inference_prompt_mode, trained_prompt_mode
    from vqatune.prompts import build_messages

    python = llama_cpp_python()
    if python is None:
        pytest.skip("needs llama-cpp-python built from source; set VQATUNE_LLAMA_CPP_PYTHON")
    from PIL import Image

    out, _ = exported
    mode = inference_prompt_mode(trained_prompt_mode(merged_dir))
    processor, prompts, rng = load_processor(merged_dir), PromptsConfig(), np.random.default_rng(1)
    size = processor.image_processor.size["height"]
    questions = [("How many polyps are in the image?", "counting"), ("What color is the abnormality?", "colour"),
                 ("Is there text?", "instrument_details"), ("What is the size of the polyp?", "size")] * 3
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in questions]
    features = Features({"image": ImageFeature(), "img_id": Value("string"), "question": Value("string"),
                         "category": Value("string"), "answer": Value("string")})
    DatasetDict({"test": Dataset.from_dict(
        {"image": images, "img_id": [f"img{n}" for n in range(len(questions))],
         "question": [q for q, _ in questions], "category": [c for _, c in questions],
         "answer": ["1"] * len(questions)}, features=features)}).save_to_disk(str(tmp_path / "data"))
    model = load_base_model(merged_dir, device="cpu")
    evaluated = generate_answers(model, processor, [build_messages(q, mode, prompts) for q, _ in questions],
                                 images, max_new_tokens=12)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / f"tuned_{mode}.jsonl").write_text("".join(
        json.dumps({"img_id": f"img{n}", "question": q, "category": c, "prediction": a}) + "\n"
        for n, ((q, c), a) in enumerate(zip(questions, evaluated))))
    result = measure_agreement(python, out / f"{NAME}.gguf", out / f"mmproj-{NAME}.gguf", merged_dir,
                               tmp_path / "data", tmp_path / "predictions", prompts, len(questions), 12)
    print(json.dumps(result, indent=1))
    assert result["gguf_agreement_n"] == len(questions)
    assert result["gguf_prompt_length_differs"] == 0  # the image's blank lines: convert_hooks.py
    # Never a different prompt (the chat template's blank lines, the image tokens) nor an answer
    # that parts where transformers was sure of its token.
    for difference in result["gguf_differences"]:
        assert difference["reason"].split(":")[0] in ("decoding", "near tie"), difference
