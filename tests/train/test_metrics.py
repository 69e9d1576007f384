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
