"""Prompt text for the generators: the seed's instruction templates and the ``<image>`` marker rules.

The six templates are InternVL's ``utils/constants.py`` strings, reproduced character for character
(``seed_datapipelines.md`` section 2). ``{question}`` is filled by plain string replacement, not
``str.format``, so the literal ``{$FINAL_ANSWER}`` and ``\\boxed{}`` survive.

Marker rules for the correctness prompt (``place_image_markers``):

* one image: the seed's rule. A single ``<image>`` is removed (``"<image>\\n"`` first, then a bare one) and
  ``"<image>\\n"`` is put in front, so a single-image prompt always starts with its image;
* n >= 2 images: ``n`` markers are kept where the writer put them; none at all gets
  ``"Image-1: <image>\\nImage-2: <image>\\n..."`` in front (the data layer's rule, ``mpo.data.records``);
  any other count is a bad row. (The seed left a wrong count in place: one marker for two images.)
* no image: a marker is a bad row, because the model would be asked about an image it never gets.

A prompt text with markers becomes chat content by splitting at the markers (``to_content``), so the
model's own chat template decides how an image is written (``<IMG_CONTEXT>`` for InternVL-HF,
``<|vision_start|>...`` for Qwen-VL).
"""

from __future__ import annotations

from typing import Any

from mpo.data.encode import question_content

__all__ = [
    "IMAGE_MARKER",
    "PROMPT_TEMPLATES",
    "PROMPT_VERSIONS",
    "R1_PREAMBLE",
    "SHORT_ANSWER_SUFFIXES",
    "MarkerError",
    "drop_image_markers",
    "place_image_markers",
    "strip_short_answer_suffix",
    "to_content",
    "wrap_question",
]

IMAGE_MARKER = "<image>"

_EN = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when "
    "you're ready to answer, please use the format \"Final answer: ..\"\n\nQuestion:\n\n{question}"
)
_ZH = (
    "你的任务是回答以下问题。在回答之前，请逐步推理说明您的思路。当你准备好给出答案时，请使用以下格式："
    "\"答案: ...\"\n\n问题:\n\n{question}"
)
_EN_V2 = (
    "{question}\nAnswer the preceding question. The last line of your response should follow this format: "
    "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion based on the "
    "reasoning provided. If you are uncertain or the problem is too complex, make a reasoned guess based on the "
    "information provided. Avoid repeating steps indefinitely\u2014provide your best guess even if unsure. "
    "Think step by step logically, considering all relevant information before answering."
)
_ZH_V2 = (
    "{question}\n请回答上述问题。你的回答最后一行应遵循以下格式：“答案：\\boxed{$FINAL_ANSWER}”（不包含引号），"
    "其中“FINAL_ANSWER”是你根据推理得出的最终结论。如果你不确定答案或问题过于复杂，请基于已有信息做出有理有据的猜测。"
    "避免无限重复推理步骤——即使不完全确定，也请给出你认为最合理的答案。请一步一步进行逻辑思考，充分考虑所有相关信息后再作答。"
)
R1_PREAMBLE = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, "
    "and reason through the problem step-by-step. Enclose this entire thinking process within <think> and "
    "</think> tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. "
    "Separate the answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should "
    "be standalone and not reference the thinking section."
)
_EN_R1 = R1_PREAMBLE + "\n{question}\nPlease answer the question and put the final answer within \\boxed{}."
_ZH_R1 = R1_PREAMBLE + "\n{question}\n请详细回答这个问题并将最终答案用\\boxed{}包住。"

PROMPT_TEMPLATES: dict[str, str] = {
    "en": _EN, "zh": _ZH, "en_v2": _EN_V2, "zh_v2": _ZH_V2, "en_r1": _EN_R1, "zh_r1": _ZH_R1,
}
PROMPT_VERSIONS: tuple[str, ...] = tuple(PROMPT_TEMPLATES)

# The seed keeps these in a set; the order of removal cannot matter because at most one can be a suffix
# once the text is stripped (none of them ends with another).
SHORT_ANSWER_SUFFIXES: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer Yes or No.",
    "Please answer the question and put the final answer within \\boxed{}.",
)


class MarkerError(ValueError):
    """The ``<image>`` markers of a question do not fit its images; the message names the counts."""


def strip_short_answer_suffix(question: str) -> str:
    """Cut a trailing short-answer instruction (the seed's ``VALID_INSTRUCTIONS``) and strip whitespace.

    A question without such a suffix is returned unchanged (not even stripped), as in the seed.
    """
    for suffix in SHORT_ANSWER_SUFFIXES:
        if question.endswith(suffix):
            question = question[: -len(suffix)].strip()
    return question


def wrap_question(question: str, version: str) -> str:
    """Remove a short-answer suffix, then put the question into template ``version``."""
    if version not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt version must be one of {', '.join(PROMPT_VERSIONS)}, got {version!r}")
    return PROMPT_TEMPLATES[version].replace("{question}", strip_short_answer_suffix(question))


def place_image_markers(prompt: str, n_images: int) -> str:
    """Apply the marker rules of the module docstring; raise ``MarkerError`` for a count that cannot fit."""
    count = prompt.count(IMAGE_MARKER)
    if n_images == 0:
        if count:
            raise MarkerError(f"has {count} {IMAGE_MARKER} marker(s) but the row has no image")
        return prompt
    if n_images == 1:
        if count > 1:
            raise MarkerError(f"has {count} {IMAGE_MARKER} markers for 1 image")
        if count == 1:
            prompt = prompt.replace(IMAGE_MARKER + "\n", "", 1) if IMAGE_MARKER + "\n" in prompt \
                else prompt.replace(IMAGE_MARKER, "", 1)
        return f"{IMAGE_MARKER}\n{prompt}"
    if count == 0:
        return "".join(f"Image-{k + 1}: {IMAGE_MARKER}\n" for k in range(n_images)) + prompt
    if count != n_images:
        raise MarkerError(f"has {count} {IMAGE_MARKER} markers for {n_images} images; write one per image, "
                          f"or none to have them added")
    return prompt


def drop_image_markers(question: str) -> str:
    """The question as text only (DropoutNTP): every ``<image>`` removed (with its newline), then stripped."""
    return question.replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "").strip()


def to_content(prompt: str) -> list[dict[str, Any]]:
    """Chat content items for a prompt with markers: ``{"type": "image"}`` at each marker, the text between as it
    is (a newline after a marker included: the sampler drops it only where the model's chat template writes its
    own, :func:`mpo.generate.samplers.fit_image_newlines`, so the prompt renders as training renders the pair).

    Example: ``"<image>\\nWhat?"`` -> ``[{"type": "image"}, {"type": "text", "text": "\\nWhat?"}]``.
    """
    return question_content(prompt, drop_newline=False)
