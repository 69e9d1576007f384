"""Prompt-file reading: item ids, seeds, subsampling, and bad rows reported with FILE:LINE: FIELD."""

from __future__ import annotations

import hashlib
import json

import pytest
from gen_fakes import write_jsonl
from PIL import Image

from mpo.data.errors import ImageError
from mpo.generate.items import (
    item_id,
    load_item_images,
    model_name,
    read_prompts,
    sample_seed,
    subsample_lines,
)


def test_item_id_is_sha1_of_images_in_file_order_and_question():
    """sha1('[["a.png", "b.png"], "Q?"]'); chosen joins the key when given. The images are hashed in file order
    (they were sorted): a question that says Image-1/Image-2 asks something else when the images swap."""
    expected = hashlib.sha1(b'[["a.png", "b.png"], "Q?"]').hexdigest()
    assert expected == "013d3e694e35ff657e21b86ca42ecf4c1e9935a4"
    assert item_id(["a.png", "b.png"], "Q?") == expected
    assert item_id(["b.png", "a.png"], "Q?") == hashlib.sha1(b'[["b.png", "a.png"], "Q?"]').hexdigest() != expected
    assert item_id([], "Q?", "A.") == hashlib.sha1(b'[[], "Q?", "A."]').hexdigest()
    assert item_id([], "Q?", "A.") != item_id([], "Q?", "B.")


def test_same_images_in_another_order_are_another_item(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    path = tmp_path / "p.jsonl"
    question = "<image>\n<image>\nIs Image-1 wider than Image-2?"
    write_jsonl(path, [{"image": ["a.png", "b.png"], "question": question, "answer": "yes"},
                       {"image": ["b.png", "a.png"], "question": question, "answer": "no"}])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare)
    assert [(it.line, it.images, it.row["answer"]) for it in prompts.items] == [
        (1, ("a.png", "b.png"), "yes"), (2, ("b.png", "a.png"), "no")]
    assert prompts.rejected == []


def test_sample_seed_is_pinned_and_differs_per_index_and_run_seed():
    """First 63 bits of sha256('0:abc:0')."""
    digest = hashlib.sha256(b"0:abc:0").digest()
    assert sample_seed(0, "abc", 0) == int.from_bytes(digest[:8], "big") >> 1 == 3541810044847611144
    assert sample_seed(0, "abc", 1) == 3373458684596430594
    assert sample_seed(1, "abc", 0) == 534571175964126676


@pytest.mark.parametrize("checkpoint, name", [
    ("OpenGVLab/InternVL3-8B", "OpenGVLab_InternVL3-8B"),
    ("/ckpt/run1/final/", "run1_final"),
    ("model", "model"),
])
def test_model_name_is_last_two_components(checkpoint, name):
    assert model_name(checkpoint) == name


@pytest.mark.parametrize("checkpoint, name", [
    (".", "ckpt_run1"), ("./", "ckpt_run1"), ("..", "tmp_ckpt"), ("final/..", "ckpt_run1"),
    ("../run1/.", "ckpt_run1"), ("final", "final"), ("./final/", "final"),
])
def test_a_path_without_a_name_of_its_own_is_named_after_its_resolved_folder(tmp_path, monkeypatch, checkpoint,
                                                                              name):
    """``--checkpoint .`` gave ``""``: the output went straight into ``--out-dir`` under the prompt file's own
    name, and replaced the prompt file when ``--out-dir`` was its folder. Paths with a name keep their written
    form (an output started before keeps its folder)."""
    run1 = tmp_path / "tmp" / "ckpt" / "run1"
    (run1 / "final").mkdir(parents=True)
    monkeypatch.chdir(run1)
    assert model_name(checkpoint) == name


def test_subsample_is_the_seed_stride_rule():
    assert subsample_lines(10, 3) == [0, 3, 6]        # stride 10 // 3 = 3
    assert subsample_lines(10, 4) == [0, 2, 4, 6]     # stride 2, first 4
    assert subsample_lines(5, 8) == [0, 1, 2, 3, 4]   # at most the cap: all lines
    assert subsample_lines(5, None) == [0, 1, 2, 3, 4]
    assert len(subsample_lines(14000, 7000)) == 7000


def _prepare(row, n_images):
    if "bad" in row["question"]:
        raise ValueError("is bad on purpose")
    return row["question"]


def test_bad_rows_are_reported_with_file_line_and_field(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [
        {"image": "red.png", "question": "ok", "answer": "red", "meta": {"k": 1}},  # 1 good
        "{not json",                                                               # 2
        {"question": "no answer"},                                                 # 3
        {"question": "", "answer": "x"},                                           # 4
        {"image": "gone.png", "question": "q", "answer": "a"},                     # 5
        {"image": ["red.png", 3], "question": "q", "answer": "a"},                 # 6
        {"question": "bad row", "answer": "a"},                                    # 7
        "",                                                                        # 8 blank: not a row
        {"image": "red.png", "question": "ok", "answer": "other"},                 # 9 same id as 1
        {"question": "text only", "answer": 4},                                    # 10 good
    ])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare)
    assert [(it.line, it.images, it.row.get("meta")) for it in prompts.items] == [(1, ("red.png",), {"k": 1}),
                                                                                 (10, (), None)]
    f = str(path)
    assert [str(e) for e in prompts.rejected] == [
        f"{f}:2: -: not valid JSON at column 2: Expecting property name enclosed in double quotes",
        f"{f}:3: answer: is missing",
        f"{f}:4: question: must be a non-empty string",
        f"{f}:5: image: file not found: {tmp_path / 'gone.png'}",
        f"{f}:6: image: expected a path or a list of non-empty paths",
        f"{f}:7: question: is bad on purpose",
        f"{f}:9: question: duplicate of line 1 (same images and text); generated once",
    ]
    assert [e.kind for e in prompts.rejected][3] == "image"


def test_image_root_and_outside_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    path = tmp_path / "prompts" / "p.jsonl"
    write_jsonl(path, [{"image": "a.png", "question": "q", "answer": "a"},
                       {"image": str(tmp_path / "imgs" / "a.png"), "question": "q2", "answer": "a"}])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare, image_root=tmp_path / "imgs")
    assert [it.line for it in prompts.items] == [1]
    assert "is an absolute path" in str(prompts.rejected[0])
    relaxed = read_prompts(path, required=("question", "answer"), prepare=_prepare, image_root=tmp_path / "imgs",
                           allow_outside_root=True)
    assert [it.line for it in relaxed.items] == [1, 2]
    assert load_item_images(relaxed, relaxed.items[1])[0].size == (8, 8)


def test_undecodable_image_raises_image_error_with_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"image": "broken.png", "question": "q", "answer": "a"}])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare)
    with pytest.raises(ImageError) as err:
        load_item_images(prompts, prompts.items[0])
    assert str(err.value) == f"{path}:1: image: {tmp_path / 'broken.png'} is not an image PIL can read"


def test_sample_max_num_subsamples_lines_before_validation(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": f"q{i}", "answer": i} for i in range(10)])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare, sample_max_num=3)
    assert [it.line for it in prompts.items] == [1, 4, 7]


def test_lines_end_at_newline_only_and_bad_utf8_is_one_rows_error(tmp_path):
    """U+2028, U+2029 and U+0085 are valid raw inside a JSON string (our own json.dumps writes them raw), so they
    must not end a row; a line that is not UTF-8 is that row's error; a UTF-8 BOM at the start is skipped.
    (``str.splitlines`` cut rows 1-3 in two, and the 0xe9 byte made the whole file a UnicodeDecodeError.)"""
    path = tmp_path / "p.jsonl"
    rows = [{"question": f"line{sep}break", "answer": f"a{sep}b"} for sep in ("\u2028", "\u2029", "\x85")]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b'{"question": "caf\xe9", "answer": "x"}\r\n'
                     + b'{"question": "last", "answer": "y"}\r\n')
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare)
    assert [(it.line, it.row["answer"]) for it in prompts.items] == [
        (1, "a\u2028b"), (2, "a\u2029b"), (3, "a\x85b"), (5, "y")]
    assert [str(e) for e in prompts.rejected] == [f"{path}:4: -: not valid UTF-8 (byte 0xe9 at column 18)"]


@pytest.mark.parametrize("answer", ["", "  ", [], ["", " "]])
def test_empty_answer_is_a_row_error_as_in_stage_2(tmp_path, answer):
    """Stage 2 counts such lines as malformed (no response can be correct), so Stage 1 does not sample them."""
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "q1", "answer": answer}, {"question": "q2", "answer": 0},
                       {"question": "q3", "answer": ["", "red"]}])
    prompts = read_prompts(path, required=("question", "answer"), prepare=_prepare)
    assert [it.line for it in prompts.items] == [2, 3]
    assert [str(e) for e in prompts.rejected] == [
        f"{path}:1: answer: is empty (\"\", blank or []): no response can match it"]
