"""Row parsing: field rules, placeholder normalisation, tile budget, and the exact error messages."""

from __future__ import annotations

import json

import pytest

from mpo.data import IMAGE_PLACEHOLDER, PreferenceRecord, RowError, parse_row, tile_budget


def _row(**fields) -> str:
    base = {"question": "Q?", "chosen": "yes", "rejected": "no"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def _error(raw) -> RowError:
    with pytest.raises(RowError) as err:
        parse_row(raw, "ds", 7)
    return err.value


def test_text_row_and_metadata():
    record, warnings = parse_row(_row(source="mmpr", score=0.5), "ds", 3)
    assert record == PreferenceRecord("ds", 3, "Q?", "yes", "no", (), None, {"source": "mmpr", "score": 0.5})
    assert record.modality == "text" and warnings == []


@pytest.mark.parametrize("image", [..., None, "", []])
def test_text_only_forms(image):
    record, _ = parse_row(_row(image=image), "ds", 1)
    assert record.images == () and record.question == "Q?"


def test_single_image_gets_a_placeholder_prepended():
    record, _ = parse_row(_row(image="a.png"), "ds", 1)
    assert record.question == "<image>\nQ?" and record.images == ("a.png",) and record.modality == "single"


def test_single_image_with_its_placeholder_is_unchanged():
    record, _ = parse_row(_row(image="a.png", question="Look: <image> what?"), "ds", 1)
    assert record.question == "Look: <image> what?"


def test_one_element_list_is_a_single_image():
    record, _ = parse_row(_row(image=["a.png"]), "ds", 1)
    assert record.question == "<image>\nQ?" and record.modality == "single" and record.image_field(0) == "image"


def test_multi_image_without_placeholders_gets_numbered_ones():
    record, _ = parse_row(_row(image=["a.png", "b.png", "c.png"]), "ds", 1)
    assert record.question == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nQ?"
    assert record.modality == "multi" and record.image_field(2) == "image[2]"


def test_multi_image_with_one_placeholder_per_image_is_unchanged():
    question = "Image-1: <image>\nImage-2: <image>\nSame?"
    record, _ = parse_row(_row(image=["a.png", "b.png"], question=question), "ds", 1)
    assert record.question == question and record.question.count(IMAGE_PLACEHOLDER) == 2


@pytest.mark.parametrize("image, question, message", [
    (["a.png", "b.png"], "<image> and?", "has 1 <image> placeholders for 2 image(s); write one per image, "
                                         "or none to have them added"),
    (["a.png", "b.png"], "<image><image><image>", "has 3 <image> placeholders for 2 image(s); write one per "
                                                  "image, or none to have them added"),
    ("a.png", "<image> <image>", "has 2 <image> placeholders for 1 image(s); write one per image, or none to "
                                 "have them added"),
    (..., "What is <image>?", "has 1 <image> placeholder(s) but the row has no image"),
])
def test_placeholder_mismatch_is_an_error(image, question, message):
    err = _error(_row(image=image, question=question))
    assert str(err) == f"ds:7: question: {message}"


def test_invalid_utf8():
    """`{"question": "caf` is 17 bytes, so the bad byte is the 18th."""
    err = _error(b'{"question": "caf\xff"}')
    assert str(err) == "ds:7: -: not valid UTF-8 (byte 0xff at column 18)"


def test_not_json():
    err = _error('{question: 1}')
    assert str(err) == "ds:7: -: not valid JSON at column 2: Expecting property name enclosed in double quotes"


@pytest.mark.parametrize("raw, kind", [("[1, 2]", "a list"), ('"text"', "a string"), ("3", "a number"),
                                       ("null", "null")])
def test_line_that_is_not_an_object(raw, kind):
    assert str(_error(raw)) == f"ds:7: -: expected a JSON object, got {kind}"


@pytest.mark.parametrize("fields, field, message", [
    ({"question": 3}, "question", "expected a string, got a number"),
    ({"chosen": ["a"]}, "chosen", "expected a string, got a list"),
    ({"rejected": None}, "rejected", "expected a string, got null"),
    ({"rejected": ...}, "rejected", "is missing"),
    ({"question": ""}, "question", "is empty"),
    ({"chosen": "  \n"}, "chosen", "is empty"),
    ({"image": 5}, "image", "expected a path string or a list of path strings, got a number"),
    ({"image": {"path": "a"}}, "image", "expected a path string or a list of path strings, got an object"),
    ({"image": ["a.png", 1]}, "image[1]", "expected a path string, got a number"),
    ({"image": ["a.png", ""]}, "image[1]", "is an empty path"),
    ({"image": "  "}, "image", 'is a blank path (omit the key or use "" for a text-only row)'),
    ({"system_prompt": 1}, "system_prompt", "expected a string or null, got a number"),
    ({"chosen": "see <image>"}, "chosen", "contains <image>; answers cannot hold image placeholders"),
    ({"video": "v.mp4"}, "video", "video rows are not supported; remove the row or give it an image"),
])
def test_field_errors(fields, field, message):
    err = _error(_row(**fields))
    assert (err.dataset, err.line, err.field, err.message, err.severity, err.kind) == (
        "ds", 7, field, message, "error", "row")


def test_chosen_equal_to_rejected_is_a_warning():
    record, warnings = parse_row(_row(chosen="same", rejected="same"), "ds", 4)
    assert record.chosen == record.rejected
    assert [str(w) for w in warnings] == ["ds:4: rejected: is identical to chosen: the pair teaches nothing"]
    assert warnings[0].severity == "warning"


def test_system_prompt_is_kept():
    record, _ = parse_row(_row(system_prompt="Be brief."), "ds", 1)
    assert record.system_prompt == "Be brief."


@pytest.mark.parametrize("budget, n_images, tiles", [(12, 1, 12), (12, 2, 6), (12, 5, 2), (12, 12, 1),
                                                     (12, 20, 1), (12, 0, 1), (6, 4, 1), (1, 3, 1)])
def test_tile_budget(budget, n_images, tiles):
    """max(1, budget // n): 12 // 5 = 2, 12 // 20 = 0 -> 1; a text row counts as one (dummy) image."""
    assert tile_budget(budget, n_images) == tiles


def test_tile_budget_rejects_zero():
    with pytest.raises(ValueError, match="max_dynamic_patch must be >= 1, got 0"):
        tile_budget(0, 1)
