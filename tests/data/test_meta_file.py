"""The meta file: JSON errors with line and column, field validation, path resolution, warnings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mpo.data import DatasetSpec, MetaError, read_meta, read_meta_entries


def _meta(tmp_path: Path, entries: dict) -> Path:
    (tmp_path / "a.jsonl").write_text("")
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(entries))
    return path


def test_trailing_comma_names_line_and_column(tmp_path):
    """InternVL's own debug_mpo.json has a comma after its last entry. The comma of line 2 is its 46th character:
    2 spaces + `"a": {"root": ".", "annotation": "a.jsonl"}` (43 characters) = 45, then the comma."""
    path = tmp_path / "debug_mpo.json"
    path.write_text('{\n  "a": {"root": ".", "annotation": "a.jsonl"},\n}\n')
    with pytest.raises(MetaError) as err:
        read_meta(path)
    assert str(err.value) == (f"{path}: invalid JSON at line 2, column 46: trailing comma before '}}'; "
                              "JSON allows no comma after the last item: delete this comma")


def test_trailing_comma_in_a_list(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"a": [1, 2,]}')
    with pytest.raises(MetaError, match=r"line 1, column 12: trailing comma before '\]'"):
        read_meta(path)


def test_other_json_error_names_line_and_column(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n  "a" {}\n}')
    with pytest.raises(MetaError) as err:
        read_meta(path)
    assert str(err.value) == f"{path}: invalid JSON at line 2, column 7: Expecting ':' delimiter"


@pytest.mark.parametrize("text, message", [
    ("[]", "expected a JSON object mapping dataset names to entries, got a list"),
    ("{}", "the meta file lists no dataset"),
])
def test_unusable_top_level(tmp_path, text, message):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(MetaError) as err:
        read_meta_entries(path)
    assert str(err.value) == f"{path}: {message}"


def test_missing_meta_file(tmp_path):
    with pytest.raises(MetaError) as err:
        read_meta(tmp_path / "nope.json")
    assert str(err.value) == f"{tmp_path / 'nope.json'}: meta file not found"


def test_all_fields_and_paths_relative_to_the_meta_folder(tmp_path, monkeypatch):
    path = _meta(tmp_path, {"a": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 2.5, "length": 0,
                                  "max_dynamic_patch": 6, "data_augment": True, "allow_outside_root": True}})
    monkeypatch.chdir(tmp_path.parent)  # InternVL would resolve against the working directory
    assert read_meta(path) == [DatasetSpec(name="a", root=tmp_path / "imgs", annotation=tmp_path / "a.jsonl",
                                           repeat_time=2.5, max_dynamic_patch=6, data_augment=True, length=0,
                                           allow_outside_root=True)]


def test_defaults(tmp_path):
    (spec,) = read_meta(_meta(tmp_path, {"a": {"root": ".", "annotation": "a.jsonl"}}))
    assert (spec.repeat_time, spec.max_dynamic_patch, spec.data_augment, spec.length, spec.allow_outside_root) == (
        1.0, None, False, None, False)


@pytest.mark.parametrize("key, value, field, message", [
    ("repeat_time", -1, "repeat_time", "must be >= 0 (0 skips the dataset), got -1"),
    ("repeat_time", -0.5, "repeat_time", "must be >= 0 (0 skips the dataset), got -0.5"),
    ("repeat_time", "2", "repeat_time", 'must be a number >= 0, got "2"'),
    ("repeat_time", True, "repeat_time", "must be a number >= 0, got true"),
    ("repeat_time", None, "repeat_time", "must be a number >= 0, got null"),
    ("max_dynamic_patch", 0, "max_dynamic_patch", "must be an integer >= 1 or null, got 0"),
    ("max_dynamic_patch", 2.5, "max_dynamic_patch", "must be an integer >= 1 or null, got 2.5"),
    ("data_augment", "yes", "data_augment", 'must be true or false, got "yes"'),
    ("allow_outside_root", 1, "allow_outside_root", "must be true or false, got 1"),
    ("root", "", "root", 'must be a non-empty path string, got ""'),
    ("root", "s3://bucket/x", "root", "remote paths are not supported, got 's3://bucket/x'; download the data first"),
    ("annotation", "missing.jsonl", "annotation", "file not found: {tmp}/missing.jsonl"),
])
def test_bad_entry_fields(tmp_path, key, value, field, message):
    path = _meta(tmp_path, {"bad": {"root": ".", "annotation": "a.jsonl", key: value},
                            "good": {"root": ".", "annotation": "a.jsonl"}})
    bad, good = read_meta_entries(path)
    assert (bad.spec, bad.error_field, bad.error) == (None, field, message.format(tmp=tmp_path))
    assert good.spec is not None and good.error is None
    with pytest.raises(MetaError) as err:
        read_meta(path)
    assert str(err.value) == f"{path}: bad: {field}: {message.format(tmp=tmp_path)}"


def test_integral_float_length_is_the_integer(tmp_path):
    (entry,) = read_meta_entries(_meta(tmp_path, {"a": {"root": ".", "annotation": "a.jsonl", "length": 10.0}}))
    assert (entry.spec.length, entry.error, entry.warnings) == (10, None, [])
    assert type(entry.spec.length) is int


@pytest.mark.parametrize("value", [10.5, "10", -3, True, float("inf"), [10]])
def test_bad_length_is_a_warning_never_an_error(tmp_path, caplog, value):
    """InternVL never reads ``length``: a value that is no row count is ignored with a warning that names the meta
    file and the dataset (logged by read_meta, as training reads it), and the dataset stays usable."""
    path = tmp_path / "meta.json"
    (tmp_path / "a.jsonl").write_text("")
    path.write_text(json.dumps({"a": {"root": ".", "annotation": "a.jsonl", "length": value}}))
    shown = json.dumps(value)
    (entry,) = read_meta_entries(path)
    assert (entry.spec.length, entry.error) == (None, None)
    assert entry.warnings == [("length", f"must be an integer >= 0 or null, got {shown}; ignored")]
    with caplog.at_level(logging.WARNING, logger="mpo.data.meta"):
        (spec,) = read_meta(path)
    assert spec.length is None
    assert f"{path}: a: length: must be an integer >= 0 or null, got {shown}; ignored" in caplog.text


@pytest.mark.parametrize("entry, field", [({"annotation": "a.jsonl"}, "root"), ({"root": "."}, "annotation")])
def test_required_keys(tmp_path, entry, field):
    (bad,) = read_meta_entries(_meta(tmp_path, {"bad": entry}))
    assert (bad.error_field, bad.error) == (field, "is required")


def test_entry_that_is_not_an_object(tmp_path):
    (bad,) = read_meta_entries(_meta(tmp_path, {"bad": ["a.jsonl"]}))
    assert bad.error == "expected an object with root and annotation, got a list"


def test_repeat_zero_is_kept_with_a_warning_and_needs_no_file(tmp_path):
    (entry,) = read_meta_entries(_meta(tmp_path, {"off": {"root": ".", "annotation": "gone.jsonl",
                                                          "repeat_time": 0}}))
    assert entry.spec is not None and entry.spec.repeat_time == 0
    assert entry.warnings == [("repeat_time", "is 0: dataset skipped")]


def test_unknown_key_is_a_warning_naming_the_key(tmp_path):
    (entry,) = read_meta_entries(_meta(tmp_path, {"a": {"root": ".", "annotation": "a.jsonl", "colour": 1}}))
    assert entry.spec is not None
    assert entry.warnings == [("colour", "unknown key, ignored (known keys: root, annotation, repeat_time, "
                                         "max_dynamic_patch, data_augment, length, allow_outside_root)")]


def test_read_meta_logs_the_warnings_that_training_would_otherwise_never_show(tmp_path, caplog):
    """A misspelt "repeat_times" trains with the default repeat_time 1: training reads the meta file through
    read_meta, so the warning has to be logged there, not only shown by `mpo data check`."""
    meta = _meta(tmp_path, {"a": {"root": ".", "annotation": "a.jsonl", "repeat_times": 3}})
    with caplog.at_level(logging.WARNING, logger="mpo.data.meta"):
        (spec,) = read_meta(meta)
    assert spec.repeat_time == 1
    assert f"{meta}: a: repeat_times: unknown key, ignored (known keys: root" in caplog.text
