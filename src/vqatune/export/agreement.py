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
from pathlib import Path
from typing import Optional, Sequence

CLIENT = Path(__file__).resolve().with_name("llama_cpp_client.py")
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


def gguf_answers(python: str, model: Path, mmproj: Path, rows: Sequence[dict],
                 max_tokens: int = 25, timeout: float = 300) -> list[str]:
    """llama.cpp's greedy answer for each ``{"image": path, "question": str, "system": str|None}``."""
    answers = []
    for row in rows:
        cmd = [python, str(CLIENT), "--model", str(model), "--mmproj", str(mmproj),
               "--image", str(row["image"]), "--question", row["question"],
               "--max-tokens", str(max_tokens)]
        if row.get("system"):
            cmd += ["--system", row["system"]]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"llama_cpp_client failed: {result.stderr[-2000:]}")
        answers.append(json.loads(result.stdout.strip().splitlines()[-1])["answer"])
    return answers


def agreement(gguf: Sequence[str], evaluated: Sequence[dict]) -> dict:
    """Share of rows where the GGUF's answer equals the evaluated prediction (stripped), and every
    difference (with whether they still match ignoring case and spacing)."""
    if len(gguf) != len(evaluated):
        raise ValueError(f"{len(gguf)} GGUF answers for {len(evaluated)} evaluated rows")
    differences = [
        {"img_id": row.get("img_id"), "question": row["question"], "gguf": answer,
         "evaluated": row["prediction"],
         "same_ignoring_case": " ".join(answer.lower().split()) == " ".join(row["prediction"].lower().split())}
        for answer, row in zip(gguf, evaluated) if answer.strip() != row["prediction"].strip()]
    n = len(gguf)
    return {"gguf_agreement": round((n - len(differences)) / n, 4) if n else None, "gguf_agreement_n": n,
            "gguf_differences": differences}


def not_measured(reason: str) -> dict:
    return {"gguf_agreement": None, "gguf_agreement_reason": reason}
