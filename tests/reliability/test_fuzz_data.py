"""Fuzzing the data layer: hostile meta files and JSONL rows end in a per-row (or per-entry) error, or in success.

Never an uncaught exception, never a hang: every example runs under a wall-clock limit (``time_limit``). The
inputs are JSON *text*, so that what ``json.dumps`` never writes is generated too: duplicate keys, NaN/Infinity
literals, 5,000-digit integers, lone UTF-16 surrogate escapes, raw control characters, nesting 100,000 deep,
megabyte strings, truncated lines, byte-order marks and invalid UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_support import time_limit

from mpo.data.check import run_check
from mpo.data.errors import DataError, MetaError, RowError
from mpo.data.meta import KNOWN_KEYS, read_meta_entries
from mpo.data.mixture import PreferenceMixture
from mpo.data.records import IMAGE_PLACEHOLDER, PreferenceRecord, parse_row

LIMIT_S = 20.0  # per example; generous for a loaded 2-core machine (a typical example takes milliseconds)


def fuzz(max_examples: int) -> settings:
    """Examples are sized for the 2-core CI budget; the wall-clock limit, not hypothesis' deadline, catches hangs."""
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------------------------
# JSON text fragments


def _quote(text: str, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)


json_strings = st.one_of(
    st.builds(_quote, st.text(max_size=20), st.booleans()),
    st.sampled_from(['"\\ud800"', '"x\\udfff y"', '"\\ud83d\\ude00"', '"\\\\ud800"', '"\\u0000"', '"a\\u001bb"',
                     '"<image>"', '"<image><image>"', '"\\u202e"', '"\u00e9\u4e2d\U0001f600"', '""', '"  "']),
    st.sampled_from(["\x00", "\x1b", "\x7f", "\t", "\n"]).map(lambda c: f'"a{c}b"'),  # raw: invalid below 0x20
    st.sampled_from([10**5, 10**6]).map(lambda n: '"' + "a" * n + '"'),  # 1 MB: a "huge" row
)
json_numbers = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),  # writes NaN, Infinity, -Infinity
    st.sampled_from(["1e999", "-0", "1" * 5000, "0" * 5000 + "1", "1.5e-400", "01", "1.", "+1", "0x10"]),
)
json_scalars = st.one_of(json_strings, json_numbers, st.sampled_from(["true", "false", "null", "tru", "None"]))
json_deep = st.one_of(st.integers(1, 100_000).map(lambda k: "[" * k + "]" * k),
                      st.integers(1, 100_000).map(lambda k: '{"a":' * k + "1" + "}" * k))


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


json_values = st.recursive(
    json_scalars | json_deep,
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    | st.lists(st.tuples(json_strings, inner), max_size=4).map(_object),
    max_leaves=8,
)

# ---------------------------------------------------------------------------------------------------------------
# Rows: mostly plausible, with one or more hostile parts


IMAGE_VALUES = ['"ok.png"', '["ok.png", "ok.png"]', '["ok.png"]', '"missing.png"', '"../outside.png"', '"/etc/passwd"',
                '"escape_link.png"', '"a\\u0000.png"', '"\\ud800.png"', '"http://example.com/x.png"', '""', '"  "',
                '[]', 'null', '[1]', '[""]', '{"path": "ok.png"}', '"sub"', '"ok.png/.."']
ROW_KEYS = ["image", "question", "chosen", "rejected", "system_prompt", "video", "task", "answer"]


@st.composite
def row_texts(draw) -> str:
    images = draw(st.sampled_from(IMAGE_VALUES))
    question = draw(st.one_of(st.sampled_from(['"What colour?"', '"<image>\\nWhat colour?"', '"<image><image> q"',
                                                '"Image-1: <image>\\nImage-2: <image>\\nq"']), json_strings))
    answers = st.one_of(st.sampled_from(['"It is red."', '"It is blue."', '"<image> red"']), json_values)
    pairs = [('"image"', images), ('"question"', question), ('"chosen"', draw(answers)),
             ('"rejected"', draw(answers))]
    extra = draw(st.lists(st.tuples(st.one_of(st.sampled_from([f'"{k}"' for k in ROW_KEYS]), json_strings),
                                    json_values), max_size=3))  # repeated keys and anything else
    order = draw(st.permutations(range(len(pairs) + len(extra))))
    everything = pairs + extra
    text = _object([everything[i] for i in order])
    mutation = draw(st.sampled_from(["none"] * 6 + ["truncate", "bom", "garbage", "array", "scalar"]))
    if mutation == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif mutation == "bom":
        text = "\ufeff" + text
    elif mutation == "garbage":
        text += draw(st.sampled_from([" x", "}", ",", " // comment"]))
    elif mutation == "array":
        text = f"[{text}]"
    elif mutation == "scalar":
        text = draw(json_scalars)
    return text


def row_payloads():
    """What ``parse_row`` may be handed: the text, or its UTF-8 bytes (optionally with invalid bytes spliced in)."""
    def to_bytes(text: str, splice: bytes, at: int) -> bytes:
        raw = text.encode("utf-8")
        at = min(at, len(raw))
        return raw[:at] + splice + raw[at:]

    return st.one_of(row_texts(), st.builds(to_bytes, row_texts(), st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80"]),
                                            st.integers(0, 200)))


def assert_usable(record: PreferenceRecord) -> None:
    """A record that parsed is safe downstream: plain UTF-8 text, one placeholder per image."""
    for text in (record.question, record.chosen, record.rejected, record.system_prompt or "", *record.images):
        assert isinstance(text, str)
        text.encode("utf-8")
    json.dumps(record.meta, ensure_ascii=False).encode("utf-8")
    assert record.question.count(IMAGE_PLACEHOLDER) == len(record.images)
    assert record.chosen.strip() and record.rejected.strip() and record.question.strip()


def assert_printable(line: str) -> None:
    """A report line is UTF-8 and holds no control character (no terminal escape sequence from the data)."""
    line.encode("utf-8")
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", line), line


def assert_row_error(err: RowError, dataset: str, line: int) -> None:
    assert (err.dataset, err.line) == (dataset, line)
    assert str(err).startswith(f"{dataset}:{line}: ")
    str(err).encode("utf-8")  # printable: no lone surrogate leaks into a message
    json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")


@fuzz(250)
@given(raw=row_payloads(), line=st.integers(1, 10**9))
def test_parse_row_returns_a_record_or_raises_a_row_error(raw, line):
    with time_limit(LIMIT_S):
        try:
            record, warnings = parse_row(raw, "fuzz", line)
        except RowError as err:
            assert_row_error(err, "fuzz", line)
            return
    assert_usable(record)
    for warning in warnings:
        assert warning.severity == "warning"
        assert_row_error(warning, "fuzz", line)


# ---------------------------------------------------------------------------------------------------------------
# A dataset folder with real and hostile files


def _dataset_root(base: Path) -> Path:
    root = base / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "ok.png")
    (root / "sub").mkdir()
    (base / "outside.png").write_bytes((root / "ok.png").read_bytes())
    os.symlink(base / "outside.png", root / "escape_link.png")
    return root


def _file_lines(data: bytes) -> dict[int, bytes]:
    """The rows of a JSONL file as ``mpo.data.index`` defines them: 1-based line -> bytes without the line ending;
    blank lines are not rows; a byte-order mark opens the file, not its first row. (A row's text may hold a raw
    newline, which makes two lines of it.)"""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = {}
    for k, line in enumerate(data.split(b"\n")):
        line = line[:-1] if line.endswith(b"\r") else line
        if line.strip():
            lines[k + 1] = line
    return lines


@fuzz(30)
@given(rows=st.lists(st.one_of(row_texts(), st.sampled_from(["", "   ", "\r"])), min_size=1, max_size=8),
       crlf=st.booleans())
def test_check_and_mixture_report_every_bad_row_by_dataset_and_line(rows, crlf):
    """``run_check`` and ``PreferenceMixture`` agree with ``parse_row`` line by line: a bad row is one problem naming
    its dataset and its line, the other rows stay usable, and nothing raises."""
    with tempfile.TemporaryDirectory() as tmp, time_limit(LIMIT_S):
        base = Path(tmp)
        root = _dataset_root(base)
        annotation = base / "rows.jsonl"
        data = ("\r\n" if crlf else "\n").join(rows).encode("utf-8")
        annotation.write_bytes(data)
        meta = base / "meta.json"
        meta.write_text(json.dumps({"fuzz": {"root": str(root), "annotation": str(annotation)}}), encoding="utf-8")
        report = run_check(meta, progress=False, cache_dir=base / "cache")
        assert report.meta_error is None
        (dataset,) = report.datasets
        lines = _file_lines(data)
        assert dataset.rows == len(lines)
        bad = {p.line for p in dataset.problems if p.severity == "error"}
        assert bad <= set(lines)
        for line, text in lines.items():
            try:
                parse_row(text, "fuzz", line)
            except RowError:
                assert line in bad, (line, text[:200])
        assert dataset.usable == len(lines) - len(bad)
        for out in report.lines():  # problem lines, a blank line, the table (header, one row)
            assert out == "" or out.startswith(("fuzz", "dataset")), out
            assert_printable(out)
        json.dumps(report.to_json(), ensure_ascii=False).encode("utf-8")

        mixture = PreferenceMixture([e.spec for e in read_meta_entries(meta)], cache_dir=base / "cache")
        assert len(mixture) == len(lines)
        usable = 0
        for i in range(len(mixture)):
            name, line = mixture.source(i)
            try:
                record = mixture.record(i)
                mixture.images(record)
                usable += 1
            except RowError as err:
                assert_row_error(err, name, line)
                assert line in bad
        assert usable == dataset.usable


# ---------------------------------------------------------------------------------------------------------------
# Meta files


PATH_VALUES = ['"rows.jsonl"', '"images"', '"missing.jsonl"', '"a\\u0000b"', '"\\ud800"', '"~no_such_user_mpo/x"',
               '"http://example.com/meta"', '"../../../../etc/passwd"', '"' + "x" * 5000 + '"', '"images/ok.png"',
               '""', '"."', '"/dev/zero"', '"rows_link.jsonl"']


@st.composite
def meta_texts(draw) -> str:
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        keys = draw(st.lists(st.sampled_from([*KNOWN_KEYS, "colour", "root"]), max_size=8))
        pairs = []
        for key in keys:
            if key in ("root", "annotation"):
                value = draw(st.one_of(st.sampled_from(PATH_VALUES), json_values))
            elif key in ("repeat_time", "max_dynamic_patch", "length"):
                value = draw(st.one_of(st.sampled_from(["0", "0.5", "1", "2.3", "1e30", "1e300", "-1", "NaN",
                                                        "Infinity", "true", "3"]), json_values))
            else:
                value = draw(st.one_of(st.sampled_from(["true", "false"]), json_values))
            pairs.append((json.dumps(key), value))
        name = draw(st.one_of(st.sampled_from(['"a"', '"b"', '"a"', '"\\ud800"', '""', '"x\\u001b[31m"']),
                              json_strings))
        entries.append((name, draw(st.one_of(st.just(_object(pairs)), json_values))))
    text = _object(entries)
    mutation = draw(st.sampled_from(["none"] * 5 + ["truncate", "trailing_comma", "deep", "list"]))
    if mutation == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif mutation == "trailing_comma":
        text = text[:-1] + ",}"
    elif mutation == "deep":
        text = draw(json_deep)
    elif mutation == "list":
        text = f"[{text}]"
    return text


@fuzz(80)
@given(text=meta_texts())
def test_meta_file_entries_load_or_say_why(text):
    """``read_meta_entries`` raises only ``MetaError`` (naming the file); each entry is usable or carries its error;
    ``run_check`` never raises; building the mixture of the usable entries succeeds or raises ``MetaError``."""
    with tempfile.TemporaryDirectory() as tmp, time_limit(LIMIT_S):
        base = Path(tmp)
        _dataset_root(base)
        (base / "rows.jsonl").write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
        os.symlink(base / "rows.jsonl", base / "rows_link.jsonl")
        meta = base / "meta.json"
        meta.write_text(text, encoding="utf-8")
        try:
            entries = read_meta_entries(meta)
        except MetaError as err:
            assert str(err).startswith(str(meta))
            str(err).encode("utf-8")
            assert run_check(meta, progress=False, cache_dir=base / "cache").exit_code == 2
            return
        for entry in entries:
            assert (entry.spec is None) != (entry.error is None)
            entry.name.encode("utf-8"), (entry.error or "").encode("utf-8")  # printable
            if entry.spec is not None:
                assert entry.spec.root.is_absolute() and entry.spec.annotation.is_absolute()
        report = run_check(meta, progress=False, cache_dir=base / "cache")
        assert report.exit_code in (0, 1)
        for line in report.lines():
            assert_printable(line)
        specs = [e.spec for e in entries if e.spec is not None]
        try:
            mixture = PreferenceMixture(specs, cache_dir=base / "cache")
        except DataError as err:  # repeat_time so large that the mixture cannot index it
            assert isinstance(err, MetaError) and "a mixture can index" in str(err)
        except ValueError as err:  # two usable entries with one name cannot happen: JSON keeps one key
            raise AssertionError(f"unexpected {err!r}") from None
        else:
            assert len(mixture) == sum(mixture.dataset_sizes.values())
