"""Run llama.cpp's ``convert_hf_to_gguf.py`` with two additions, so that llama.cpp runs the
exported Gemma 3 the way transformers runs the merged model (the evaluated path):

- **The layer pattern.** llama.cpp runs Gemma 3 with five sliding-window layers to one global,
  and sliding layers with the sliding RoPE (theta 10k, no scaling), unless the GGUF carries
  ``gemma3.attention.sliding_window_pattern`` (one bool per layer; llama.cpp reads it). The
  converter writes none, so a model whose ``layer_types`` differ (the tiny model's
  ``[sliding, full]``) ran its global layer as a sliding one. The hook writes the pattern when
  ``layer_types`` is not llama.cpp's default (MedGemma's 34 layers are; their GGUF is unchanged).
- **Blank lines around the image.** The Gemma 3 processor replaces the template's
  ``<start_of_image>`` with ``"\\n\\n<start_of_image>" + image tokens + "<end_of_image>\\n\\n"``.
  llama.cpp renders an image as a media marker (``<__media__>``; llama-server:
  ``<__media_<random>__>``) inside a text part or a string content, through the GGUF's chat
  template, then mtmd replaces the marker with ``<start_of_image>`` + image + ``<end_of_image>``
  only. The hook makes the GGUF's template put the two blank lines around the marker, so
  llama.cpp's prompt is the processor's token for token. (Ollama's own Gemma 3 engine adds the
  blank lines itself, around its ``[img-N]`` tag: the Modelfile template does not.)

    python convert_hooks.py <convert_hf_to_gguf.py> <the converter's arguments>
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MARKER_START, MARKER_END = "<__media_", "__>"
# Where the Gemma 3 / MedGemma template (tokenizer_config.json, verbatim) writes message text.
_TEXT_OUTPUTS = ("{{ item['text'] | trim }}", "{{ message['content'] | trim }}")
_WRAP = f" | replace('{MARKER_START}', '\n\n{MARKER_START}') | replace('{MARKER_END}', '{MARKER_END}\n\n')"
LLAMA_CPP_SWA_PATTERN = 6


def llama_cpp_chat_template(template: str) -> str:
    """``template`` with a blank line before and after each llama.cpp media marker in message
    text (after ``trim``, so an image that opens the message keeps its leading blank line).
    A template without Gemma 3's text outputs is returned unchanged."""
    for output in _TEXT_OUTPUTS:
        template = template.replace(output, output[:-3] + _WRAP + " }}")
    return template


def wraps_media_marker(template: str) -> bool:
    return _WRAP in template


def llama_cpp_default_layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % LLAMA_CPP_SWA_PATTERN == 0 else "sliding_attention"
            for i in range(num_layers)]


def install_hooks() -> None:
    """Patch the converter's gguf writer and text model (the converter's own modules, already on
    sys.path) before it runs."""
    import gguf
    from conversion.base import TextModel

    add_chat_template = gguf.GGUFWriter.add_chat_template

    def add_chat_template_for_llama_cpp(self, value):
        if isinstance(value, str) and self.arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]:
            value = llama_cpp_chat_template(value)
        add_chat_template(self, value)

    gguf.GGUFWriter.add_chat_template = add_chat_template_for_llama_cpp

    set_gguf_parameters = TextModel.set_gguf_parameters

    def set_gguf_parameters_with_layer_pattern(self):
        set_gguf_parameters(self)
        layer_types = self.hparams.get("layer_types")
        if (getattr(self, "model_arch", None) == gguf.MODEL_ARCH.GEMMA3 and layer_types
                and list(layer_types) != llama_cpp_default_layer_types(len(layer_types))):
            self.gguf_writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])

    TextModel.set_gguf_parameters = set_gguf_parameters_with_layer_pattern


def main(argv: list[str]) -> None:
    script = Path(argv[0]).resolve()
    sys.argv = [str(script), *argv[1:]]
    # Not this folder: its gguf.py would shadow the converter's gguf package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(script.parent))
    sys.path.insert(1, str(script.parent / "gguf-py"))
    install_hooks()
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
