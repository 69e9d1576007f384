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


def run_config(model, meta, out, *extra):
    """A small CPU run config (fp32, constant lr, no dropout) with dotted overrides."""
    from mpo.config import load_config
    from mpo.train.config import RunConfig

    overrides = [f"model.path={model}", f"data.meta_path={meta}", f"train.output_dir={out}",
                 "data.max_length=512", "data.max_dynamic_patch=1", "train.learning_rate=1e-3",
                 "train.lr_scheduler=constant", "train.warmup_steps=0", "train.warmup_ratio=0", "train.per_device_batch_size=4",
                 "train.logging_steps=1", "train.save_steps=0", "train.max_steps=3", *extra]
    return load_config(RunConfig, None, overrides)
