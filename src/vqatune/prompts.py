"""Chat messages for each prompt mode, and the keyword classifier of adaptive prompts.

Training, evaluation and ``vqatune ask`` all build their messages here, so a question asked on
the command line is exactly what the model saw in evaluation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

PROMPT_MODES = ("none", "static", "adaptive")

# The guide's static prompt, with its example, word for word.
STATIC_PROMPT = (
    "You are a leading medical expert in the domain of colonoscopy and analyze medical imagery "
    "with high accuracy, identifying all anomalies and answering questions factually, and "
    "concisely. Note that 'finding' is generally code for abnormality. Respond in a concise "
    "manner; for example, when given an image of ulcerative colitis and a prompt \"Are there any "
    "abnormalities in the image?\", respond with \"Ulcerative Colitis\""
)

# Adaptive categories in priority order: a question's first match is its category; every match
# adds its prompt once. The counting prompt is the guide's; the others follow its pattern.
DEFAULT_CATEGORIES = {
    "counting": {
        "keywords": ["how many"],
        "prompt": "Carefully count the number of target features in the image and reply concisely. "
                  "For example, when given an image of the GI tract with only ulcerative colitis and "
                  "the prompt \"How many findings are present?\", respond with \"1\".",
    },
    "colour": {
        "keywords": ["color", "colour"],
        "prompt": "Name the colours of the target feature, lower case, separated by \"; \" when "
                  "there is more than one, for example \"pink; red\".",
    },
    "size": {
        "keywords": ["size", "how large", "how big"],
        "prompt": "Estimate the size of the polyp from the image and answer with one of \"<5mm\", "
                  "\"5-10mm\", \"11-20mm\", \">20mm\" or \"none\".",
    },
    "type": {
        "keywords": ["what type", "which type", "kind of"],
        "prompt": "Determine the type asked for and answer with its name only, for example "
                  "\"colonoscopy\" or \"paris iia\".",
    },
    "anatomical_landmarks": {
        "keywords": ["anatomical landmark"],
        "prompt": "Identify the anatomical landmarks (z-line, cecum, ileum, pylorus) and where they "
                  "are; answer \"none\" when there are none.",
    },
    "find_in_image": {
        "keywords": ["where in the image", "abnormalit", "any finding", "easy to detect",
                     "been removed"],
        "prompt": "Look for the feature in the image. For locations answer with the cells of a 3x3 "
                  "grid (upper-left ... lower-right), separated by \"; \".",
    },
    "instrument_details": {
        "keywords": ["instrument", "box", "artefact", "artifact", "text"],
        "prompt": "Check for instruments, a green/black box artefact and text overlays, and answer "
                  "briefly, for example \"yes\", \"no\" or \"biopsy forceps\".",
    },
}
FALLBACK_CATEGORY = "general"

DEFAULT_PROMPTS = {"static": STATIC_PROMPT, "categories": DEFAULT_CATEGORIES}


@dataclasses.dataclass
class CategoryPrompt:
    keywords: list[str]
    prompt: str

    def validate(self, p: str) -> None:
        from .config import require

        require(bool(self.keywords) and all(k.strip() for k in self.keywords), f"{p}.keywords",
                "must be a non-empty list of non-empty strings")
        require(bool(self.prompt.strip()), f"{p}.prompt", "must be a non-empty string")


@dataclasses.dataclass
class PromptsConfig:
    """`prompts:` — the static system prompt and the adaptive categories (in priority order)."""

    static: str = STATIC_PROMPT
    categories: dict[str, CategoryPrompt] = dataclasses.field(
        default_factory=lambda: {k: CategoryPrompt(**v) for k, v in DEFAULT_CATEGORIES.items()})

    def validate(self, p: str) -> None:
        from .config import require

        require(bool(self.static.strip()), f"{p}.static", "must be a non-empty string")
        require(bool(self.categories), f"{p}.categories", "must name at least one category")


def matching_categories(question: str, prompts: PromptsConfig) -> list[str]:
    """Every category whose keywords occur in the question, in priority order."""
    text = question.lower()
    return [name for name, cat in prompts.categories.items()
            if any(k.lower() in text for k in cat.keywords)]


def question_category(question: str, prompts: PromptsConfig) -> str:
    matches = matching_categories(question, prompts)
    return matches[0] if matches else FALLBACK_CATEGORY


def system_prompt(question: str, mode: str, prompts: PromptsConfig) -> Optional[str]:
    if mode == "none":
        return None
    if mode == "static":
        return prompts.static
    if mode == "adaptive":
        parts = [prompts.static] + [prompts.categories[c].prompt
                                    for c in matching_categories(question, prompts)]
        return "\n\n".join(parts)
    raise ValueError(f"prompt mode {mode!r} is not one of {', '.join(PROMPT_MODES)}")


def build_messages(question: str, mode: str, prompts: PromptsConfig,
                   answer: Optional[str] = None) -> list[dict]:
    """Chat messages for one QA: [system], user (image, question), [assistant answer].

    Every content part has both ``type`` and ``text`` keys (``text`` is None for the image) so
    that the messages store as one Arrow type in a ``datasets`` column.
    """
    messages = []
    system = system_prompt(question, mode, prompts)
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": question}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
