"""What a pair row of ``mpo postprocess correctness`` says about how its answers were sampled, and a ``--data-dir``
that holds no Stage-1 file.

* A pair's ``question`` is the prompt the responses were sampled with (the seed's choice), not the original
  question: that one may end in a short-answer instruction that Stage 1 cut, which contradicts a step-by-step
  ``chosen`` answer. The original stays in the row as ``question_orig``.
* A row's own ``system_prompt`` goes with its pairs and its ``neg_items`` row, and responses sampled under
  different system prompts (or prompts) are never paired with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_postprocess import box, read_jsonl, rec, write_stage1
from typer.testing import CliRunner

from mpo.cli.postprocess import app
from mpo.generate.postprocess import output_paths
from mpo.generate.prompts import place_image_markers, wrap_question

SHORT = "What colour is the car?\nAnswer the question using a single word or phrase."


def _cli(data_dir: Path, save_dir: Path):
    return CliRunner().invoke(app, ["correctness", "--data-dir", str(data_dir), "--save-dir", str(save_dir),
                                    "--workers", "1"])


def _stage1(question: str, answer: str, response: str, image: str | None = None, **fields) -> dict:
    """A Stage-1 record as ``mpo generate correctness`` writes it: the real en_v2 wrapping of the question."""
    record = rec(question, answer, response, image)
    record["question"] = place_image_markers(wrap_question(question, "en_v2"), 1 if image else 0)
    return {**record, **fields}


def test_pair_question_is_the_sampled_prompt_without_the_short_answer_instruction(tmp_path: Path) -> None:
    """The pair used ``question_orig``, which still said "Answer the question using a single word or phrase."
    while ``chosen`` is a long step-by-step answer ending in a box: contradictory training data."""
    records = [_stage1(SHORT, "red", box("red"), "car.png"), _stage1(SHORT, "red", box("blue"), "car.png")]
    write_stage1(tmp_path / "data", "cars", records, bad=False)
    assert _cli(tmp_path / "data", tmp_path / "out").exit_code == 0
    [row] = read_jsonl(output_paths(tmp_path / "out", "cars")["correctness"])
    assert row["question"] == records[0]["question"]
    assert row["question"].startswith("<image>\nWhat colour is the car?\nAnswer the preceding question.")
    assert "single word" not in row["question"]
    assert row["question_orig"] == SHORT and (row["chosen"], row["rejected"]) == (box("red"), box("blue"))


def test_system_prompt_goes_with_its_pairs_and_answers_under_two_are_never_paired(tmp_path: Path) -> None:
    """Stage 1 samples a row under its own ``system_prompt``; the pair dropped it, so training rendered it with the
    default system line. Two rows may ask the same question under two system prompts (the prompt file keeps both:
    they are two items): a right answer under one and a wrong one under the other are no pair."""
    terse, pirate = "Be terse.", "Answer like a pirate."
    records = [
        _stage1("How many apples?", "12", box("12"), system_prompt=terse),
        _stage1("How many apples?", "12", box("13"), system_prompt=terse),
        _stage1("How many apples?", "12", box("14"), system_prompt=pirate),  # wrong, and never right
        _stage1("How many apples?", "12", box("15")),  # no system prompt of its own: a third group
        _stage1("How many apples?", "12", box("12.0")),
    ]
    write_stage1(tmp_path / "data", "apples", records, bad=False)
    assert _cli(tmp_path / "data", tmp_path / "out").exit_code == 0
    out = output_paths(tmp_path / "out", "apples")
    pairs = read_jsonl(out["correctness"])
    assert [(p.get("system_prompt"), p["chosen"], p["rejected"]) for p in pairs] == [
        (None, box("12.0"), box("15")), (terse, box("12"), box("13"))]
    assert "system_prompt" not in pairs[0]  # a row without one renders with the run's default, as it was sampled
    assert read_jsonl(out["neg_items"]) == [{"question": "How many apples?", "answer": "12", "system_prompt": pirate}]


def test_a_data_dir_without_stage1_files_is_an_error_that_names_the_folders_below(tmp_path: Path) -> None:
    """The seed README passes the sampling --out-dir, whose files are in <out-dir>/<model>/max_tiles_<N>/: the
    run printed a warning, wrote nothing and exited 0, so a script went on with no pairs."""
    out_dir = tmp_path / "sampled"
    tiles = out_dir / "org_model" / "max_tiles_6"
    write_stage1(tiles, "geoqa")
    (tiles / "parts").mkdir()
    (tiles / "parts" / "geoqa.jsonl.rank0-of-1.jsonl").write_text("{}\n")  # Stage 1's bookkeeping: no dataset
    save = tmp_path / "pairs"
    result = _cli(out_dir, save)
    assert result.exit_code == 2
    assert result.output == (f"error: --data-dir {out_dir}: no *.jsonl files in it (Stage-1 files must lie directly "
                             f"in the folder); did you mean {tiles}?\n")
    assert not save.exists()
    write_stage1(out_dir / "org_model" / "max_tiles_12", "geoqa")
    result = _cli(out_dir, save)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.endswith(f"did you mean one of {out_dir / 'org_model' / 'max_tiles_12'}, {tiles}? (one run "
                                  "per folder, e.g. one per tile setting)\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli(empty, save)
    assert result.exit_code == 2
    assert result.output == (f"error: --data-dir {empty}: no *.jsonl files in it (Stage-1 files must lie directly in "
                             "the folder), nor in its sub-folders (3 levels deep); pass the folder that mpo generate "
                             "correctness wrote, <out-dir>/<model>/max_tiles_<N>\n")
    assert _cli(tiles, save).exit_code == 0 and json.loads((save / "manifest.json").read_text())["datasets"]
