"""Ask the exported GGUF pair a question about an image through llama.cpp itself.

Needs only ``llama-cpp-python`` built from source (it compiles llama.cpp, ~8 min on 2 cores;
it is not in requirements.txt), so it runs as a plain script in whichever environment has it:

    pip install llama-cpp-python==0.3.36          # in a separate venv is fine
    python src/vqatune/export/llama_cpp_client.py --model models/gguf/medgemma-kvasir.gguf \
        --mmproj models/gguf/mmproj-medgemma-kvasir.gguf --image polyp.jpg \
        --question "How many polyps are in the image?" [--system "..."]
    python src/vqatune/export/llama_cpp_client.py --model ... --mmproj ... --batch rows.jsonl

The chat template inside the GGUF renders the prompt (system text first in the user turn, the
image before the question, as in evaluation); decoding is greedy. Prints one JSON line:
the answer, the prompt and image token counts, and the llama-cpp-python version.
"""
from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from pathlib import Path


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def load(model: Path, mmproj: Path, n_ctx: int = 2048):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    return Llama(model_path=str(model), chat_handler=handler, n_ctx=n_ctx, n_gpu_layers=0,
                 verbose=False, seed=0)


def answer(llm, image: Path, question: str, system: str | None = None, max_tokens: int = 25) -> dict:
    """One greedy answer; the chat handler clears the KV cache first, so rows are independent."""
    import llama_cpp

    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": question},
    ]})
    reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                       top_k=1, repeat_penalty=1.0, stop=["<end_of_turn>"])
    # The tokens generated (the text drops byte tokens that form no UTF-8): those llama.cpp
    # evaluated after the prompt; the last one sampled is not evaluated when max_tokens ends it.
    n_prompt = reply["usage"]["prompt_tokens"]
    tokens = [int(t) for t in llm.input_ids[n_prompt:llm.n_tokens]]
    return {
        "answer": reply["choices"][0]["message"]["content"],
        "tokens": tokens,
        "finish_reason": reply["choices"][0]["finish_reason"],
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        "completion_tokens": reply["usage"]["completion_tokens"],
        "llama_cpp_python": llama_cpp.__version__,
    }


def ask(model: Path, mmproj: Path, image: Path, question: str, system: str | None = None,
        max_tokens: int = 25, n_ctx: int = 2048) -> dict:
    return answer(load(model, mmproj, n_ctx), image, question, system, max_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="<name>.gguf")
    parser.add_argument("--mmproj", type=Path, required=True, help="mmproj-<name>.gguf")
    parser.add_argument("--image", type=Path, help="one question: the image")
    parser.add_argument("--question", help="one question: the question")
    parser.add_argument("--batch", type=Path, default=None,
                        help="many questions, one model load: a JSONL file of {image, question, "
                             "system}; one JSON line out per row, in order")
    parser.add_argument("--system", default=None, help="system prompt (e.g. prompts.static)")
    parser.add_argument("--max-tokens", type=int, default=25)
    args = parser.parse_args(argv)
    if args.batch is None and (args.image is None or args.question is None):
        parser.error("give --image and --question, or --batch")
    rows = ([json.loads(line) for line in args.batch.read_text().splitlines() if line.strip()]
            if args.batch else [{"image": str(args.image), "question": args.question, "system": args.system}])
    for path in (args.model, args.mmproj, *(Path(row["image"]) for row in rows)):
        if not path.is_file():
            print(f"llama_cpp_client: {path} not found", file=sys.stderr)
            return 3
    llm = load(args.model, args.mmproj)
    for row in rows:
        print(json.dumps(answer(llm, Path(row["image"]), row["question"], row.get("system"),
                                args.max_tokens), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
