"""mpo eval (per-dataset accuracies, reference from the run) and a short mpo demo end to end."""

from __future__ import annotations

import json

import pytest
from train_helpers import run_config
from typer.testing import CliRunner

from mpo.cli import app
from mpo.train.evaluate import resolve_run_model, run_eval
from mpo.train.recipe import run_train


def test_eval_counts_every_heldout_pair(demo_model, demo_data):
    report = run_eval(str(demo_model), str(demo_data / "meta_heldout.json"), max_length=512, max_dynamic_patch=1)
    sizes = {name: sum(1 for line in (demo_data / "annotations" / "heldout" / f"{name}.jsonl").read_text().splitlines()
                       if line.strip()) for name in report.datasets}
    assert {k: v["pairs"] for k, v in report.datasets.items()} == sizes
    assert report.overall["pairs"] == sum(sizes.values())
    assert 0.0 <= report.overall["logp_accuracy"] <= 1.0
    assert "reward_accuracy" not in report.overall  # no reference: a plain model folder records none


def test_reference_equal_to_model_gives_zero_margins(demo_model, demo_data):
    report = run_eval(str(demo_model), str(demo_data / "meta_heldout.json"), reference=str(demo_model),
                      max_length=512, max_dynamic_patch=1)
    assert report.overall["mean_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert report.overall["reward_accuracy"] == 0.0  # ties are not wins


def test_eval_on_a_run_folder_uses_the_recorded_base_model(demo_model, demo_data, tmp_path):
    run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.max_steps=2"))
    model, ref = resolve_run_model(tmp_path / "run")
    assert model == str(tmp_path / "run" / "final") and ref == str(demo_model)
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run"), "--meta",
                                      str(demo_data / "meta_heldout.json"), "--max-length", "512",
                                      "--max-dynamic-patch", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["reference"] == str(demo_model)
    assert set(data["datasets"]) == {"shape_colour", "pair_colour", "text_arith"}
    assert "reward_accuracy" in data["overall"]


def test_demo_end_to_end_small(tmp_path):
    from mpo.train.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, n_pairs=96, n_heldout=8)
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "heldout_accuracy_blank_images",
                "train_seconds", "steps", "per_task"):
        assert key in summary
    assert summary["steps"] == 2
    assert (tmp_path / "demo" / "report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 2
    (tmp_path / "demo" / "tiny-internvl" / "mpo_tiny.json").unlink()  # as a demo from before the marker
    run_demo(tmp_path / "demo", steps=1, n_pairs=96, n_heldout=8)  # again into the same folder: trained anew
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 1


def test_demo_refuses_folders_it_did_not_write(tmp_path):
    """A run folder or model folder that is not the demo's own is never deleted (exit 2, one line)."""
    out = tmp_path / "proj"
    (out / "run" / "checkpoint-500").mkdir(parents=True)
    (out / "run" / "checkpoint-500" / "trainer_state.json").write_text("state")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 2
    assert result.output.endswith(f"{out / 'run'}: exists and is not an earlier demo run (its config.yaml does not "
                                  f"train {out / 'tiny-internvl'}); refusing to replace it: choose another --out\n")
    assert (out / "run" / "checkpoint-500" / "trainer_state.json").read_text() == "state"
    (out / "run").rename(tmp_path / "kept_run")
    (out / "tiny-internvl").mkdir()
    (out / "tiny-internvl" / "weights.bin").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 2 and "tiny-internvl: exists and is not a model folder" in result.output
    assert (out / "tiny-internvl" / "weights.bin").read_text() == "mine"


def test_eval_table_says_how_many_rows_were_skipped_and_why(tiny_qwen2_dir, demo_data):
    """A text-only model on image data: the image rows cannot be scored. The table listed only the scored pairs
    and gave no sign of the others; it now has a skipped column (a dataset with no scored pair stays in it) and the
    first reasons."""
    report = run_eval(str(tiny_qwen2_dir), str(demo_data / "meta.json"), max_length=512, max_dynamic_patch=1)
    assert {name: (d["pairs"], d["skipped"]) for name, d in report.datasets.items()} == {
        "shape_colour": (0, 57), "pair_colour": (0, 24), "text_arith": (15, 0)}
    assert report.overall["pairs"] == 15 and report.overall["skipped"] == 81 == len(report.skipped_rows)
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["dataset", "pairs", "skipped"]
    assert "81 rows skipped, e.g.:" in table and "the model is text-only" in table
    # no scored pair: no accuracy (it read 0.0000, as if every pair had been lost)
    assert report.datasets["shape_colour"]["logp_accuracy"] is None
    assert report.datasets["shape_colour"]["mean_logp_margin"] is None
    assert table.splitlines()[1].split()[:4] == ["shape_colour", "0", "57", "-"]
    assert report.datasets["text_arith"]["logp_accuracy"] is not None


def test_a_run_started_with_relative_paths_is_evaluated_from_anywhere(demo_model, demo_data, tmp_path, monkeypatch):
    """config.yaml records paths that exist as absolute ones: `mpo eval RUN` from another folder found no base
    model (or, worse, another folder of the same name) for the reference."""
    import os
    import shutil

    shutil.copytree(demo_model, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    run_train(run_config("base", demo_data / "meta.json", "run", "train.max_steps=1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, reference = resolve_run_model(tmp_path / "run")
    assert (model, reference) == (str(tmp_path / "run" / "final"), str(tmp_path / "base"))
    assert os.path.isabs(reference)


def test_eval_of_a_run_uses_the_runs_beta(demo_model, demo_data, tmp_path):
    """The reward margin is β times the log-ratio margin: eval took β 0.1 whatever the run trained with."""
    run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.max_steps=2", "loss.beta=0.5"))
    kw = dict(max_length=512, max_dynamic_patch=1)
    own = run_eval(str(tmp_path / "run"), str(demo_data / "meta_heldout.json"), **kw)
    tenth = run_eval(str(tmp_path / "run"), str(demo_data / "meta_heldout.json"), beta=0.1, **kw)
    assert own.overall["mean_reward_margin"] == pytest.approx(5 * tenth.overall["mean_reward_margin"], rel=1e-6)
    assert tenth.overall["mean_reward_margin"] != 0.0


def test_eval_of_a_run_encodes_pairs_as_the_run_did(demo_model, demo_data, tmp_path):
    """The run trained with 1 tile and max_length 60 (the demo's pairs have 33-86 tokens): eval of the run takes
    both from its config, as it takes β and the system prompt. It used 12 tiles and 16384 tokens unless told, so it
    scored pairs that training had dropped as too long."""
    run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.max_steps=1",
                         "data.max_length=60"))
    heldout = str(demo_data / "meta_heldout.json")
    own = run_eval(str(tmp_path / "run"), heldout)
    same = run_eval(str(tmp_path / "run"), heldout, max_length=60, max_dynamic_patch=1)
    other = run_eval(str(tmp_path / "run"), heldout, max_length=16384, max_dynamic_patch=12)
    assert own.overall == same.overall
    assert 0 < own.overall["pairs"] < other.overall["pairs"]


def test_a_model_folder_beside_some_config_yaml_is_no_run(demo_model, tmp_path):
    """A model in proj/my_model next to an unrelated proj/config.yaml was taken for a run's final/: eval read its
    reference, β and lengths from that file (a list there crashed). Only a run folder, RUN/final and
    RUN/checkpoint-N/model count."""
    import shutil

    from mpo.train.evaluate import resolve_run_model

    proj = tmp_path / "proj"
    shutil.copytree(demo_model, proj / "my_model")
    (proj / "config.yaml").write_text("model: {path: /elsewhere}\n")
    assert resolve_run_model(proj / "my_model") == (str(proj / "my_model"), None)
    (proj / "config.yaml").write_text("- a list\n")
    assert resolve_run_model(proj / "my_model") == (str(proj / "my_model"), None)
    shutil.copytree(demo_model, proj / "checkpoint-3" / "model")
    (proj / "checkpoint-3" / "config.yaml").write_text("model: {path: /base}\n")
    assert resolve_run_model(proj / "checkpoint-3" / "model") == (str(proj / "checkpoint-3" / "model"), "/base")
