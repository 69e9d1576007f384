"""Fixtures of the data-layer tests: a private index cache, and writers for tiny datasets and images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _private_index_cache(tmp_path_factory, monkeypatch):
    # Never touch ~/.cache from tests; each test gets its own, empty index cache.
    monkeypatch.setenv("MPO_CACHE_DIR", str(tmp_path_factory.mktemp("mpo-cache")))


@pytest.fixture
def write_png() -> Callable[..., Path]:
    """``write_png(path, size=(8, 8), colour=(255, 0, 0), mode="RGB")`` writes a one-colour image."""

    def write(path: Path, size: tuple[int, int] = (8, 8), colour=(255, 0, 0), mode: str = "RGB",
              format: str = "PNG") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(path, format=format)
        return path

    return write


@pytest.fixture
def write_dataset(tmp_path) -> Callable[..., Path]:
    """``write_dataset(rows, name="ds", **entry)`` writes ``<tmp>/<name>.jsonl`` (rows: dicts, or raw str/bytes
    lines) and ``<tmp>/meta.json`` listing every dataset written so far; returns the meta path."""
    entries: dict[str, dict] = {}

    def write(rows: list, name: str = "ds", **entry) -> Path:
        lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
        (tmp_path / f"{name}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
        entries[name] = {"root": "images", "annotation": f"{name}.jsonl", "repeat_time": 1, **entry}
        meta = tmp_path / "meta.json"
        meta.write_text(json.dumps(entries, indent=2))
        return meta

    return write
