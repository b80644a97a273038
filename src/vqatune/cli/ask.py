"""`vqatune ask`: answer questions about images with the merged model or base + adapter.

The image is decoded and resized by the prepare step's own ``decode_image``, the messages come
from ``prompts.build_messages`` and the answer from ``generation.generate_answers``: a question
asked here is asked exactly as evaluation asked it.

Exit codes a script can rely on (``EXIT_*``): 0 answered; 2 bad arguments or params; 3 image
missing or unreadable; 4 model or adapter folder missing or damaged; 5 empty question, control characters, or a
question longer than the model's context leaves room for; 6 batch file missing
or malformed; 7 batch written but some rows could not be answered (each has an ``error``).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from ..config import ConfigError, InputError, ModelConfig, PrepareConfig, load_params, section
from ..prompts import PROMPT_MODES, PromptsConfig, build_messages

log = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_IMAGE, EXIT_MODEL, EXIT_QUESTION, EXIT_BATCH, EXIT_ROWS = 0, 2, 3, 4, 5, 6, 7


class AskError(Exception):
    """A problem the user fixes; ``code`` is the exit status, the message one line."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Question:
    image: str
    question: str
    id: Optional[str] = None


def load_image(path: str | Path, size: int, prepare: PrepareConfig):
    """The image as evaluation saw it: RGB, resized like the prepare stage; AskError if not."""
    from ..data.prepare import decode_image

    path = Path(path)
    if not path.is_file():
        raise AskError(f"image {path} not found", EXIT_IMAGE)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AskError(f"image {path} cannot be read ({err.strerror})", EXIT_IMAGE) from err
    image, reason = decode_image({"bytes": data, "path": str(path)}, size, prepare.resample,
                                 prepare.max_image_pixels)
    if image is None:
        raise AskError(f"image {path} cannot be used ({reason.replace('_', ' ')})", EXIT_IMAGE)
    return image


def check_question(question: Optional[str], hint: str = "") -> str:
    """The question stripped; AskError if it is empty or holds control characters. Its length is
    checked against the model's context once the model is loaded (``check_fits``)."""
    if question is None or not question.strip():
        raise AskError(f"the question is empty{hint}", EXIT_QUESTION)
    question = question.strip()
    bad = next((c for c in question if (ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise AskError(f"the question contains the control character {bad!r}; remove it", EXIT_QUESTION)
    return question


def context_length(model) -> int:
    """The most tokens the language model attends over: prompt, image tokens and answer together."""
    return model.config.get_text_config().max_position_embeddings


def check_fits(processor, question: str, prompt_mode: str, prompts: PromptsConfig, image, *,
               context: int, max_new_tokens: int) -> None:
    """AskError unless the prompt as the model sees it (chat template, system prompt, the image's
    tokens, the question) plus ``max_new_tokens`` fits ``context`` tokens. Refused, not cut: a
    question cut short is another question."""
    from ..generation.generate import prompt_texts

    text = prompt_texts(processor, [build_messages(question, prompt_mode, prompts)])[0]
    prompt = len(processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0])
    if prompt + max_new_tokens > context:
        question = len(processor.tokenizer(question, add_special_tokens=False)["input_ids"])
        room = context - max_new_tokens - (prompt - question)
        raise AskError(f"the question is {question} tokens; the model's context is {context} tokens, "
                       f"which leaves {max(room, 0)} for the question beside the image, the prompt and "
                       f"{max_new_tokens} answer tokens", EXIT_QUESTION)


def read_batch(path: str | Path) -> list[Question]:
    """Rows of a .csv (header) or .jsonl file with ``image`` and ``question`` (``id`` optional).

    Image paths are relative to the batch file's folder and may not leave it.
    """
    path = Path(path)
    if not path.is_file():
        raise AskError(f"batch file {path} not found", EXIT_BATCH)
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        elif path.suffix.lower() in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise AskError(f"{path}:{n}: not JSON ({err.msg})", EXIT_BATCH) from err
        else:
            raise AskError(f"batch file {path} must end in .csv or .jsonl", EXIT_BATCH)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AskError(f"batch file {path} cannot be read ({err})", EXIT_BATCH) from err
    if not rows:
        raise AskError(f"batch file {path} has no rows", EXIT_BATCH)
    if not all(isinstance(r, dict) and "image" in r and "question" in r for r in rows):
        raise AskError(f"batch file {path}: every row needs 'image' and 'question'", EXIT_BATCH)
    return [Question(image=str(r["image"] or ""), question=str(r["question"] or ""),
                     id=None if r.get("id") in (None, "") else str(r["id"])) for r in rows]


def resolve_in(folder: Path, relative: str) -> Optional[Path]:
    """``folder / relative`` unless it leaves ``folder`` (``..``, absolute paths, links)."""
    root = folder.resolve()
    target = (root / relative).resolve()
    return target if target.is_relative_to(root) else None


def load_model(model_dir: Optional[str], adapter_dir: Optional[str], base_dir: str, *,
               quantization: str = "none", device: Optional[str] = None,
               trust_remote_code: bool = False):
    """(model, processor): a full model folder, or ``base_dir`` with ``adapter_dir`` on top."""
    from ..models.loading import load_base_model, load_processor, load_tuned_model

    folder = Path(model_dir if adapter_dir is None else base_dir)
    if not (folder / "config.json").is_file():
        hint = ("run `dvc repro merge` or pass --model" if adapter_dir is None
                else "run `dvc repro base_model` or pass --base")
        raise AskError(f"model folder {folder} not found (no config.json); {hint}", EXIT_MODEL)
    if adapter_dir is None:
        model = load_base_model(folder, quantization=quantization, device=device,
                                trust_remote_code=trust_remote_code)
        return model, load_processor(folder, trust_remote_code=trust_remote_code)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise AskError(f"adapter folder {adapter_dir} not found (no adapter_config.json); run "
                       "`dvc repro train` or pass --adapter", EXIT_MODEL)
    # Loaded as the evaluate stage loads it: the same numbers.
    return load_tuned_model(folder, adapter_dir, quantization=quantization, device=device,
                            trust_remote_code=trust_remote_code)


def default_prompt_mode(model_dir: Optional[str], adapter_dir: Optional[str]) -> str:
    """The prompt mode the model was trained with (``vqatune_training.json`` in the adapter or
    merged folder; a ``mix`` training is asked with ``none``); ``static`` when none is recorded."""
    from ..models.metadata import inference_prompt_mode, trained_prompt_mode

    trained = trained_prompt_mode(adapter_dir if adapter_dir is not None else model_dir)
    mode = inference_prompt_mode(trained)
    log.info("prompt mode %s (%s)", mode, f"trained with {trained}" if trained else "no training recorded")
    return mode


def image_size(processor) -> int:
    size = processor.image_processor.size
    return int(size.get("height") or size.get("shortest_edge"))


def answer_questions(model, processor, questions: list[Question], images: list, prompt_mode: str,
                     prompts: PromptsConfig, *, batch_size: int, max_new_tokens: int) -> list[str]:
    from ..generation.generate import generate_answers

    messages = [build_messages(q.question, prompt_mode, prompts) for q in questions]
    return generate_answers(model, processor, messages, images, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=len(questions) > batch_size)


def load_settings(params_path: Optional[str]) -> tuple[PromptsConfig, PrepareConfig, ModelConfig]:
    """The prompts, image handling and trust flag of params.yaml (defaults when there is none)."""
    if params_path is None:
        params = load_params("params.yaml") if Path("params.yaml").is_file() else {}
    else:
        params = load_params(params_path)
    return (section(params, "prompts", PromptsConfig), section(params, "prepare", PrepareConfig),
            section(params, "model", ModelConfig))


def run(args) -> int:
    """The ``ask`` subcommand (args from ``cli.build_parser``)."""
    prompts, prepare, model_cfg = load_settings(args.params)
    if args.batch is None:
        question = check_question(args.question, "; pass --question TEXT")
        if args.image is None:
            raise AskError("pass --image PATH (or --batch FILE)", EXIT_USAGE)
        questions = [Question(image=args.image, question=question)]
        batch_dir = None
    else:
        questions = read_batch(args.batch)
        batch_dir = Path(args.batch).parent
    # Fail on a missing model before any image work, and on a bad single image before loading.
    if args.batch is None:
        load_image(args.image, 16, prepare)
    if args.prompt_mode is None:
        args.prompt_mode = default_prompt_mode(args.model, args.adapter)
    model, processor = load_model(args.model, args.adapter, args.base,
                                  quantization=args.quantization, device=args.device,
                                  trust_remote_code=model_cfg.trust_remote_code)
    size, context = image_size(processor), context_length(model)

    # Rows: a bad row (image, path, question) is reported with its error, never dropped.
    results: list[dict] = []
    ready: list[tuple[int, Question, object]] = []
    for n, q in enumerate(questions):
        row = {"id": q.id if q.id is not None else str(n), "image": q.image, "question": q.question,
               "prompt_mode": args.prompt_mode, "answer": None, "error": None}
        results.append(row)
        try:
            question = check_question(q.question)
            path = Path(q.image) if batch_dir is None else resolve_in(batch_dir, q.image)
            if path is None:
                raise AskError(f"image path {q.image!r} leaves the batch file's folder", EXIT_IMAGE)
            image = load_image(path, size, prepare)
            check_fits(processor, question, args.prompt_mode, prompts, image, context=context,
                       max_new_tokens=args.max_new_tokens)
            ready.append((n, q, image))
        except AskError as err:
            if batch_dir is None:
                raise
            row["error"] = str(err)
    answers = answer_questions(model, processor, [q for _, q, _ in ready], [i for _, _, i in ready],
                               args.prompt_mode, prompts, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens) if ready else []
    for (n, _, _), answer in zip(ready, answers):
        results[n]["answer"] = answer

    if args.batch is None:
        print(results[0]["answer"])
        return EXIT_OK
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row in results:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    failed = sum(row["error"] is not None for row in results)
    print(f"ask: {len(results) - failed} of {len(results)} rows answered"
          + (f", {failed} with an error" if failed else "")
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return EXIT_ROWS if failed else EXIT_OK


def add_parser(sub) -> None:
    """Register ``ask`` on the ``vqatune`` subparsers."""
    ask = sub.add_parser("ask", help="answer a question about an image with the tuned model",
                         description=__doc__.split("\n\n")[0],
                         epilog=__doc__.split("\n\n")[2],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ask.add_argument("--image", help="the image (png, jpg, ...)")
    ask.add_argument("--question", help="the question about it")
    ask.add_argument("--batch", help="a .csv or .jsonl with image,question[,id] rows; image paths "
                                     "relative to the file; answers are written as JSONL")
    ask.add_argument("--output", help="--batch: the JSONL to write (default: standard output)")
    which = ask.add_mutually_exclusive_group()
    which.add_argument("--model", default="models/merged",
                       help="a full model folder (default: models/merged)")
    which.add_argument("--adapter", help="a LoRA adapter folder, applied to --base")
    ask.add_argument("--base", default="models/base", help="the base model for --adapter")
    ask.add_argument("--prompt-mode", choices=PROMPT_MODES, default=None,
                     help="system prompt: none, static or adaptive (default: the mode the model "
                          "was trained with, from its vqatune_training.json; a `mix` training "
                          "-> none; static when nothing is recorded)")
    ask.add_argument("--max-new-tokens", type=int, default=25)
    ask.add_argument("--batch-size", type=int, default=8)
    ask.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="none")
    ask.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ask.add_argument("--params", default=None,
                     help="params.yaml for prompts and image handling (default: ./params.yaml if any)")
    ask.set_defaults(func=main)


def main(args) -> int:
    if args.max_new_tokens < 1 or args.batch_size < 1:
        print("vqatune ask: --max-new-tokens and --batch-size must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except AskError as err:
        print(f"vqatune ask: {err}", file=sys.stderr)
        return err.code
    except InputError as err:  # a damaged model or adapter folder
        print(f"vqatune ask: {err}", file=sys.stderr)
        return EXIT_MODEL
    except ConfigError as err:
        print(f"vqatune ask: {err}", file=sys.stderr)
        return EXIT_USAGE
