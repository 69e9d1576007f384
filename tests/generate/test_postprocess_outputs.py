"""``mpo postprocess correctness`` never writes over a file it did not write, and writes every malformed line aside.

Refusals (exit code 2, one ``error:`` line, nothing written): an output path that is an input file (even with
``--overwrite``), an existing output that ``manifest.json`` does not list (unless ``--overwrite``), and a
``--save-dir`` that is a regular file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from test_postprocess import RECORDS, box, read_jsonl, rec, write_stage1
from typer.testing import CliRunner

from mpo.cli.postprocess import app
from mpo.generate import postprocess
from mpo.generate.postprocess import PostprocessConfig, output_paths, run_postprocess


def _cli(data_dir: Path, save_dir: Path, *extra: str):
    return CliRunner().invoke(app, ["correctness", "--data-dir", str(data_dir), "--save-dir", str(save_dir),
                                    "--workers", "1", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_output_that_the_manifest_does_not_list_is_refused_unless_overwrite(tmp_path: Path) -> None:
    """The audit's repro: a --save-dir without manifest.json whose raw/ holds 100 curated pair lines under the
    name this run writes. They were replaced; now the run is refused, and --overwrite replaces them on purpose."""
    data = write_stage1(tmp_path / "data").parent
    save = tmp_path / "S"
    curated = output_paths(save, "geoqa")["correctness"]
    curated.parent.mkdir(parents=True)
    curated.write_text("".join(json.dumps({"chosen": f"c{i}", "rejected": f"r{i}"}) + "\n" for i in range(100)))
    before = _snapshot(tmp_path)
    result = _cli(data, save)
    assert result.exit_code == 2
    assert result.output == (
        f"error: --save-dir {save}: {curated} exists and {save / 'manifest.json'} does not list it as written by "
        "mpo postprocess for this dataset; it would be replaced: move it away, use another --save-dir, or pass "
        "--overwrite to replace it\n")
    assert _snapshot(tmp_path) == before
    assert _cli(data, save, "--overwrite").exit_code == 0
    assert len(read_jsonl(curated)) == 7  # replaced, as asked
    assert _cli(data, save).exit_code == 0  # the manifest lists it now: a rerun is no conflict


def test_outputs_left_by_a_crash_are_known_as_this_tools_own(tmp_path: Path, monkeypatch) -> None:
    """The manifest lists a dataset's outputs before they are written: a run killed after writing some of them
    leaves files that the rerun recomputes, rather than refusing them as someone else's."""
    write_stage1(tmp_path / "data")
    real = postprocess._write_outputs

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(postprocess, "_write_outputs", killed)
    cfg = PostprocessConfig(data_dir=tmp_path / "data", save_dir=tmp_path / "out", workers=1)
    with pytest.raises(KeyboardInterrupt):
        run_postprocess(cfg, log=lambda _: None)
    monkeypatch.undo()
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["datasets"]["geoqa"]
    assert "settings" not in entry and len(entry["outputs"]) == 5  # listed, not done
    [stats] = run_postprocess(cfg, log=lambda _: None)
    assert not stats.skipped and stats.correctness_pairs == 7


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_that_is_an_input_file_is_refused_even_with_overwrite(tmp_path: Path, overwrite) -> None:
    """The audit's repro: --data-dir S3/pos_items --save-dir S3 replaced the input S3/pos_items/geoqa.jsonl by its
    positives; its negatives and malformed lines were lost. --overwrite must not allow it either."""
    save = tmp_path / "S3"
    data = write_stage1(save / "pos_items").parent
    before = _snapshot(tmp_path)
    result = _cli(data, save, *overwrite)
    assert result.exit_code == 2
    path = data / "geoqa.jsonl"
    assert result.output == (f"error: --save-dir {save}: the output {path} is the input file {path} (--data-dir); "
                             "writing it would replace the input: use another --save-dir\n")
    assert _snapshot(tmp_path) == before


def test_gt_responses_file_is_an_input_too(tmp_path: Path) -> None:
    data = write_stage1(tmp_path / "data").parent
    save = tmp_path / "S"
    reference = output_paths(save, "geoqa")["neg_items"]
    reference.parent.mkdir(parents=True)
    reference.write_text(json.dumps(rec("How many cars?", "7", box("7"), "d.png")) + "\n")
    before = _snapshot(tmp_path)
    result = _cli(data, save, "--gt-responses", str(reference), "--overwrite")
    assert result.exit_code == 2
    assert result.output == (f"error: --save-dir {save}: the output {reference} is the input file {reference} "
                             "(--gt-responses); writing it would replace the input: use another --save-dir\n")
    assert _snapshot(tmp_path) == before


def test_gt_responses_malformed_lines_are_reported_and_their_report_is_guarded(tmp_path: Path) -> None:
    """Malformed lines of --gt-responses were skipped without a count or a trace; now they go to
    reports/gt_responses/malformed_lines.jsonl (empty when there are none), which a rerun replaces and a file of
    someone else's at that path is refused, as for the datasets' outputs."""
    data = write_stage1(tmp_path / "data").parent
    save, reference = tmp_path / "S", tmp_path / "gt.jsonl"
    reference.write_text(json.dumps(rec("How many cars?", "7", box("7"), "d.png")) + "\n{oops\n")
    report = save / "reports" / "gt_responses" / "malformed_lines.jsonl"
    result = _cli(data, save, "--gt-responses", str(reference))
    assert result.exit_code == 0, result.output
    assert f"malformed: 1 line(s) of --gt-responses {reference} cannot be used; every one is in {report}" in (
        result.output)
    assert [(r["line"], r["field"], r["raw"]) for r in read_jsonl(report)] == [(2, "-", "{oops")]
    reference.write_text(json.dumps(rec("How many cars?", "7", box("7"), "d.png")) + "\n")
    assert _cli(data, save, "--gt-responses", str(reference)).exit_code == 0  # listed: replaced, now empty
    assert report.read_text() == ""
    other = tmp_path / "S2"
    (other / "reports" / "gt_responses").mkdir(parents=True)
    (other / "reports" / "gt_responses" / "malformed_lines.jsonl").write_text("mine\n")
    refused = _cli(data, other, "--gt-responses", str(reference))
    assert refused.exit_code == 2 and "does not list it as written by mpo postprocess" in refused.output
    assert (other / "reports" / "gt_responses" / "malformed_lines.jsonl").read_text() == "mine\n"


@pytest.mark.parametrize("blocked", ["save-dir", "raw"])
def test_a_file_where_an_output_folder_goes_is_one_error_line(tmp_path: Path, blocked) -> None:
    """--save-dir afile raised NotADirectoryError (a traceback, exit 1) from the writer; now one line, exit 2."""
    data = write_stage1(tmp_path / "data").parent
    save = tmp_path / "afile"
    if blocked == "save-dir":
        save.write_text("not a folder\n")
        blocker, first = save, save / "manifest.json"
    else:
        (save / "raw").parent.mkdir()
        (save / "raw").write_text("not a folder\n")
        blocker, first = save / "raw", output_paths(save, "geoqa")["correctness"]
    before = _snapshot(tmp_path)
    result = _cli(data, save)
    assert result.exit_code == 2
    assert result.output == (f"error: --save-dir {save}: {blocker} is a file, not a folder, so {first} cannot be "
                             "written; use another --save-dir\n")
    assert _snapshot(tmp_path) == before


def test_every_malformed_line_is_written_aside_and_the_console_keeps_the_first_20(tmp_path: Path) -> None:
    """Malformed lines after the 20th were only counted ("... 5 more in <file>"). All of them are now in
    reports/<ds>.malformed_lines.jsonl with file, line, field, message and the raw text (base64 when the
    line is not UTF-8), and the console says where that file is."""
    good = [json.dumps(r) for r in RECORDS[:3]]
    bad = [f'{{"broken": {i}' for i in range(23)] + [json.dumps({"question_orig": "q", "answer": "1"})]
    raw_bytes = b'{"response": "caf\xe9"}'
    data = tmp_path / "data"
    data.mkdir()
    path = data / "ds.jsonl"
    path.write_bytes("\n".join(good[:1] + bad + good[1:]).encode() + b"\n" + raw_bytes + b"\n")
    logs: list[str] = []
    [stats] = run_postprocess(PostprocessConfig(data_dir=data, save_dir=tmp_path / "out", workers=1), log=logs.append)
    report = output_paths(tmp_path / "out", "ds")["malformed"]
    assert stats.malformed == 25 and stats.positives == 2
    assert len(logs) == 22 and all(line.startswith(f"malformed: {path}:") for line in logs[:20])
    assert logs[20] == f"malformed: ... 5 more in {path}; every malformed line is in {report}"
    assert logs[21].endswith(f" malformed_lines={report}")
    rows = read_jsonl(report)
    assert [r["line"] for r in rows] == list(range(2, 26)) + [28]
    assert rows[0] == {"dataset": str(path), "line": 2, "field": "-", "severity": "error", "kind": "row",
                       "message": "not valid JSON (Expecting ',' delimiter: line 2 column 1 (char 13))",
                       "raw": '{"broken": 0'}
    assert rows[23]["field"] == "response" and rows[23]["raw"] == bad[23]
    assert [r["raw"] for r in rows[:24]] == bad
    assert "raw" not in rows[24] and base64.b64decode(rows[24]["raw_base64"]) == raw_bytes
    assert rows[24]["message"].startswith("not valid JSON (")
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_dataset_done_before_the_malformed_lines_report_is_not_judged_again(tmp_path: Path) -> None:
    """Manifests written before reports/<ds>.malformed_lines.jsonl existed list four outputs: those datasets are done
    (judging MMPR-sized files again after an upgrade costs hours)."""
    data = write_stage1(tmp_path / "data").parent
    save = tmp_path / "S"
    assert _cli(data, save).exit_code == 0
    manifest = json.loads((save / "manifest.json").read_text())
    for entry in manifest["datasets"].values():  # as the previous version wrote it
        entry["outputs"] = [p for p in entry["outputs"] if "malformed_lines" not in p]
    (save / "manifest.json").write_text(json.dumps(manifest))
    for report in (save / "reports").glob("*.malformed_lines.jsonl"):
        report.unlink()
    again = _cli(data, save)
    assert again.exit_code == 0 and "skipped (done, see manifest.json)" in again.output
    assert "malformed_lines=" not in again.output  # no report to point at
