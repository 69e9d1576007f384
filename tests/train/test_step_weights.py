"""A step's gradient is the mean over the pairs it could use: rows dropped as bad do not shrink it."""

from __future__ import annotations

import json

from train_helpers import run_config

from mpo.train.recipe import run_train


def _meta(tmp_path, demo_data, name: str, lines: list[str]):
    full = json.loads((demo_data / "meta.json").read_text())["shape_colour"]
    (tmp_path / f"{name}.jsonl").write_text("".join(x + "\n" for x in lines))
    meta = tmp_path / f"{name}_meta.json"
    meta.write_text(json.dumps({"shape_colour": {**full, "root": str(demo_data / full["root"]),
                                                 "annotation": str(tmp_path / f"{name}.jsonl"), "length": len(lines)}}))
    return meta


def _first_step(tmp_path, model, meta, name: str, accumulation: int) -> dict:
    run_train(run_config(model, meta, tmp_path / name, "train.per_device_batch_size=1", "train.max_steps=1",
                         f"train.gradient_accumulation_steps={accumulation}", "loss.loss_types=[sigmoid,sft]",
                         "loss.loss_weights=[0.8,1.0]"))
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


def test_dropped_rows_do_not_scale_the_step_gradient(demo_model, demo_data, tmp_path):
    """Two good rows and two broken ones in a step of 4 micro-batches give the gradient of the two good rows alone
    in a step of 2 (the seed replaced bad rows by random ones, so its steps always held 256 pairs; mpo dropped them
    and divided by 4 anyway: the step's gradient was half as large, grad_norm 3.6 against 7.2)."""
    good = (demo_data / "annotations" / "shape_colour.jsonl").read_text().splitlines()[:2]
    with_bad = _first_step(tmp_path, demo_model, _meta(tmp_path, demo_data, "with_bad",
                                                       [good[0], "{broken", good[1], "{broken"]), "a", 4)
    only_good = _first_step(tmp_path, demo_model, _meta(tmp_path, demo_data, "only_good", good), "b", 2)
    assert with_bad["skipped_rows"] == 2 and only_good["skipped_rows"] == 0
    assert abs(with_bad["grad_norm"] - only_good["grad_norm"]) < 1e-5 * only_good["grad_norm"]
    assert abs(with_bad["loss"] - only_good["loss"]) < 1e-5
