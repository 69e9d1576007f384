"""The byte-offset index: line endings, blank lines, cache reuse and invalidation, pickling."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest

from mpo.data import AnnotationIndex, default_cache_dir
from mpo.data import index as index_module


def _rows(index: AnnotationIndex) -> list[tuple[int, bytes]]:
    return [(index.line_number(i), index.raw(i)) for i in range(len(index))]


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path):
    """Lines 2 (empty), 4 (spaces and a tab) and 5 (a lone CR) are blank: skipped, not rows, not errors."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n  \t \n\r\n{"a": 3}\n')
    assert _rows(AnnotationIndex(path)) == [(1, b'{"a": 1}'), (3, b'{"a": 2}'), (6, b'{"a": 3}')]


def test_long_whitespace_lines_are_blank_and_indented_rows_are_rows(tmp_path):
    """Whitespace-only lines of any length are blank (lines over 16 bytes were once kept as rows and then reported
    as bad JSON); a row indented by whitespace stays a row; a BOM before whitespace still makes a blank line."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf' + b" " * 40 + b'\n{"a": 1}\n' + b"\t \x0b\x0c" * 20 + b'\r\n    {"a": 2}\n'
                     + b" " * 17)
    assert _rows(AnnotationIndex(path)) == [(2, b'{"a": 1}'), (4, b'    {"a": 2}')]


def test_crlf_and_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"a": 2}\r\n{"a": 3}')
    assert _rows(AnnotationIndex(path)) == [(1, b'{"a": 1}'), (2, b'{"a": 2}'), (3, b'{"a": 3}')]


def test_utf8_bom_and_empty_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert _rows(AnnotationIndex(path)) == [(1, b'{"a": 1}')]
    path.write_bytes(b"")
    assert len(AnnotationIndex(path)) == 0


def test_scan_across_chunk_boundaries(tmp_path, monkeypatch):
    """With 7-byte chunks every row spans several reads; offsets must not depend on where a chunk ends."""
    rows = [b'{"k": %d, "pad": "%s"}' % (k, b"x" * k) for k in range(40)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n\n")
    monkeypatch.setattr(index_module, "_CHUNK", 7)
    index = AnnotationIndex(path, use_cache=False)
    assert [index.raw(i) for i in range(len(index))] == rows
    assert list(index.iter_rows(3, 31)) == [(k + 1, rows[k]) for k in range(3, 31)]


def test_iter_rows_matches_raw(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(b'{"k": %d}\r\n\n' % k for k in range(50)))
    index = AnnotationIndex(path)
    assert list(index.iter_rows(0, 50)) == [(index.line_number(i), index.raw(i)) for i in range(50)]
    assert index.line_number(49) == 99


def test_cache_reuse_and_never_beside_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n')
    first, second = AnnotationIndex(path), AnnotationIndex(path)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert _rows(second) == _rows(first)
    assert sorted(os.listdir(data)) == ["a.jsonl"]
    assert len(list(default_cache_dir().glob("a-*.npz"))) == 1
    assert default_cache_dir() == Path(os.environ["MPO_CACHE_DIR"]) / "index"


def test_cache_invalidated_by_size_change(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    AnnotationIndex(path)
    stat = os.stat(path)
    with open(path, "ab") as fh:
        fh.write(b'{"a": 2}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the size tells
    index = AnnotationIndex(path)
    assert (index.from_cache, len(index)) == (False, 2)


def test_cache_invalidated_by_mtime_change(tmp_path):
    """Same size, different bytes: a cache keyed on size alone would serve wrong offsets."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    AnnotationIndex(path)
    stat = os.stat(path)
    path.write_bytes(b'{"a": 1, "b": 2}\n\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    index = AnnotationIndex(path)
    assert (index.from_cache, _rows(index)) == (False, [(1, b'{"a": 1, "b": 2}')])


def test_explicit_cache_dir_and_unwritable_cache(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    AnnotationIndex(path, cache_dir=tmp_path / "cache")
    assert AnnotationIndex(path, cache_dir=tmp_path / "cache").from_cache
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="mpo.data.index"):
        index = AnnotationIndex(path, cache_dir=blocker)
    assert len(index) == 1 and "cannot write the index cache" in caplog.text


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    AnnotationIndex(path)
    (cache,) = default_cache_dir().glob("a-*.npz")
    cache.write_bytes(b"torn")
    index = AnnotationIndex(path)
    assert (index.from_cache, len(index)) == (False, 1)
    assert AnnotationIndex(path).from_cache


def test_pickle_and_out_of_range(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n')
    index = AnnotationIndex(path)
    index.raw(0)  # opens a descriptor, which must not travel
    copy = pickle.loads(pickle.dumps(index))
    assert copy.raw(1) == b'{"a": 2}'
    with pytest.raises(IndexError):
        index.raw(2)
