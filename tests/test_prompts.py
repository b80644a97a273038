"""The adaptive prompts' keyword classifier over every Kvasir-VQA question string."""
from __future__ import annotations

import pytest

from vqatune.config import load_params, section
from vqatune.data import kvasir as K
from vqatune.prompts import (
    PROMPT_MODES,
    PromptsConfig,
    build_messages,
    matching_categories,
    question_category,
    system_prompt,
)

# The category each template is meant for (the guide's seven tasks). Where a question matches
# two categories (e.g. "Where in the image is the instrument?") the first in priority order is
# its category, and the adaptive prompt carries both.
INTENDED = {
    K.Q_ABNORMALITY: "find_in_image",
    K.Q_LANDMARK: "anatomical_landmarks",
    K.Q_INSTRUMENT: "instrument_details",
    K.Q_ANY_FINDING: "find_in_image",
    K.Q_POLYPS_REMOVED: "find_in_image",
    K.Q_EASY: "find_in_image",
    K.Q_BOX: "instrument_details",
    K.Q_TEXT: "instrument_details",
    K.Q_POLYP_TYPE: "type",
    K.Q_PROCEDURE: "type",
    K.Q_SIZE: "size",
    K.Q_COLOR_ABNORMALITY: "colour",
    K.Q_COLOR_LANDMARK: "colour",
    K.Q_WHERE_ABNORMALITY: "find_in_image",
    K.Q_WHERE_INSTRUMENT: "find_in_image",
    K.Q_WHERE_LANDMARK: "anatomical_landmarks",
    K.Q_COUNT_FINDINGS: "counting",
    K.Q_COUNT_POLYPS: "counting",
    K.Q_COUNT_INSTRUMENTS: "counting",     # the dataset's typo "instrumnets" still counts
}


def _configs():
    # The shipped params.yaml must classify like the code defaults: both are tested.
    return [("defaults", PromptsConfig()),
            ("params.yaml", section(load_params("params.yaml"), "prompts", PromptsConfig))]


def test_every_question_string_is_covered():
    assert set(INTENDED) == set(K.QUESTIONS)


@pytest.mark.parametrize("name, prompts", _configs())
@pytest.mark.parametrize("question", K.QUESTIONS)
def test_question_lands_in_its_intended_category(name, prompts, question):
    assert question_category(question, prompts) == INTENDED[question]


@pytest.mark.parametrize("name, prompts", _configs())
def test_every_category_is_used_and_none_falls_through(name, prompts):
    categories = {question_category(q, prompts) for q in K.QUESTIONS}
    assert categories == set(prompts.categories)      # no category is dead, none is "general"


def test_adaptive_prompt_adds_each_matching_category_once():
    prompts = PromptsConfig()
    question = K.Q_WHERE_INSTRUMENT
    assert matching_categories(question, prompts) == ["find_in_image", "instrument_details"]
    system = system_prompt(question, "adaptive", prompts)
    assert system.startswith(prompts.static)
    for name in ("find_in_image", "instrument_details"):
        assert system.count(prompts.categories[name].prompt) == 1
    assert prompts.categories["counting"].prompt not in system


def test_a_keyword_hit_twice_adds_its_prompt_once():
    prompts = PromptsConfig()
    # "colour" and "color" are both keywords of one category.
    system = system_prompt("What color or colour is it?", "adaptive", prompts)
    assert system.count(prompts.categories["colour"].prompt) == 1


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_messages_per_mode(mode):
    prompts = PromptsConfig()
    messages = build_messages(K.Q_SIZE, mode, prompts)
    roles = [m["role"] for m in messages]
    assert roles == (["user"] if mode == "none" else ["system", "user"])
    assert messages[-1]["content"] == [{"type": "image", "text": None},
                                       {"type": "text", "text": K.Q_SIZE}]
    if mode == "adaptive":
        assert prompts.categories["size"].prompt in messages[0]["content"][0]["text"]
    with_answer = build_messages(K.Q_SIZE, mode, prompts, answer="<5mm")
    assert with_answer[-1] == {"role": "assistant", "content": [{"type": "text", "text": "<5mm"}]}
