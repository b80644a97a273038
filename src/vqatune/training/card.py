"""The adapter's model card (README.md in the Hugging Face convention).

peft writes a template card full of "[More Information Needed]"; this one states what the
adapter is: base model, data, the params it was trained with, its metrics and the versions.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

# Speed, memory and whether the run resumed from a checkpoint describe the run, not the adapter
# (metrics/train.json keeps them): left out, the card, and so the adapter folder's hash, is the
# same for every rerun on the same inputs, a run killed and resumed included (its weights are).
RUN_ONLY_METRICS = ("seconds", "examples_per_s", "peak_memory_gib", "resumed", "resumed_from_step")


def model_card(*, base_model: str, dataset: str, train_params: dict[str, Any], metrics: dict[str, Any],
               environment: dict[str, str], hyperparameter_source: str, partial: bool = False) -> str:
    front = {
        "base_model": base_model,
        "library_name": "peft",
        "pipeline_tag": "image-text-to-text",
        "tags": ["lora", "qlora", "trl", "sft", "medical", "vqa", "vqatune"],
        "datasets": [dataset],
    }
    lora = train_params.get("lora", {})
    status = ("**PARTIAL: training was interrupted; this is not the finished adapter.**\n\n"
              if partial else "")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# LoRA adapter for {base_model}", "",
        status + f"A LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}, targets "
        f"`{lora.get('target_modules')}`, vision tower LoRA: {lora.get('vision_tower')}, projector trained: "
        f"{lora.get('train_projector')}) fine-tuned with vqatune's `train` stage on `{dataset}` "
        f"for visual question answering; loss on the answer tokens only.",
        "",
        "## Use", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f"base = AutoModelForImageTextToText.from_pretrained({base_model!r})",
        "model = PeftModel.from_pretrained(base, 'models/adapter')",
        "processor = AutoProcessor.from_pretrained('models/adapter')",
        "```", "",
        f"Prompt mode trained on: `{train_params.get('prompt_mode')}`. Hyperparameters from: "
        f"{hyperparameter_source}.", "",
        "## Training params (`params.yaml` `train:`)", "",
        "```json", json.dumps(train_params, indent=2, default=str), "```", "",
        "## Metrics", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in metrics.items()
          if not isinstance(v, (dict, list)) and k not in RUN_ONLY_METRICS],
        "",
        *_inputs_section(metrics.get("provenance", {}).get("inputs", {})),
        "## Environment", "",
        "| library | version |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in environment.items()],
        "",
    ]
    return "\n".join(lines)


def _inputs_section(fingerprints: dict[str, str]) -> list[str]:
    if not fingerprints:
        return []
    return ["## Inputs (content fingerprints, `vqatune.provenance.fingerprint`)", "",
            "| input | sha256[:16] |", "|---|---|", *[f"| `{k}` | {v} |" for k, v in fingerprints.items()], ""]
