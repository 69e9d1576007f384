"""Fixtures of the reliability tests: a small mixture with one bad row, a tiny InternVL that knows its words, and
the YAML run config that both the in-process and the ``python -m mpo.cli train`` runs read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_support import RUN_YAML


@pytest.fixture(scope="session")
def rel_demo(tmp_path_factory) -> Path:
    """The demo data (96 rows) under ``demo/``."""
    from mpo.data.demo import write_demo

    out = tmp_path_factory.mktemp("rel") / "demo"
    write_demo(out, n=96, n_heldout=4, n_prompts=6, seed=0)
    return out


@pytest.fixture(scope="session")
def rel_meta(rel_demo: Path) -> Path:
    """A 29-row mixture: subsamples of the three demo subsets (repeat_time < 1) and a two-row dataset whose first
    row is hostile (an image path out of the dataset root, path-like names everywhere), so every epoch drops
    exactly one row. The hostile dataset's name is a path too: no output file may be named after any of it."""
    broken = rel_demo / "annotations" / "broken.jsonl"
    rows = [{"image": "../../../../../../../etc/passwd", "question": "What colour is the shape?",
             "chosen": "Looking at the image, the shape is red.", "rejected": "Looking at the image, the shape is blue.",
             "task": "../../pwned", "output_dir": "/tmp/pwned", "dataset": "../pwned"},
            {"question": "What is 1 plus 2?", "chosen": "Adding 1 and 2 gives 3.", "rejected": "Adding 1 and 2 gives 4."}]
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    meta = {"shape_colour": {"root": "images", "annotation": "annotations/shape_colour.jsonl", "repeat_time": 0.25},
            "pair_colour": {"root": "images", "annotation": "annotations/pair_colour.jsonl", "repeat_time": 0.25},
            "text_arith": {"root": "images", "annotation": "annotations/text_arith.jsonl", "repeat_time": 0.5},
            "../../broken": {"root": "images", "annotation": "annotations/broken.jsonl"}}
    path = rel_demo / "meta_reliability.json"
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def rel_model(tmp_path_factory, rel_demo: Path) -> Path:
    from mpo.data.demo import demo_corpus
    from mpo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("rel_model") / "internvl", "internvl", corpus=demo_corpus(rel_demo))


@pytest.fixture(scope="session")
def run_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel_cfg") / "run.yaml"
    path.write_text(RUN_YAML, encoding="utf-8")
    return path
