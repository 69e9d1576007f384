"""Fixtures for the training tests: a small demo dataset and a tiny InternVL whose tokenizer knows its words."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from mpo.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo(out, n=96, n_heldout=16, n_prompts=4, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, demo_data):
    from mpo.data.demo import demo_corpus
    from mpo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("demo_model") / "internvl", "internvl", corpus=demo_corpus(demo_data))
