"""PairEncoder with the tiny InternVL, Qwen2.5-VL and Qwen2 (text) checkpoints: exact prompts, boundaries, lengths."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from PIL import Image

from mpo.data.encode import EncodedPair, PairEncoder, question_content
from mpo.data.errors import RowError, TooLongError
from mpo.data.records import PreferenceRecord
from mpo.models import load_processor

Q = "<image>\nWhat colour is the cube?"


def record(question=Q, chosen="The cube is red.", rejected="The cube is blue.", n_images=1, system_prompt=None,
           line=7):
    return PreferenceRecord("shapes", line, question, chosen, rejected, tuple(f"{k}.png" for k in range(n_images)),
                            system_prompt)


def image(size=(64, 64)):
    return Image.new("RGB", size, (200, 30, 30))


@pytest.fixture(scope="module")
def internvl(tiny_internvl_dir):
    return PairEncoder(load_processor(tiny_internvl_dir))


@pytest.fixture(scope="module")
def qwen(tiny_qwen25vl_dir):
    return PairEncoder(load_processor(tiny_qwen25vl_dir))


@pytest.fixture(scope="module")
def text(tiny_qwen2_dir):
    return PairEncoder(load_processor(tiny_qwen2_dir))


def test_question_content_drops_one_newline_after_each_placeholder():
    assert question_content("<image>\nWhat?") == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert question_content("<image>What?") == question_content("<image>\nWhat?")
    assert question_content("A <image>\n\nB <image>") == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": "\nB "}, {"type": "image"}]


def test_question_content_keeps_the_newline_for_a_template_that_writes_none():
    assert question_content("A <image>\n\nB <image>\n", drop_newline=False) == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": "\n\nB "}, {"type": "image"},
        {"type": "text", "text": "\n"}]


def test_encode_doctests_pass():
    import doctest

    import mpo.data.encode

    assert doctest.testmod(mpo.data.encode).failed == 0


def test_image_newline_is_read_from_the_template(internvl, qwen, text):
    """InternVL-HF writes ``<IMG_CONTEXT>\\n`` for an image, Qwen2.5-VL ``<|vision_end|>`` and no newline."""
    assert (internvl.image_newline, qwen.image_newline, text.image_newline) == (True, False, False)


@pytest.mark.parametrize("question, internvl_user, qwen_user", [
    ("<image>\nWhat?", "<IMG_CONTEXT>\nWhat?", "<V>\nWhat?"),
    ("Image-1: <image>\nImage-2: <image>\nDescribe.", "Image-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nDescribe.",
     "Image-1: <V>\nImage-2: <V>\nDescribe."),
    ("<image>\n\nWhat?", "<IMG_CONTEXT>\n\nWhat?", "<V>\n\nWhat?"),
    # InternVL's template writes its newline even where the row has none (the seed writes the block in place)
    ("Compare <image> and <image>.", "Compare <IMG_CONTEXT>\n and <IMG_CONTEXT>\n.", "Compare <V> and <V>."),
])
def test_each_newline_after_an_image_is_kept_exactly_once(internvl, qwen, question, internvl_user, qwen_user):
    """The row's newline after ``<image>`` appears once in the prompt, whether or not the template writes one."""
    rec = record(question=question, n_images=question.count("<image>"))
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert internvl.prompt_text(rec) == f"<|im_start|>user\n{internvl_user}<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.prompt_text(rec) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                     f"{qwen_user.replace('<V>', vision)}<|im_end|>\n<|im_start|>assistant\n")


def test_internvl_prompt_is_the_chat_template_rendering(internvl):
    assert internvl.end_of_turn == "<|im_end|>"
    assert internvl.prompt_text(record()) == ("<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is the cube?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert internvl.prompt_text(record(system_prompt="Be brief.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is the cube?"
        "<|im_end|>\n<|im_start|>assistant\n")


def test_internvl_prompt_ids_expand_image_tokens_per_tile(internvl):
    """64x192 (w x h = 192x64 in PIL), max_patches 6: 3x1 tiles + thumbnail = 4 tiles → 4 x 16 = 64 tokens."""
    tok = internvl.tokenizer
    pair = internvl.encode(record(), [image((192, 64))], max_patches=6)
    expanded = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 64 + "</img>\nWhat colour is the cube?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert pair.prompt_ids.tolist() == tok(expanded, add_special_tokens=False)["input_ids"]
    assert (pair.n_images, pair.n_image_tokens) == (1, 64)
    assert list(pair.image_inputs) == ["pixel_values"]
    assert tuple(pair.image_inputs["pixel_values"].shape) == (4, 3, 64, 64)
    assert pair.prompt_ids.dtype == pair.chosen_ids.dtype == torch.int64
    assert (pair.dataset, pair.line) == ("shapes", 7)


@pytest.mark.parametrize("size", [(64, 64), (192, 64), (64, 192), (300, 500), (1000, 40), (129, 130)])
@pytest.mark.parametrize("max_patches", [1, 2, 6, 12])
def test_internvl_image_tokens_match_tiles(internvl, size, max_patches):
    pair = internvl.encode(record(), [image(size)], max_patches=max_patches)
    tiles = pair.image_inputs["pixel_values"].shape[0]
    assert 1 <= tiles <= max_patches + (max_patches > 1)
    assert pair.n_image_tokens == 16 * tiles


def test_completion_is_answer_plus_end_of_turn_without_newline(internvl):
    pair = internvl.encode(record(), [image()])
    tok = internvl.tokenizer
    assert tok.decode(pair.chosen_ids) == "The cube is red.<|im_end|>"
    assert tok.decode(pair.rejected_ids) == "The cube is blue.<|im_end|>"
    assert pair.chosen_ids[-1].item() == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("which", ["internvl", "qwen", "text"])
def test_prompt_plus_answer_is_the_full_conversation_minus_final_newline(which, request):
    """chosen and rejected share one prompt, and prompt + completion + "\\n" tokenizes like the rendered turn."""
    enc = request.getfixturevalue(which)
    n_images = 0 if which == "text" else 1
    rec = record(question=Q if n_images else "What colour is the cube?", n_images=n_images)
    pair = enc.encode(rec, [image()] * n_images)
    for answer, ids in ((rec.chosen, pair.chosen_ids), (rec.rejected, pair.rejected_ids)):
        content = question_content(rec.question, drop_newline=enc.image_newline) if n_images else rec.question
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}] if n_images else answer}]
        rendered = enc.processor.apply_chat_template(messages, tokenize=False)
        if n_images:
            out = enc.processor(text=[rendered], images=[image()], return_tensors="pt")
            want = out["input_ids"][0].tolist()
        else:
            want = enc.tokenizer(rendered)["input_ids"]
        newline = enc.tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert torch.cat([pair.prompt_ids, ids]).tolist() + newline == want


def test_qwen_prompt_grid_and_token_types(qwen):
    """A 64x64 image: 8x8 patches of 8 px, merged 2x2 → 16 <|image_pad|>; grid (t, h, w) = (1, 8, 8)."""
    assert qwen.prompt_text(record()) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nWhat colour is the cube?<|im_end|>\n<|im_start|>assistant\n")
    pair = qwen.encode(record(), [image()], max_patches=3)  # no tiles: max_patches is ignored
    inputs = pair.image_inputs
    assert sorted(inputs) == ["image_grid_thw", "mm_token_type_ids", "pixel_values"]
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(inputs["pixel_values"].shape) == (64, 3 * 2 * 8 * 8)
    assert pair.n_image_tokens == 16 == int(inputs["image_grid_thw"].prod()) // 4
    assert inputs["mm_token_type_ids"].shape == pair.prompt_ids.shape
    assert torch.equal(inputs["mm_token_type_ids"].bool(), pair.prompt_ids == qwen.image_token_id)


def test_system_prompt_replaces_the_template_default(qwen):
    assert qwen.prompt_text(record(system_prompt="Be brief.")).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


INTERNVL_SIZES = [(64, 64), (192, 64), (64, 192), (17, 900), (900, 17), (300, 500), (640, 480), (1000, 1000),
                  (129, 64), (65, 63)]


def test_internvl_plan_length_equals_encode_length(internvl):
    """30 single-image cases and multi-image rows: planning from sizes gives encode's length exactly."""
    for size, max_patches in itertools.product(INTERNVL_SIZES, (1, 4, 12)):
        rec = record()
        assert internvl.plan_length(rec, [size], max_patches=max_patches) == \
            internvl.encode(rec, [image(size)], max_patches=max_patches).length, (size, max_patches)
    rec = record(question="Compare <image>\nand <image>\nWhich is red?", n_images=2)
    for sizes in ([(64, 64), (192, 64)], [(300, 500), (17, 900)]):
        pair = internvl.encode(rec, [image(s) for s in sizes], max_patches=6)
        assert internvl.plan_length(rec, sizes, max_patches=6) == pair.length


def test_qwen_plan_length_equals_encode_length(qwen):
    for size in INTERNVL_SIZES + [(10, 10), (4000, 30)]:
        rec = record(chosen="A much longer chosen answer than the rejected one.", rejected="No.")
        assert qwen.plan_length(rec, [size]) == qwen.encode(rec, [image(size)]).length, size


def test_text_only_model(text):
    rec = record(question="What colour is the cube?", n_images=0)
    pair = text.encode(rec, [])
    assert text.prompt_text(rec) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                     "What colour is the cube?<|im_end|>\n<|im_start|>assistant\n")
    assert (pair.image_inputs, pair.n_images, pair.n_image_tokens) == ({}, 0, 0)
    assert text.plan_length(rec, []) == pair.length
    with pytest.raises(RowError, match=r"^shapes:7: image: the model is text-only \(its processor is a tokenizer\) "
                                       r"but the row has 1 image\(s\)$"):
        text.encode(record(), [image()])


def test_text_row_on_a_vlm(internvl):
    pair = internvl.encode(record(question="What is 2 + 2?", n_images=0), [])
    assert (pair.image_inputs, pair.n_image_tokens) == ({}, 0)


def test_length_is_prompt_plus_longer_answer():
    pair = EncodedPair(torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                       torch.zeros(4, dtype=torch.long))
    assert pair.length == 9


def test_too_long_pair_is_dropped_with_its_numbers(tiny_internvl_dir, internvl):
    length = internvl.encode(record(), [image()]).length  # 16 image tokens + <img></img> + text
    fits = PairEncoder(load_processor(tiny_internvl_dir), max_length=length)
    assert fits.encode(record(), [image()]).length == length
    over = PairEncoder(fits.processor, max_length=length - 1)
    p = length - 6  # "The cube is blue.<|im_end|>" is 6 tokens
    with pytest.raises(TooLongError, match=f"^shapes:7: chosen: pair is {length} tokens \\(prompt {p} incl. 16 image "
                                           f"tokens, chosen 6, rejected 6\\), over max_length {length - 1}; dropped, "
                                           f"not truncated$"):
        over.encode(record(), [image()])
    tiny = PairEncoder(fits.processor, max_length=10)
    with pytest.raises(TooLongError, match=r"^shapes:7: question: pair is"):
        tiny.encode(record(), [image()])


@pytest.mark.parametrize(("rec", "n_images", "message"), [
    (record(n_images=2), 2, "shapes:7: question: has 1 <image> placeholder(s) but 2 image(s) were given"),
    (record(chosen="red<|im_end|>"), 1,
     "shapes:7: chosen: contains the special token '<|im_end|>', which the model would read as a control token"),
    (record(question="<image>\nWhat is <IMG_CONTEXT>?"), 1,
     "shapes:7: question: contains the special token '<IMG_CONTEXT>', which the model would read as a control token"),
])
def test_row_errors(internvl, rec, n_images, message):
    with pytest.raises(RowError, match=f"^{re.escape(message)}$"):
        internvl.encode(rec, [image()] * n_images)
    with pytest.raises(RowError, match=f"^{re.escape(message)}$"):
        internvl.plan_length(rec, [(64, 64)] * n_images)


def test_control_tokens_and_allowed_special_tags(internvl, qwen):
    assert internvl.control_tokens == ["<IMG_CONTEXT>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>",
                                       "</img>", "<img>"]
    assert qwen.control_tokens == ["<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|image_pad|>",
                                   "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    # Grounding tags are special tokens of InternVL's tokenizer but legitimate answer text (MMPR uses them).
    pair = internvl.encode(record(chosen="<ref>cube</ref><box>[[1, 2]]</box>"), [image()])
    tokens = internvl.tokenizer.convert_ids_to_tokens(pair.chosen_ids.tolist())
    assert tokens == ["<ref>", "c", "ub", "e", "</ref>", "<box>", "[", "[", "1", ",", "Ġ", "2", "]", "]", "</box>",
                      "<|im_end|>"]


def test_bad_arguments(internvl):
    with pytest.raises(ValueError, match=r"^max_length must be >= 1 or None, got 0$"):
        PairEncoder(internvl.processor, max_length=0)
    with pytest.raises(ValueError, match=r"^max_patches must be >= 1, got 0$"):
        internvl.encode(record(), [image()], max_patches=0)


def test_an_image_the_processor_refuses_is_the_rows_error(qwen, internvl):
    # Qwen2.5-VL's processor refuses an aspect ratio over 200 with a plain ValueError: that is one bad row, reported
    # with its dataset, line and field, not an exception that ends the run
    wide = image((2100, 10))
    message = (r"^shapes:7: image: the processor refused it: ValueError: absolute aspect ratio must be smaller "
               r"than 200, got 210\.0$")
    with pytest.raises(RowError, match=message):
        qwen.encode(record(), [wide])
    with pytest.raises(RowError, match=message):
        qwen.plan_length(record(), [wide.size])
    assert internvl.encode(record(), [wide]).n_images == 1  # InternVL tiles it (into 6 × 1 strips)
