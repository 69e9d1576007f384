"""``mpo generate``: an output never replaces the prompt file, and an ``--out-dir`` that is a file is one error line.

Both are refused before anything is written and before any model is loaded; the error is one ``error:`` line on
stderr with exit code 2.
"""

from __future__ import annotations

import json
import os

import pytest
from gen_fakes import FakeSampler, write_jsonl
from typer.testing import CliRunner

from mpo.cli import app
from mpo.generate import sharding
from mpo.generate.dropout_ntp import DropoutNTPConfig, run_dropout_ntp

ROWS = [{"question": "What colour is the sky?", "answer": "blue", "chosen": "The sky is blue on a clear day."},
        {"question": "What colour is grass?", "answer": "green", "chosen": "Grass is green in spring and summer."}]


@pytest.fixture()
def ckpt(tmp_path):
    """A folder that passes the CLI's checkpoint check (a config.json); loading it would fail, and must not
    happen: ``build_sampler`` is replaced by a function that fails the test."""
    path = tmp_path / "ckpt" / "tiny"
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    return path


@pytest.fixture()
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sharding, "build_sampler", load)


def _generate(command, *args):
    return CliRunner().invoke(app, ["generate", command, *map(str, args), "--no-progress", "--num-workers", "0"],
                              env={"COLUMNS": "300"})


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_checkpoint_dot_does_not_replace_the_prompt_file(tmp_path, monkeypatch):
    """The audit's repro: from inside the model folder, ``--checkpoint . --out-dir <the prompt's folder>``: the
    output was ``<out-dir>/<prompt basename>``, the prompt file itself, and the merge replaced it."""
    prompts = tmp_path / "pd" / "dropout_ntp.jsonl"
    write_jsonl(prompts, ROWS)
    before = prompts.read_bytes()
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    monkeypatch.chdir(model)
    cfg = DropoutNTPConfig(checkpoint=".", prompt_path=str(prompts), out_dir=str(tmp_path / "pd"), progress=False,
                           num_workers=0)
    result = run_dropout_ntp(cfg, FakeSampler(), env={})
    assert result.output == tmp_path / "pd" / "models_tiny" / "dropout_ntp.jsonl"
    assert prompts.read_bytes() == before
    assert len(result.output.read_text().splitlines()) == 2


def test_a_checkpoint_at_the_root_has_no_name_and_is_refused(tmp_path):
    """``--checkpoint /`` still has no folder name: its output would go straight into ``--out-dir``."""
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, ROWS)
    cfg = DropoutNTPConfig(checkpoint="/", prompt_path=str(prompts), out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError) as err:
        run_dropout_ntp(cfg, FakeSampler(), env={})
    assert str(err.value) == ("--checkpoint /: the filesystem root has no name to name the output folder after; "
                              "move the model into a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, subdir", [("dropout-ntp", ""), ("correctness", "max_tiles_6")])
@pytest.mark.parametrize("via_link", [None, os.symlink, os.link], ids=["direct", "symlink", "hardlink"])
def test_an_output_that_is_the_prompt_file_is_refused_before_anything_is_written(tmp_path, ckpt, no_model, command,
                                                                                 subdir, via_link):
    """The prompt file lies where the output goes (here: ``<out>/ckpt_tiny[/max_tiles_6]/p.jsonl``), also when
    ``--prompt-path`` names it through a symbolic or a hard link: one line naming both paths, exit 2, no file
    touched."""
    out = tmp_path / "out"
    prompts = out / "ckpt_tiny" / subdir / "p.jsonl"
    write_jsonl(prompts, ROWS)
    before, listing = prompts.read_bytes(), _files(tmp_path)
    given = prompts
    if via_link:
        given = tmp_path / "elsewhere" / "p.jsonl"
        given.parent.mkdir()
        via_link(prompts, given)
        listing = _files(tmp_path)
    result = _generate(command, "--checkpoint", ckpt, "--prompt-path", given, "--out-dir", out)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --out-dir {out}: the output {prompts} is the input file {given} "
                             "(--prompt-path); writing it would replace the input: use another --out-dir\n")
    assert prompts.read_bytes() == before and _files(tmp_path) == listing


@pytest.mark.parametrize("command, subdir", [("dropout-ntp", ""), ("correctness", "max_tiles_6")])
@pytest.mark.parametrize("where", ["out-dir", "model folder"])
def test_a_file_where_the_output_folder_goes_is_one_error_line(tmp_path, ckpt, no_model, command, subdir, where):
    """``--out-dir afile`` (or a file named like the model folder inside it) raised NotADirectoryError with a
    traceback, after the model was loaded; now one line with exit code 2, before anything is written."""
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, ROWS)
    out = tmp_path / "afile"
    if where == "out-dir":
        out.write_text("not a folder\n")
        blocker = out
    else:
        out.mkdir()
        blocker = out / "ckpt_tiny"
        blocker.write_text("not a folder\n")
    listing = _files(tmp_path)
    result = _generate(command, "--checkpoint", ckpt, "--prompt-path", prompts, "--out-dir", out)
    final = out / "ckpt_tiny" / subdir / "p.jsonl"
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --out-dir {out}: {blocker} is a file, not a folder, so {final} cannot be "
                             "written; use another --out-dir\n")
    assert "Traceback" not in result.output and _files(tmp_path) == listing
    assert blocker.read_text() == "not a folder\n"


def test_dropout_ntp_reruns_may_change_the_tiling_flags_which_it_ignores(tmp_path):
    """``--dynamic``/``--max-num`` do nothing for DropoutNTP (no image is sent) but were part of its settings,
    so a rerun that changed them was refused (``dynamic: this output was started with False, now True``). An
    output started by that code, whose settings file holds them, must resume too."""
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, ROWS)

    def cfg(**kw):
        return DropoutNTPConfig(checkpoint="org/tiny", prompt_path=str(prompts), out_dir=str(tmp_path / "out"),
                                progress=False, num_workers=0, **kw)

    first = run_dropout_ntp(cfg(), FakeSampler(), env={})
    settings = first.output.parent / "parts" / "p.jsonl.settings.json"
    recorded = json.loads(settings.read_text())
    assert "dynamic" not in recorded and "max_num" not in recorded
    settings.write_text(json.dumps({**recorded, "dynamic": False, "max_num": 6}))  # as the old code wrote it
    again = run_dropout_ntp(cfg(dynamic=True, max_num=12, num_return_sequences=2), FakeSampler(), env={})
    assert again.generated == 2 and len(again.output.read_text().splitlines()) == 4
    assert json.loads(settings.read_text()) == recorded  # rewritten without them when the new samples began
    with pytest.raises(sharding.ResumeError, match="temperature: this output was started with 0.7, now 1.0"):
        run_dropout_ntp(cfg(temperature=1.0), FakeSampler(), env={})  # what does change a sample still binds


def test_correctness_still_binds_the_tiling_flags(tmp_path):
    """Correctness sends the images, so ``--dynamic`` changes its samples and stays part of its settings."""
    from mpo.generate.correctness import CorrectnessConfig, run_correctness

    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, ROWS)
    base = dict(checkpoint="org/tiny", prompt_path=str(prompts), out_dir=str(tmp_path / "out"), progress=False,
                num_workers=0, num_return_sequences=1)
    run_correctness(CorrectnessConfig(**base), FakeSampler(), env={})
    with pytest.raises(sharding.ResumeError, match="dynamic: this output was started with False, now True"):
        run_correctness(CorrectnessConfig(**base, dynamic=True), FakeSampler(), env={})


def test_an_output_started_before_the_system_prompt_setting_resumes_with_none(tmp_path):
    """Settings written before ``--system-prompt`` existed hold no ``system_prompt``: those samples were drawn without
    a system turn of ours, so ``--system-prompt none`` continues them and ``auto`` (InternVL's line) is refused."""
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, ROWS)

    def cfg(**kw):
        return DropoutNTPConfig(checkpoint="org/tiny", prompt_path=str(prompts), out_dir=str(tmp_path / "out"),
                                progress=False, num_workers=0, **kw)

    first = run_dropout_ntp(cfg(system_prompt="none"), FakeSampler(), env={})
    settings = first.output.parent / "parts" / "p.jsonl.settings.json"
    recorded = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in recorded.items() if k != "system_prompt"}))  # the old code's
    with pytest.raises(sharding.ResumeError, match="system_prompt: this output was started with 'none', now 'auto'"):
        run_dropout_ntp(cfg(num_return_sequences=2), FakeSampler(), env={})
    again = run_dropout_ntp(cfg(system_prompt="none", num_return_sequences=2), FakeSampler(), env={})
    assert again.generated == 2
