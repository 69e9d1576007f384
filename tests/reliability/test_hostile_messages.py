"""The exact errors that hostile rows and meta files get (each was an uncaught exception before; the fuzz tests
found them). One row costs one row; a bad meta entry costs that entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo.data.errors import ImageError, MetaError, RowError
from mpo.data.images import load_image
from mpo.data.meta import read_meta_entries
from mpo.data.mixture import PreferenceMixture, select_rows
from mpo.data.records import parse_row

LONE = "is not valid Unicode: a \\ud800-\\udfff escape without its other half (lone surrogate)"
ANSWERS = '"chosen": "a", "rejected": "b"'


@pytest.mark.parametrize("raw, message", [
    ('{"question": ' + "[" * 100_000 + "]" * 100_000 + "}", "ds:3: -: not usable JSON: nested too deeply"),
    ('{"question": ' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}", "ds:3: -: not usable JSON: nested too deeply"),
    ('{"question": "q", "n": ' + "1" * 5000 + ", " + ANSWERS + "}",
     "ds:3: -: not usable JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    ('{"question": "q \\ud800", ' + ANSWERS + "}", f"ds:3: question: {LONE}"),
    ('{"image": "\\udfff.png", "question": "q", ' + ANSWERS + "}", f"ds:3: image: {LONE}"),
    ('{"question": "q", "tags": ["\\udc00"], ' + ANSWERS + "}", f"ds:3: tags: {LONE}"),
    ('{"\\ud800": 1, "question": "q", ' + ANSWERS + "}", f"ds:3: -: {LONE}"),
    ('{"question": "a\x00b", ' + ANSWERS + "}", "ds:3: -: not valid JSON at column 16: Invalid control character at"),
])
def test_hostile_row_is_one_row_error(raw, message):
    with pytest.raises(RowError) as err:
        parse_row(raw, "ds", 3)
    assert str(err.value) == message


@pytest.mark.parametrize("raw, question", [
    ('{"question": "q \\ud83d\\ude00", ' + ANSWERS + "}", "q \U0001f600"),  # a whole surrogate pair is one character
    ('{"question": "q \\\\ud800", ' + ANSWERS + "}", "q \\ud800"),  # an escaped backslash, then plain text
    ('{"question": "q", "score": NaN, "x": Infinity, ' + ANSWERS + "}", "q"),  # kept in meta as Python floats
    ('{"question": "first", "question": "q", ' + ANSWERS + "}", "q"),  # repeated key: the last wins, as in JSON.parse
])
def test_odd_but_valid_rows_are_accepted(raw, question):
    record, _ = parse_row(raw, "ds", 3)
    assert record.question == question


def _meta(tmp_path: Path, text: str) -> Path:
    (tmp_path / "rows.jsonl").write_text('{"question": "q", ' + ANSWERS + "}\n")
    path = tmp_path / "meta.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, message", [
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not usable JSON: nested too deeply"),
    ('{"a": {"root": ".", "annotation": "rows.jsonl", "length": ' + "9" * 5000 + "}}",
     "not usable JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    ('{"a": {"root": "\\ud800", "annotation": "rows.jsonl"}}', LONE.replace("is not", "not")),
    ('{"\\udc80": {"root": ".", "annotation": "rows.jsonl"}}', LONE.replace("is not", "not")),
])
def test_hostile_meta_file_is_a_meta_error(tmp_path, text, message):
    path = _meta(tmp_path, text)
    with pytest.raises(MetaError) as err:
        read_meta_entries(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("text, expected", [
    ('{"a": {"root": ".", "annotation": "rows.jsonl"}, "b": {"root": ".", "annotation": "rows.jsonl"}, '
     '"a": {"root": ".", "annotation": "rows.jsonl", "repeat_time": 2}}',
     [("a", None, "this dataset name appears more than once in the meta file; JSON keeps only the last entry, so "
                  "rename one of them"), ("b", None, None)]),
    ('{"a": {"root": ".", "annotation": "rows.jsonl", "root": "/elsewhere"}}',
     [("a", "root", "appears more than once in this entry; JSON keeps only the last value, so delete the other")]),
    ('{"a": {"root": "x\\u0000y", "annotation": "rows.jsonl"}}',
     [("a", "root", "contains a NUL character, which no path can hold: 'x\\x00y'")]),
    ('{"a": {"root": "~no_such_user_mpo/data", "annotation": "rows.jsonl"}}',
     [("a", "root", "cannot expand '~no_such_user_mpo/data': no such user's home folder")]),
    ('{"a": {"root": {}, "annotation": "rows.jsonl"}}',
     [("a", "root", "must be a non-empty path string, got {}")]),
])
def test_hostile_meta_entry_costs_that_entry(tmp_path, text, expected):
    entries = read_meta_entries(_meta(tmp_path, text))
    assert [(e.name, e.error_field, e.error) for e in entries] == expected


def test_annotation_path_too_long_for_the_filesystem_is_not_found(tmp_path):
    name = "x" * 5000
    (entry,) = read_meta_entries(_meta(tmp_path, json.dumps({"a": {"root": ".", "annotation": name}})))
    assert (entry.error_field, entry.error) == ("annotation", f"file not found: {tmp_path / name}")


def test_repeat_time_beyond_what_a_mixture_can_index_is_a_meta_error(tmp_path):
    with pytest.raises(MetaError) as err:
        select_rows(3, 1e30, seed=0, name="big")
    assert str(err.value) == "big: repeat_time 1e+30 x 3 rows = 3e+30 rows, more than the 4.61e+18 a mixture can index"
    (entry,) = read_meta_entries(_meta(tmp_path, '{"a": {"root": ".", "annotation": "rows.jsonl", '
                                                 '"repeat_time": 4e18}}'))
    twice = [entry.spec, type(entry.spec)(**{**entry.spec.__dict__, "name": "b"})]
    with pytest.raises(MetaError) as err:
        PreferenceMixture(twice, cache_dir=tmp_path / "cache")
    assert str(err.value) == "the datasets hold 8e+18 rows after repeat_time, more than the 4.61e+18 a mixture can index"


@pytest.mark.parametrize("rel, message", [
    ("a\x00.png", "ds:2: image: 'a\\x00.png' contains a NUL character, which no file name can hold"),
    ("\ud800.png", "ds:2: image: '\\ud800.png' is not valid Unicode (lone surrogate)"),
])
def test_unopenable_image_path_is_an_image_error(tmp_path, rel, message):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path, rel, dataset="ds", line=2)
    assert str(err.value) == message
