"""``load_config``: a config file that cannot be read is a ConfigError naming the file, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mpo.cli import app
from mpo.config import ConfigError, load_config
from mpo.train.config import RunConfig


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"train:\n  learning_rate: 1e-6\n\xff\xfe")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 0xff at offset 29); save the config as UTF-8"


def test_mpo_train_reports_a_config_that_is_not_utf8_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    result = CliRunner().invoke(app, ["train", "bin.yaml"])
    assert (result.exit_code, result.output) == (
        2, "error: bin.yaml: not UTF-8 text (byte 0xff at offset 0); save the config as UTF-8\n")


def test_an_unreadable_config_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("train: {}\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_text", denied)  # chmod 000 does not stop root, who runs CI
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"{path}: cannot read it: Permission denied"
