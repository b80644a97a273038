"""Does the exported GGUF pair answer like the evaluated model? Greedy answers from llama.cpp
(through ``llama_cpp_client.py``, in whichever Python has llama-cpp-python built from source)
for test rows, asked with the trained prompt mode, compared with the evaluate stage's predictions
for the same rows. The target is 100 %; every difference is listed for a reason to be given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

CLIENT = Path(__file__).resolve().with_name("llama_cpp_client.py")
# Byte-fallback tokens that form no UTF-8 text: transformers decodes them as U+FFFD,
# llama-cpp-python's chat completion drops them. The same tokens, another text.
REPLACEMENT = "\ufffd"
BYTE_TOKENS = ("decoding: the same tokens; byte tokens that form no UTF-8 text, which transformers "
               "writes as U+FFFD and llama-cpp-python drops")
NOT_IMPORTABLE = ("llama-cpp-python (built from source) is not importable here; set "
                  "VQATUNE_LLAMA_CPP_PYTHON to a Python that has it")


def llama_cpp_python() -> Optional[str]:
    """A Python that imports llama_cpp with multimodal support: $VQATUNE_LLAMA_CPP_PYTHON or ours."""
    candidate = os.environ.get("VQATUNE_LLAMA_CPP_PYTHON", sys.executable)
    probe = subprocess.run([candidate, "-c", "import llama_cpp.mtmd_cpp"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def system_text(messages: list[dict]) -> Optional[str]:
    """The system prompt of ``prompts.build_messages``' messages (None for prompt mode none)."""
    texts = [part["text"] for m in messages if m["role"] == "system"
             for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])]
    return "\n\n".join(texts) if texts else None


def client_crashed(signal_number: int, python: str) -> str:
    """What to do when llama.cpp dies by a signal (it prints nothing: the client loads quietly).
    Seen on a GPU machine: llama-cpp-python built with the system's g++ 13, run by a Python that
    had loaded an older libstdc++ first, crashed loading any GGUF (signal 11); preloading the
    libstdc++ it was built against fixed it (docs/export.md)."""
    return (f"llama.cpp crashed (signal {signal_number}) in {python}; if llama-cpp-python was built "
            "with a newer compiler than the one behind this Python's libstdc++, run again with "
            "LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)")


def gguf_replies(python: str, model: Path, mmproj: Path, rows: Sequence[dict],
                 max_tokens: int = 25, timeout: float = 1800) -> list[dict]:
    """llama.cpp's greedy reply (answer, prompt_tokens, ...) for each ``{"image": path,
    "question": str, "system": str|None}``: one client process loads the pair once for all rows."""
    import tempfile

    if not rows:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for row in rows:
            fh.write(json.dumps({"image": str(row["image"]), "question": row["question"],
                                 "system": row.get("system")}, ensure_ascii=False) + "\n")
        batch = fh.name
    try:
        cmd = [python, str(CLIENT), "--model", str(model), "--mmproj", str(mmproj),
               "--batch", batch, "--max-tokens", str(max_tokens)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(batch)
    if result.returncode < 0:
        raise RuntimeError(client_crashed(-result.returncode, python))
    if result.returncode != 0:
        raise RuntimeError(f"llama_cpp_client failed: {result.stderr[-2000:]}")
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if len(replies) != len(rows):
        raise RuntimeError(f"llama_cpp_client answered {len(replies)} of {len(rows)} rows")
    return replies


def sample_rows(predictions: Sequence[dict], n: int) -> list[dict]:
    """Up to ``n`` prediction rows, spread over the categories: round robin over the categories
    (sorted), each category's rows in the file's order. The same file gives the same sample."""
    by_category: dict[str, list[dict]] = {}
    for row in predictions:
        by_category.setdefault(row.get("category") or "", []).append(row)
    queues = [by_category[c] for c in sorted(by_category)]
    sample, i = [], 0
    while len(sample) < n and any(i < len(q) for q in queues):
        sample += [q[i] for q in queues if i < len(q)][: n - len(sample)]
        i += 1
    return sample


def agreement(gguf: Sequence[str], evaluated: Sequence[dict],
              reasons: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Share of rows where the GGUF's answer equals the evaluated prediction (stripped), and every
    difference (with whether they still match ignoring case and spacing, and ``reasons[i]`` for
    row i where known)."""
    if len(gguf) != len(evaluated):
        raise ValueError(f"{len(gguf)} GGUF answers for {len(evaluated)} evaluated rows")
    reasons = list(reasons) if reasons is not None else [None] * len(gguf)
    differences = [
        {"img_id": row.get("img_id"), "question": row["question"], "category": row.get("category"),
         "gguf": answer, "evaluated": row["prediction"],
         "same_ignoring_case": " ".join(answer.lower().split()) == " ".join(row["prediction"].lower().split()),
         "reason": reason}
        for answer, row, reason in zip(gguf, evaluated, reasons)
        if answer.strip() != row["prediction"].strip()]
    n = len(gguf)
    return {"gguf_agreement": round((n - len(differences)) / n, 4) if n else None, "gguf_agreement_n": n,
            "gguf_differences": differences}


def not_measured(reason: str) -> dict:
    return {"gguf_agreement": None, "gguf_agreement_reason": reason}


def _prompt_inputs(processor, messages: list[dict], image):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt")


def _divergence(model, processor, inputs, evaluated: str, gguf: str, llama_tokens: list[int],
                max_tokens: int) -> str:
    """Why transformers and llama.cpp part: transformers' greedy answer for this row alone (the
    evaluate stage generates in padded batches), then its logit margin, at the first generated
    token where the two differ, between its own choice and llama.cpp's."""
    import torch

    tokenizer = processor.tokenizer
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    alone = tokenizer.decode(hf_tokens, skip_special_tokens=True).strip()
    prefix = ""
    if alone != evaluated.strip():
        prefix = (f"batching: transformers on this row alone answers {alone!r}, the evaluate "
                  f"stage's padded batch {evaluated!r}; ")
    k = next((i for i, (a, b) in enumerate(zip(hf_tokens, llama_tokens)) if a != b), None)
    if k is None:
        if prefix:
            return prefix + "llama.cpp generates transformers' unbatched tokens"
        if REPLACEMENT in evaluated and evaluated.replace(REPLACEMENT, "").strip() == gguf.strip():
            return BYTE_TOKENS
        if len(llama_tokens) > len(hf_tokens) == max_tokens:
            return (f"decoding: the same {len(hf_tokens)} tokens; llama-cpp-python generated "
                    f"{len(llama_tokens) - len(hf_tokens)} past max_tokens while byte tokens formed "
                    "no UTF-8 text (transformers writes U+FFFD for them)")
        return (f"decoding: the same tokens as far as both report them (llama.cpp {len(llama_tokens)}, "
                f"transformers {len(hf_tokens)}), another text")
    logits = out.scores[k][0].float()
    want, got = hf_tokens[k], llama_tokens[k]
    margin, scale = float(logits[want] - logits[got]), float(logits.abs().max())
    rank = int((logits > logits[got]).sum())
    kind = ("near tie: within 2% of the largest logit, where f16 weights and llama.cpp's arithmetic "
            "(~1e-3 of it) can decide" if abs(margin) < 0.02 * scale else "unexplained: not a near tie")
    return (f"{prefix}{kind}; at answer token {k} transformers prefers "
            f"{tokenizer.convert_ids_to_tokens(want)!r} over llama.cpp's "
            f"{tokenizer.convert_ids_to_tokens(got)!r} (rank {rank}) by {margin:.3g} "
            f"(largest logit {scale:.3g})")


def measure_agreement(python: str, text_path: Path, mmproj_path: Path, merged_dir: Path,
                      data_dir: Path, predictions_dir: Path, prompts, n_rows: int,
                      max_tokens: int, *, prompt_mode: Optional[str] = None) -> dict:
    """The GGUF agreement for ``metrics/export.json``: ``n_rows`` rows of the evaluate stage's
    predictions for the tuned model in the trained prompt mode (``sample_rows``), asked of the
    exported pair through llama.cpp with the same prepared test images; every difference with
    its reason (a different prompt, or transformers' margin where the answers part).
    ``prompt_mode`` overrides the trained mode (to check the other modes' predictions)."""
    from ..data.processed import load_prepared
    from ..models.loading import load_base_model, load_processor
    from ..models.metadata import inference_prompt_mode, trained_prompt_mode
    from ..prompts import build_messages

    start = time.perf_counter()
    mode = prompt_mode or inference_prompt_mode(trained_prompt_mode(merged_dir))
    pred_file = Path(predictions_dir) / f"tuned_{mode}.jsonl"
    if not pred_file.is_file():
        return not_measured(f"{pred_file} not found: run the evaluate stage")
    predictions = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
    sample = sample_rows(predictions, n_rows)
    test = load_prepared(data_dir)["test"]
    wanted, images = {row["img_id"] for row in sample}, {}
    for i, img_id in enumerate(test["img_id"]):
        if img_id in wanted and img_id not in images:
            images[img_id] = test[i]["image"].convert("RGB")
    missing = wanted - images.keys()
    if missing:
        return not_measured(f"{len(missing)} img_id of {pred_file.name} not in {data_dir}'s test split "
                            f"(e.g. {sorted(missing)[0]}): re-run evaluate")
    messages = [build_messages(row["question"], mode, prompts) for row in sample]
    with tempfile.TemporaryDirectory(prefix="vqatune-agreement-") as tmp:
        paths = {}
        for j, (img_id, image) in enumerate(sorted(images.items())):
            # Lossless, at the prepared (model) size: llama.cpp's resize is then the identity.
            paths[img_id] = Path(tmp) / f"{j}.png"
            image.save(paths[img_id])
        rows = [{"image": paths[row["img_id"]], "question": row["question"], "system": system_text(m)}
                for row, m in zip(sample, messages)]
        replies = gguf_replies(python, text_path, mmproj_path, rows, max_tokens)

    processor = load_processor(merged_dir)
    model, reasons, prompt_diffs = None, [], 0
    for row, m, reply in zip(sample, messages, replies):
        # Every row: llama.cpp's prompt is as long as the processor's (the image's blank lines,
        # its tokens), whether or not the answers differ.
        inputs = _prompt_inputs(processor, m, images[row["img_id"]])
        hf_tokens = int(inputs["input_ids"].shape[1])
        prompt_diffs += reply["prompt_tokens"] != hf_tokens
        if reply["answer"].strip() == row["prediction"].strip():
            reasons.append(None)
            continue
        if reply["prompt_tokens"] != hf_tokens:
            reasons.append(f"prompt: llama.cpp {reply['prompt_tokens']} tokens, transformers {hf_tokens}; "
                           "not the prompt evaluated")
            continue
        if model is None:  # only where answers differ
            model = load_base_model(merged_dir, device="cpu")
        reasons.append(_divergence(model, processor, inputs, row["prediction"], reply["answer"],
                                   reply.get("tokens", []),
                                   max_tokens))
    result = agreement([r["answer"] for r in replies], sample, reasons)
    result.update(gguf_agreement_prompt_mode=mode, gguf_agreement_predictions=pred_file.name,
                  gguf_agreement_max_tokens=max_tokens,
                  gguf_prompt_length_differs=prompt_diffs,
                  gguf_agreement_seconds=round(time.perf_counter() - start, 1))
    return result
