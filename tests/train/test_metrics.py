"""``MetricsLogger``: a ``train.report_to`` backend that is not installed is a one-line ConfigError."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mpo.config import ConfigError
from mpo.train.metrics import MetricsLogger


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_backend_that_is_not_installed_names_the_key(tmp_path, monkeypatch, backend):
    """Every preset sets ``report_to: [tensorboard]``: without it installed, the run used to stop on a
    ModuleNotFoundError traceback. ``None`` in sys.modules makes an import fail as if the package were absent
    (torch.utils.tensorboard too, which an earlier test may have imported already)."""
    for name in ("tensorboard", "torch.utils.tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError) as err:
        MetricsLogger(tmp_path, [backend])
    assert str(err.value) == f"train.report_to: {backend} is not installed (pip install {backend})"


def test_an_unknown_backend_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        MetricsLogger(tmp_path, ["mlflow"])
    assert str(err.value) == "train.report_to: unknown backend 'mlflow' (tensorboard, wandb)"


def test_tensorboard_is_installed_with_mpo(tmp_path):
    """A base dependency, not only a test extra: every preset uses it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("tensorboard") for r in project["dependencies"])
    logger = MetricsLogger(tmp_path, ["tensorboard"])
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert any((tmp_path / "tensorboard").iterdir())


def _rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_log_line_is_the_mean_of_its_steps_and_the_lr_they_used(demo_model, demo_data, tmp_path):
    """``logging_steps: 2`` logs the mean of steps 1-2 and 3-4 (it logged step 2 and 4 alone, as if the other
    steps had not happened); ``lr`` is the rate the step used, as HF's Trainer logs it (it was the next step's:
    cosine with 2 warm-up steps logged 5e-4, 1e-3, 5e-4, 0 for the rates 0, 5e-4, 1e-3, 5e-4)."""
    from train_helpers import run_config

    from mpo.train.recipe import run_train

    meta = demo_data / "meta.json"
    common = ["train.max_steps=4", "train.lr_scheduler=cosine", "train.warmup_steps=2"]
    run_train(run_config(demo_model, meta, tmp_path / "each", *common))
    run_train(run_config(demo_model, meta, tmp_path / "pairs", *common, "train.logging_steps=2"))
    each, pairs = _rows(tmp_path / "each"), _rows(tmp_path / "pairs")
    assert [r["lr"] for r in each] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-12)
    assert [r["step"] for r in pairs] == [2, 4] and [r["lr"] for r in pairs] == [each[1]["lr"], each[3]["lr"]]
    for window, (a, b) in zip(pairs, [(each[0], each[1]), (each[2], each[3])]):
        for key in ("loss", "loss/sft", "rewards/accuracies", "rewards/margins"):  # 4 pairs in every step
            assert window[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-9), key
        assert (window["grad_norm"], window["delta"]) == (b["grad_norm"], b["delta"])  # the last step's, as HF


def test_a_run_resumed_inside_a_log_window_logs_the_mean_of_all_its_steps(demo_model, demo_data, tmp_path):
    """logging_steps 3, killed after checkpoint-2 (step 3 ran, its checkpoint did not land), resumed: the step-3
    line is the mean of steps 1-3, as in the uninterrupted run. The open window was not in the checkpoint, so it
    was step 3 alone, and steps 1-2 appeared in no line."""
    import shutil

    from train_helpers import run_config

    from mpo.train.recipe import run_train

    meta, common = demo_data / "meta.json", ["train.logging_steps=3", "train.save_steps=2"]
    run_train(run_config(demo_model, meta, tmp_path / "a", "train.max_steps=4", *common))
    run_train(run_config(demo_model, meta, tmp_path / "b", "train.max_steps=3", *common))
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")  # the kill: resume starts at 2 and cuts the step-3 line
    run_train(run_config(demo_model, meta, tmp_path / "b", "train.max_steps=4", *common), resume=True)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 4]
    for key in ("loss", "rewards/accuracies", "logps/chosen"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-12), key
