"""``mpo models tiny`` and ``mpo models info``: the CLI calls mpo.models and reports errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mpo.cli import app
from mpo.models import load_processor

runner = CliRunner()


def test_tiny_with_corpus_then_info(tmp_path):
    (tmp_path / "words.txt").write_text("The quokka smiles.\n" * 40)
    out = tmp_path / "tiny-text"
    result = runner.invoke(app, ["models", "tiny", str(out), "--arch", "qwen2", "--corpus", str(tmp_path / "words.txt"),
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # the path alone, library logs go to stderr
    assert load_processor(out).tokenize(" quokka") == ["Ġquokka"]
    result = runner.invoke(app, ["models", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["family"], info["architecture"], info["chat_template"]) == ("text", "Qwen2ForCausalLM", True)


def test_info_text_output(tiny_internvl_dir):
    result = runner.invoke(app, ["models", "info", str(tiny_internvl_dir)])
    assert result.exit_code == 0, result.output
    assert "family: internvl\n" in result.output and "image_tokens_per_tile: 16\n" in result.output


def test_errors_exit_2(tmp_path):
    result = runner.invoke(app, ["models", "tiny", str(tmp_path / "m"), "--arch", "llava"])
    assert (result.exit_code, result.output) == (2, "arch must be one of internvl, qwen2_5_vl, qwen2, got 'llava'\n")
    result = runner.invoke(app, ["models", "info", str(tmp_path / "missing")])
    assert (result.exit_code, result.output) == (2, f"{tmp_path / 'missing'}: no such model folder\n")


@pytest.mark.parametrize(("out", "message"), [
    ("afile", "afile: exists and is not a folder; choose another path"),
    (".", ".: is the current folder or one above it; name a new folder instead"),
])
def test_tiny_refuses_a_file_or_the_current_folder_before_building(tmp_path, monkeypatch, out, message):
    """``.`` used to fail only after the whole model was built, with ``PosixPath('.') has an empty name``."""
    from mpo.models import tiny

    def no_build(*args):
        raise AssertionError("the model was built before the folder was checked")

    monkeypatch.setitem(tiny._BUILDERS, "internvl", no_build)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    result = runner.invoke(app, ["models", "tiny", out])
    assert (result.exit_code, result.output) == (2, message + "\n")
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
