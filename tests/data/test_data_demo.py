"""``mpo data demo``: determinism, layout, disjoint held-out images, one-word pairs, labels that match pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mpo.cli import app
from mpo.data import COLOURS, demo_corpus, read_meta, run_check, write_demo


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    write_demo(out, n=100, n_heldout=20, seed=0)  # default n_prompts (32)
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(demo, tmp_path):
    again = write_demo(tmp_path / "again", n=100, n_heldout=20, seed=0)["root"]
    other = write_demo(tmp_path / "other", n=100, n_heldout=20, seed=1)["root"]
    assert _files(again) == _files(demo)
    assert _files(other).keys() == _files(demo).keys() and _files(other) != _files(demo)


def test_layout_split_and_counts(demo):
    """100 pairs: 60 % shape_colour, 25 % pair_colour, 15 % text_arith; 20 per held-out subset; 32 prompts."""
    train = {s.name: s for s in read_meta(demo / "meta.json")}
    heldout = {s.name: s for s in read_meta(demo / "meta_heldout.json")}
    assert {k: s.length for k, s in train.items()} == {"shape_colour": 60, "pair_colour": 25, "text_arith": 15}
    assert {k: s.length for k, s in heldout.items()} == {"shape_colour": 20, "pair_colour": 20, "text_arith": 20}
    assert all(s.root == demo / "images" for s in [*train.values(), *heldout.values()])
    report = run_check(demo / "meta.json", progress=False)
    assert report.exit_code == 0
    assert [dict(d.modalities) for d in report.datasets] == [{"single": 60}, {"multi": 25}, {"text": 15}]
    assert run_check(demo / "meta_heldout.json", progress=False).exit_code == 0
    correctness, ntp = _jsonl(demo / "prompts/correctness.jsonl"), _jsonl(demo / "prompts/dropout_ntp.jsonl")
    assert len(correctness) == len(ntp) == 32
    assert set(correctness[0]) == {"image", "question", "answer"} and set(ntp[0]) == {"image", "question", "chosen"}
    assert set(correctness[-1]) == {"question", "answer"}  # the text prompts come last and have no image
    assert all((demo / "images" / r["image"]).is_file() for r in correctness if isinstance(r.get("image"), str))


def _all_rows(demo: Path) -> list[dict]:
    return [row for path in sorted(demo.glob("annotations/**/*.jsonl")) for row in _jsonl(path)]


def test_chosen_and_rejected_differ_in_exactly_one_word(demo):
    for row in _all_rows(demo):
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected)
        diff = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c != r]
        assert len(diff) == 1, row
        if row["task"] != "text_arith":
            assert {w.rstrip(".") for w in diff[0]} <= set(COLOURS) and diff[0][0].rstrip(".") == row["answer"]


def test_heldout_images_are_disjoint_from_training(demo):
    def digests(folder: str) -> set[str]:
        return {hashlib.sha256(Image.open(p).tobytes()).hexdigest() for p in (demo / "images" / folder).glob("*.png")}

    train, heldout, prompts = digests("train"), digests("heldout"), digests("prompts")
    assert len(train) == 60 + 2 * 25 and len(heldout) == 20 + 2 * 20  # no pixel-identical image within a split
    assert not train & heldout and not train & prompts and not heldout & prompts


def test_heldout_text_questions_are_new(demo):
    train = {r["question"] for r in _jsonl(demo / "annotations/text_arith.jsonl")}
    heldout = {r["question"] for r in _jsonl(demo / "annotations/heldout/text_arith.jsonl")}
    assert not train & heldout


def test_the_answer_is_the_colour_in_the_pixels(demo):
    """Every image holds its answer's exact RGB value and no other colour of the palette."""
    for row in _all_rows(demo):
        images = row.get("image") or []
        for rel in [images] if isinstance(images, str) else images:
            pixels = np.asarray(Image.open(demo / "images" / rel).convert("RGB")).reshape(-1, 3)
            present = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(axis=1).any()}
            assert present == {row["answer"]}, (rel, present)


def test_wrong_colours_are_spread_over_the_other_five(demo):
    """The text must not give the answer away: every colour shows up as a right and as a wrong answer."""
    rows = [r for r in _all_rows(demo) if r["task"] != "text_arith"]
    right = {r["answer"] for r in rows}
    wrong = {r["rejected"].split()[-1].rstrip(".") for r in rows}
    assert right == wrong == set(COLOURS)


def test_corpus_holds_every_colour_and_no_placeholder(demo):
    corpus = demo_corpus(demo)
    words = {w.strip(".?,") for text in corpus for w in text.split()}
    assert set(COLOURS) <= words and not any("<image>" in t for t in corpus)


def test_refuses_to_replace_a_folder_that_is_not_a_demo(tmp_path, demo):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as err:
        write_demo(tmp_path / "mine", n=10)
    assert str(err.value) == f"{tmp_path / 'mine'} exists and is not an mpo demo folder (no .mpo-demo); choose a new path"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_demo_replaces_an_earlier_demo(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    assert runner.invoke(app, ["data", "demo", str(out), "--n", "20", "--n-heldout", "2"]).exit_code == 0
    (out / "stale.txt").write_text("from before")
    result = runner.invoke(app, ["data", "demo", str(out), "--n", "10", "--n-heldout", "2", "--seed", "3"])
    assert result.exit_code == 0 and result.output.splitlines()[1] == f"meta: {out / 'meta.json'}"
    assert not (out / "stale.txt").exists() and read_meta(out / "meta.json")[0].length == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert runner.invoke(app, ["data", "demo", str(tmp_path / "other")]).exit_code == 2


def test_cli_demo_keeps_a_users_folder_named_like_the_old_copy(tmp_path):
    """The earlier demo used to be moved to ``.NAME.old``, after deleting any folder of that name."""
    runner = CliRunner()
    out = tmp_path / "mydata"
    assert runner.invoke(app, ["data", "demo", str(out), "--n", "10", "--n-heldout", "1"]).exit_code == 0
    (tmp_path / ".mydata.old").mkdir()
    (tmp_path / ".mydata.old" / "keep.txt").write_text("keep me")
    assert runner.invoke(app, ["data", "demo", str(out), "--n", "10", "--n-heldout", "1"]).exit_code == 0
    assert (tmp_path / ".mydata.old" / "keep.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mydata.old", "mydata"]


def test_cli_demo_through_a_link_replaces_the_demo_it_points_to(tmp_path):
    """A link to an earlier demo used to fail (rmtree on a symbolic link) and leave ``.link_demo.old`` behind."""
    runner = CliRunner()
    args = ["--n", "10", "--n-heldout", "1"]
    assert runner.invoke(app, ["data", "demo", str(tmp_path / "d1"), *args]).exit_code == 0
    (tmp_path / "link_demo").symlink_to(tmp_path / "d1")
    for seed in ("1", "2"):  # twice: the first run leaves nothing that breaks the next one
        result = runner.invoke(app, ["data", "demo", str(tmp_path / "link_demo"), *args, "--seed", seed])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "link_demo").is_symlink() and (tmp_path / "d1" / ".mpo-demo").is_file()
    assert _files(tmp_path / "d1") == _files(write_demo(tmp_path / "fresh", n=10, n_heldout=1, seed=2)["root"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1", "fresh", "link_demo"]


@pytest.mark.parametrize(("out", "message"), [
    ("afile", "afile: exists and is not a folder; choose another path"),
    (".", ".: is the current folder or one above it; name a new folder instead"),
])
def test_cli_demo_refuses_a_file_or_the_current_folder_in_one_line(tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    result = CliRunner().invoke(app, ["data", "demo", out, "--n", "10", "--n-heldout", "1"])
    assert (result.exit_code, result.output) == (2, message + "\n")
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
