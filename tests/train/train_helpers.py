"""A small CPU run config for the training tests (import as ``from train_helpers import run_config``)."""

from __future__ import annotations


def run_config(model, meta, out, *extra):
    """A small CPU run config (fp32, constant lr, no dropout) with dotted overrides."""
    from mpo.config import load_config
    from mpo.train.config import RunConfig

    overrides = [f"model.path={model}", f"data.meta_path={meta}", f"train.output_dir={out}",
                 "data.max_length=512", "data.max_dynamic_patch=1", "train.learning_rate=1e-3",
                 "train.lr_scheduler=constant", "train.warmup_steps=0", "train.warmup_ratio=0", "train.per_device_batch_size=4",
                 "train.logging_steps=1", "train.save_steps=0", "train.max_steps=3", *extra]
    return load_config(RunConfig, None, overrides)
