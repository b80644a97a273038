"""Ollama Modelfiles for the exported model: the Gemma 3 turn template, its stop token and the
static system prompt, so `ollama run` asks the question the way evaluation did.

Two files, because Ollama's support for a separate vision projector changed under Gemma 3:
- ``Modelfile``: the two GGUF files (``FROM`` model, ``FROM`` mmproj). Ollama up to 0.6.2 ran
  Gemma 3 on llama.cpp and used the mmproj for images; later releases run Gemma 3 on Ollama's
  own engine, which ignores a separate mmproj, so images fail there ("this model is missing data
  required for image input"; ollama #9967, unsloth #2399) while text still works.
- ``Modelfile.safetensors``: ``FROM`` the merged safetensors folder; Ollama converts it itself,
  vision included (reported working with Ollama 0.9.6 in ollama #9967), and
  ``ollama create --quantize q4_K_M`` quantizes it.

The template renders what the Hugging Face chat template renders (``prompts.build_messages`` +
``apply_chat_template``): the system prompt and a blank line open the first user turn, each turn
is ``<start_of_turn>{user|model}\\n...<end_of_turn>\\n``. The GGUF adds ``<bos>`` itself.
Ollama puts an image's tag before the text of its message, as evaluation puts the image before
the question. Adaptive prompts depend on the question and cannot live in a Modelfile: it
carries the static one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

STOP_TOKEN = "<end_of_turn>"

GEMMA3_TEMPLATE = """\
{{- $system := .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- $system = "" }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f"{what} contains \"\"\", which ends a Modelfile string; remove it")
    return f'"""{text}"""'


def modelfile_text(sources: list[str], system_prompt: str, *, comment: str = "") -> str:
    """A Modelfile: FROM each source in order, the Gemma 3 template, stop token, system prompt.

    Greedy decoding (temperature 0), as evaluation and ``vqatune ask`` generate.
    """
    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()] if comment else []
    lines += [f"FROM {source}" for source in sources]
    lines += [
        f"TEMPLATE {_quoted(GEMMA3_TEMPLATE, 'the template')}",
        f"PARAMETER stop {STOP_TOKEN}",
        "PARAMETER temperature 0",
        f"SYSTEM {_quoted(system_prompt.strip(), 'prompts.static')}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfiles(out_dir: str | Path, name: str, system_prompt: str, *,
                     merged_dir: Optional[str | Path] = None,
                     ollama_version: str = "0.6.2") -> list[Path]:
    """``Modelfile`` (the GGUF pair) and, given ``merged_dir``, ``Modelfile.safetensors``.

    Paths are relative to the Modelfile, which is how ``ollama create -f`` resolves them, so the
    folders can move together.
    """
    out_dir = Path(out_dir)
    gguf_file = out_dir / "Modelfile"
    gguf_file.write_text(modelfile_text(
        [f"./{name}.gguf", f"./mmproj-{name}.gguf"], system_prompt,
        comment=f"vqatune export for Ollama {ollama_version} (text model, then vision projector).\n"
                f"ollama create {name} -f Modelfile\n"
                f"Later Ollama releases ignore a separate mmproj for Gemma 3 (ollama #9967):\n"
                f"use Modelfile.safetensors there."))
    written = [gguf_file]
    if merged_dir is not None:
        # Relative to the parent: the stage writes into a staging sibling of the final folder.
        source = os.path.join("..", os.path.relpath(Path(merged_dir).resolve(),
                                                    out_dir.resolve().parent))
        safetensors_file = out_dir / "Modelfile.safetensors"
        safetensors_file.write_text(modelfile_text(
            [source], system_prompt,
            comment=f"vqatune export for Ollama >= 0.9.6: Ollama converts the merged safetensors\n"
                    f"itself, vision included.\n"
                    f"ollama create {name} -f Modelfile.safetensors --quantize q4_K_M"))
        written.append(safetensors_file)
    return written
