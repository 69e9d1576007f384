"""Prompt templates (pinned character for character) and the <image> marker rules."""

from __future__ import annotations

import pytest

from mpo.generate.prompts import (
    PROMPT_TEMPLATES,
    MarkerError,
    drop_image_markers,
    place_image_markers,
    strip_short_answer_suffix,
    to_content,
    wrap_question,
)

# Literal copies of seed_datapipelines.md section 2 (InternVL utils/constants.py): a change to any character of
# the product's templates must fail here.
EN_V2 = ("Q?\nAnswer the preceding question. The last line of your response should follow this format: "
         "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion based on the "
         "reasoning provided. If you are uncertain or the problem is too complex, make a reasoned guess based on "
         "the information provided. Avoid repeating steps indefinitely\u2014provide your best guess even if unsure. "
         "Think step by step logically, considering all relevant information before answering.")
EN = ("Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
      "ready to answer, please use the format \"Final answer: ..\"\n\nQuestion:\n\nQ?")
ZH = ("你的任务是回答以下问题。在回答之前，请逐步推理说明您的思路。当你准备好给出答案时，请使用以下格式："
      "\"答案: ...\"\n\n问题:\n\nQ?")
ZH_V2 = ("Q?\n请回答上述问题。你的回答最后一行应遵循以下格式：“答案：\\boxed{$FINAL_ANSWER}”（不包含引号），"
         "其中“FINAL_ANSWER”是你根据推理得出的最终结论。如果你不确定答案或问题过于复杂，请基于已有信息做出有理有据的猜测。"
         "避免无限重复推理步骤——即使不完全确定，也请给出你认为最合理的答案。请一步一步进行逻辑思考，充分考虑所有相关信息后再作答。")
R1 = ("You are an AI assistant that rigorously follows this response protocol:\n\n1. First, conduct a detailed "
      "analysis of the question. Consider different angles, potential solutions, and reason through the problem "
      "step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n\n2. After the "
      "thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer "
      "from the think section with a newline.\n\nEnsure that the thinking process is thorough but remains focused "
      "on the query. The final answer should be standalone and not reference the thinking section.")


@pytest.mark.parametrize("version, expected", [
    ("en", EN), ("zh", ZH), ("en_v2", EN_V2), ("zh_v2", ZH_V2),
    ("en_r1", R1 + "\nQ?\nPlease answer the question and put the final answer within \\boxed{}."),
    ("zh_r1", R1 + "\nQ?\n请详细回答这个问题并将最终答案用\\boxed{}包住。"),
])
def test_templates_are_the_seed_strings(version, expected):
    assert wrap_question("Q?", version) == expected


def test_six_versions_and_the_literal_final_answer_placeholder_survives():
    assert sorted(PROMPT_TEMPLATES) == ["en", "en_r1", "en_v2", "zh", "zh_r1", "zh_v2"]
    # str.format would have eaten the braces of {$FINAL_ANSWER}; replacement keeps them.
    assert "'Answer: \\boxed{$FINAL_ANSWER}'" in wrap_question("{x}", "en_v2")
    assert wrap_question("{x}", "en_v2").startswith("{x}\n")


def test_unknown_version_is_named():
    with pytest.raises(ValueError, match=r"^prompt version must be one of en, zh, en_v2, zh_v2, en_r1, zh_r1, "
                                         r"got 'en_v3'$"):
        wrap_question("Q?", "en_v3")


@pytest.mark.parametrize("question, expected", [
    ("What is 2+2? Answer the question using a single word or phrase.", "What is 2+2?"),
    ("A or B?\nAnswer with the option's letter from the given choices directly.", "A or B?"),
    ("Is it red? Please answer Yes or No.", "Is it red?"),
    ("x=? Please answer the question and put the final answer within \\boxed{}.", "x=?"),
    ("  untouched  ", "  untouched  "),  # no suffix: not even stripped, as in the seed
])
def test_short_answer_suffix_is_cut(question, expected):
    assert strip_short_answer_suffix(question) == expected


@pytest.mark.parametrize("prompt, n_images, expected", [
    ("What?", 0, "What?"),
    ("What?", 1, "<image>\nWhat?"),
    ("Look: <image>\nWhat?", 1, "<image>\nLook: What?"),          # the seed moves a single image to the front
    ("Look: <image> What?", 1, "<image>\nLook:  What?"),          # bare marker: removed as it stands
    ("Compare.", 2, "Image-1: <image>\nImage-2: <image>\nCompare."),
    ("A <image> and B <image>?", 2, "A <image> and B <image>?"),  # one per image: left where the writer put them
])
def test_place_image_markers(prompt, n_images, expected):
    assert place_image_markers(prompt, n_images) == expected


@pytest.mark.parametrize("prompt, n_images, message", [
    ("<image>\nWhat?", 0, "has 1 <image> marker(s) but the row has no image"),
    ("<image><image>", 1, "has 2 <image> markers for 1 image"),
    ("<image> only one", 2, "has 1 <image> markers for 2 images; write one per image, or none to have them added"),
])
def test_place_image_markers_rejects_counts_that_do_not_fit(prompt, n_images, message):
    with pytest.raises(MarkerError) as err:
        place_image_markers(prompt, n_images)
    assert str(err.value) == message


def test_drop_image_markers_and_to_content():
    assert drop_image_markers("Image-1: <image>\nImage-2: <image>\nCompare them.") == "Image-1: Image-2: Compare them."
    assert drop_image_markers("<image>\nWhat colour?") == "What colour?"
    # the text as it is: the sampler drops the newline where the template writes its own (test_gen_samplers)
    assert to_content("<image>\nWhat colour?") == [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]
    assert to_content("A <image> B<image>") == [{"type": "text", "text": "A "}, {"type": "image"},
                                                {"type": "text", "text": " B"}, {"type": "image"}]
    assert to_content("plain") == [{"type": "text", "text": "plain"}]
