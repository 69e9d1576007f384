"""``mpo postprocess correctness`` on a hand-built Stage-1 folder: exact pairs and files, manifest reruns,
``--overwrite``, ``--max-lines``, determinism (also through the process pool), ``--answer-fix``,
``--gt-responses``/``--force``, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpo.cli.postprocess import app
from mpo.generate import scan
from mpo.generate.postprocess import Entry, PostprocessConfig, output_paths, run_postprocess, select_pairs

R = "Step 1: read the figure.\nStep 2: compute the value.\n"


def box(answer: str) -> str:
    return R + f"Answer: \\boxed{{{answer}}}"


def prompt(question: str, image: object = None) -> str:
    """The wrapped prompt Stage 1 samples with (template shortened), its image markers placed."""
    images = [image] if isinstance(image, str) else image or []
    markers = "<image>\n" if len(images) == 1 else "".join(f"Image-{k + 1}: <image>\n" for k in range(len(images)))
    return f"{markers}{question}\nAnswer the preceding question."


def rec(question: str, answer: str, response: str, image: object = None, *, finish: str = "stop",
        version: str = "en_v2", meta: object = None, idx: int = 0) -> dict:
    """A Stage-1 record: input fields plus what the sampler adds (``question`` is the wrapped prompt)."""
    row: dict = {"question_orig": question, "question": prompt(question, image),
                 "answer": answer, "response": response, "prompt_version": version, "finish_reason": finish,
                 "sample_idx": idx, "seed": 1000 + idx}
    if image is not None:
        row["image"] = image
    if meta is not None:
        row["meta"] = meta
    return row


K1 = ("How many apples?", "12", "a.png")  # (question, answer, image)
K2 = ("Which animal?", "B", ["b.png", "c.png"])


def at(key: tuple, response: str, **kw) -> dict:
    return rec(key[0], key[1], response, key[2], **kw)

RECORDS = [
    at(K1, box("12"), meta={"id": 1}, idx=0),  # p1
    at(K1, box("13"), meta={"id": 3}, idx=1),  # n1
    at(K1, box("12"), meta={"id": 5}, idx=2),  # p1 again (same text): one pair candidate, two pos_items
    at(K1, box("12.0"), meta={"id": 2}, idx=3),  # p2
    at(K1, box("3"), meta={"id": 4}, idx=4),  # n2
    at(K1, R + "It is twelve.", meta={"id": 6}, idx=5),  # f1: no box
    at(K1, R + "Answer: \\boxed{12", finish="length", meta={"id": 7}, idx=6),  # f2: truncated
    at(K2, box("**B**")),  # p3
    at(K2, box("(B) dog")),  # p4
    at(K2, box("A")),  # n3
    rec("What is 1+2?", "3", box("3")),  # p5
    rec("What is 1+2?", "3", box("13")),  # n4: the seed's substring filter dropped this pair
    rec("How many cars?", "7", box("8"), "d.png"),  # all wrong -> neg_items
    rec("How many cars?", "7", box("9"), "d.png"),
    rec("How many cars?", "7", R + "no idea", "d.png"),
    rec("Is it raining?", "yes", box("Yes")),  # all correct
    rec("Is it raining?", "yes", box("yes.")),
    rec("Format only", "5", R + "five"),  # only format failures: all wrong, but no neg_items row
]
BAD_LINES = ["{bad json", json.dumps({"question_orig": "x", "answer": "1"}),
             json.dumps(rec("x", "1", box("1"), version="en_v9"))]


def write_stage1(folder: Path, name: str = "geoqa", records: list[dict] = RECORDS, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if bad:
        lines[3:3] = BAD_LINES[:1]
        lines[9:9] = BAD_LINES[1:2] + [""]
        lines.append(BAD_LINES[2])
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tmp: Path, out: str = "out", logs: list[str] | None = None, **kw) -> list:
    cfg = PostprocessConfig(data_dir=tmp / "data", save_dir=tmp / out, workers=kw.pop("workers", 1), **kw)
    return run_postprocess(cfg, log=(logs.append if logs is not None else lambda _: None))


def pair(key: tuple, chosen: str, rejected: str, cm: object = None, rm: object = None) -> dict:
    """A pair row: its question is the prompt the responses were sampled with; the original is kept beside it."""
    question, answer, image = key
    row = {"image": image} if image else {}
    row.update(question=prompt(question, image), chosen=chosen, rejected=rejected, answer_gt=answer,
               question_orig=question)
    if cm is not None:
        row["chosen_meta"] = cm
    if rm is not None:
        row["rejected_meta"] = rm
    return row


# Sorted by key (image JSON text, question, answer), then chosen, then rejected:
# "" < '["b.png", "c.png"]' < "a.png" < "d.png".
EXPECTED_CORRECTNESS = [
    pair(("What is 1+2?", "3", None), box("3"), box("13")),
    pair(K2, box("(B) dog"), box("A")),
    pair(K2, box("**B**"), box("A")),
    pair(K1, box("12.0"), box("13"), {"id": 2}, {"id": 3}),
    pair(K1, box("12.0"), box("3"), {"id": 2}, {"id": 4}),
    pair(K1, box("12"), box("13"), {"id": 1}, {"id": 3}),
    pair(K1, box("12"), box("3"), {"id": 1}, {"id": 4}),
]
EXPECTED_FORMAT = [
    pair(K1, box("12.0"), R + "Answer: \\boxed{12", {"id": 2}, {"id": 7}),
    pair(K1, box("12.0"), R + "It is twelve.", {"id": 2}, {"id": 6}),
    pair(K1, box("12"), R + "Answer: \\boxed{12", {"id": 1}, {"id": 7}),
    pair(K1, box("12"), R + "It is twelve.", {"id": 1}, {"id": 6}),
]


def test_pairs_and_files_are_exactly_as_expected(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    run(tmp_path)
    paths = output_paths(tmp_path / "out", "geoqa")
    assert read_jsonl(paths["correctness"]) == EXPECTED_CORRECTNESS
    assert read_jsonl(paths["format"]) == EXPECTED_FORMAT
    assert read_jsonl(paths["neg_items"]) == [{"image": "d.png", "question": "How many cars?", "answer": "7"}]
    pos = read_jsonl(paths["pos_items"])
    assert sorted((p["question_orig"], p["response"], p["answer_pred"]) for p in pos) == sorted([
        (K1[0], box("12"), "12"), (K1[0], box("12"), "12"), (K1[0], box("12.0"), "12.0"),
        (K2[0], box("**B**"), "B"), (K2[0], box("(B) dog"), "(B) dog"), ("What is 1+2?", box("3"), "3"),
        ("Is it raining?", box("Yes"), "Yes"), ("Is it raining?", box("yes."), "yes")])
    order = [p["question_orig"] for p in pos]  # grouped in key order
    assert order == ["Is it raining?"] * 2 + ["What is 1+2?", K2[0], K2[0]] + [K1[0]] * 3
    assert {json.dumps(p["image"]) for p in pos if p["question_orig"] == K2[0]} == {'["b.png", "c.png"]'}


def test_stats_and_malformed_lines_are_reported(tmp_path: Path) -> None:
    path = write_stage1(tmp_path / "data")
    logs: list[str] = []
    [stats] = run(tmp_path, logs=logs)
    assert (stats.lines, stats.malformed, stats.positives, stats.negatives, stats.format_negatives) == (21, 3, 8, 6, 4)
    assert stats.format_reasons == {"no_box": 3, "truncated": 1}
    assert (stats.keys, stats.all_correct_keys, stats.all_wrong_keys) == (6, 1, 2)
    assert (stats.correctness_pairs, stats.format_pairs, stats.neg_items) == (7, 4, 1)
    assert logs[:3] == [
        f"malformed: {path}:4: -: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"malformed: {path}:10: response: missing",
        f"malformed: {path}:22: prompt_version: unknown 'en_v9'; expected one of en, zh, en_v2, zh_v2, en_r1, zh_r1",
    ]
    assert logs[3] == ("[geoqa] lines=21 malformed=3 positives=8 negatives=6 format_negatives=4 (no_box=3, "
                       "truncated=1) keys=6 all_correct_keys=1 all_wrong_keys=2 pairs: correctness=7 format=4 "
                       f"neg_items=1 malformed_lines={tmp_path / 'out' / 'reports' / 'geoqa.malformed_lines.jsonl'}")


def test_rerun_skips_finished_files_and_overwrite_recomputes(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    run(tmp_path)
    out = output_paths(tmp_path / "out", "geoqa")
    stamps = {k: p.stat().st_mtime_ns for k, p in out.items()}
    logs: list[str] = []
    [again] = run(tmp_path, logs=logs)
    assert again.skipped and again.correctness_pairs == 7 and again.malformed == 3
    assert logs == [again.summary()] and logs[0].startswith("[geoqa] skipped (done, see manifest.json) lines=21")
    assert {k: p.stat().st_mtime_ns for k, p in out.items()} == stamps
    [forced] = run(tmp_path, overwrite=True)
    assert not forced.skipped and forced.correctness_pairs == 7
    assert all(p.stat().st_mtime_ns != stamps[k] for k, p in out.items())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = manifest["datasets"]["geoqa"]
    assert entry["counts"]["correctness_pairs"] == 7 and entry["settings"]["num_pairs_per_key"] == 15
    assert entry["outputs"] == ["raw/geoqa_pairs_vqa_correctness_rules.jsonl",
                                "raw/geoqa_pairs_vqa_format_rules.jsonl", "pos_items/geoqa.jsonl",
                                "neg_items/geoqa.jsonl", "reports/geoqa.malformed_lines.jsonl"]


def test_changed_input_or_settings_or_missing_output_is_recomputed(tmp_path: Path) -> None:
    path = write_stage1(tmp_path / "data")
    run(tmp_path)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec("What is 1+2?", "3", box("30"))) + "\n")
    [changed] = run(tmp_path)
    assert not changed.skipped and changed.correctness_pairs == 8
    [capped] = run(tmp_path, num_pairs_per_key=1)
    assert not capped.skipped and capped.correctness_pairs == 3
    output_paths(tmp_path / "out", "geoqa")["neg_items"].unlink()
    [rebuilt] = run(tmp_path, num_pairs_per_key=1)
    assert not rebuilt.skipped


def test_zero_pair_dataset_is_recorded_as_done(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data", "allright", [rec("Is it raining?", "yes", box("Yes"))], bad=False)
    [first] = run(tmp_path)
    assert (first.correctness_pairs, first.format_pairs, first.positives) == (0, 0, 1)
    out = output_paths(tmp_path / "out", "allright")
    assert out["correctness"].read_text() == "" and out["format"].read_text() == ""
    [second] = run(tmp_path)
    assert second.skipped


def test_max_lines_reads_only_the_first_lines(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    [stats] = run(tmp_path, max_lines=5)  # lines 1-5: p1, n1, p1 again, bad JSON, p2
    assert (stats.lines, stats.malformed, stats.positives, stats.negatives) == (5, 1, 3, 1)
    assert read_jsonl(output_paths(tmp_path / "out", "geoqa")["correctness"]) == [
        pair(K1, box("12.0"), box("13"), {"id": 2}, {"id": 3}), pair(K1, box("12"), box("13"), {"id": 1}, {"id": 3})]


def test_output_is_identical_across_runs_and_through_the_pool(tmp_path: Path, monkeypatch) -> None:
    write_stage1(tmp_path / "data")
    logs_a: list[str] = []
    logs_c: list[str] = []
    run(tmp_path, "a", logs_a, num_pairs_per_key=2)
    run(tmp_path, "b", num_pairs_per_key=2)
    monkeypatch.setattr(scan, "_MIN_CHUNK_BYTES", 256)  # several byte ranges, judged by 2 processes
    monkeypatch.setattr(scan, "_READ_BLOCK", 512)
    assert len(scan._byte_ranges(tmp_path / "data" / "geoqa.jsonl", 100, 256)) > 4
    run(tmp_path, "c", logs_c, num_pairs_per_key=2, workers=2)
    # same counts, same file:line for the malformed lines (the summaries name each run's own report)
    assert [line.replace(str(tmp_path / "c"), str(tmp_path / "a")) for line in logs_c] == logs_a
    for kind, path_a in output_paths(tmp_path / "a", "geoqa").items():
        for other in ("b", "c"):
            assert output_paths(tmp_path / other, "geoqa")[kind].read_bytes() == path_a.read_bytes(), (kind, other)
    capped = read_jsonl(output_paths(tmp_path / "a", "geoqa")["correctness"])
    assert len(capped) == 5 and all(row in EXPECTED_CORRECTNESS for row in capped)  # 1 + 2 + 2 per key


def test_byte_ranges_cut_at_newlines_with_line_numbers(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"aaaa\nbb\ncccccc\nd\neeeee")  # 22 bytes; the last line has no newline
    assert scan._byte_ranges(path, 100, 1 << 20) == [(0, 22, 1)]
    assert scan._byte_ranges(path, 3, 1 << 20) == [(0, 15, 1)]  # stops after the third newline
    monkeypatch.setattr(scan, "_READ_BLOCK", 8)  # blocks "aaaa\nbb\n", "cccccc\nd", "\neeeee"
    assert scan._byte_ranges(path, 100, 1) == [(0, 8, 1), (8, 15, 3), (15, 17, 4), (17, 22, 5)]
    assert scan._byte_ranges(path, 3, 1) == [(0, 8, 1), (8, 15, 3)]
    assert scan._byte_ranges(path, 100, 10) == [(0, 15, 1), (15, 22, 4)]


def test_answer_fix_rewrites_correct_option_answers_only(tmp_path: Path) -> None:
    good, wrong = R + "**Final answer:** **(B) dog**", R + "Final answer: **C**"
    number_wrong = R + "Final answer: 12"
    records = [rec("Which?", "B", good, version="en"), rec("Which?", "B", wrong, version="en"),
               rec("How many?", "2", R + "Final answer: 2", version="en"),
               rec("How many?", "2", number_wrong, version="en")]
    write_stage1(tmp_path / "data", "mc", records, bad=False)
    run(tmp_path, answer_fix=True)
    out = output_paths(tmp_path / "out", "mc")
    assert [(r["chosen"], r["rejected"]) for r in read_jsonl(out["correctness"])] == [
        (R + "Final answer: 2", number_wrong),  # seed-bug: the seed rewrote the wrong one to end in "2"
        (R + "Final answer: B", wrong)]
    fixed = [p for p in read_jsonl(out["pos_items"]) if p["question_orig"] == "Which?"]
    assert [(p["response"], p["answer_pred"]) for p in fixed] == [(R + "Final answer: B", "B")]


def test_gt_responses_fill_questions_without_positives_and_force_adds_everywhere(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    reference = tmp_path / "gt.jsonl"
    reference.write_text("\n".join(json.dumps(r) for r in [
        {"question": "How many cars?", "image": "d.png", "answer": "7", "response": box("7"), "prompt_version": "en_v2"},
        {"question": K1[0], "image": "a.png", "answer": "12", "prompt_version": "en_v2",
         "response": "Counting the apples one by one gives twelve.\nAnswer: \\boxed{12}"},
    ]) + "\n")
    [plain] = run(tmp_path, "plain", gt_responses=reference)
    rows = read_jsonl(output_paths(tmp_path / "plain", "geoqa")["correctness"])
    cars = [r for r in rows if r["question_orig"] == "How many cars?"]
    assert [(r["chosen"], r["rejected"]) for r in cars] == [(box("7"), box("8")), (box("7"), box("9"))]
    # apples already has model positives: the reference is used only with --force
    assert (plain.correctness_pairs, plain.format_pairs, plain.neg_items) == (7 + 2, 4 + 1, 1)
    logs: list[str] = []
    [forced] = run(tmp_path, "forced", logs=logs, gt_responses=reference, force=True)
    assert (forced.correctness_pairs, forced.format_pairs) == (9 - 4 + 6, 5 - 4 + 6)  # apples: 3 positives
    assert not any(line.startswith("warning") for line in logs)


def test_force_without_gt_responses_warns(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    logs: list[str] = []
    run(tmp_path, logs=logs, force=True)
    assert logs[0] == ("warning: --force has no effect without --gt-responses (there are no reference "
                       "responses to add)")


def test_select_pairs_filters_equal_answers_and_samples_huge_keys() -> None:
    pos = [Entry(1, 1, "12", 0, 0), Entry(2, 1, "12", 0, 10)]
    neg = [Entry(3, 0, "12", 0, 20), Entry(4, 0, "13", 0, 30)]
    assert sorted(select_pairs(pos, neg, 10, 0, True)) == [(pos[0], neg[1]), (pos[1], neg[1])]
    assert len(select_pairs(pos, neg, 10, 0, False)) == 4
    big_pos = [Entry(i, 1, "1", 0, i) for i in range(300)]
    big_neg = [Entry(10_000 + i, 0, str(i), 0, i) for i in range(300)]
    picked = select_pairs(big_pos, big_neg, 15, 7, True)
    assert len(picked) == len(set(picked)) == 15 and picked == select_pairs(big_pos, big_neg, 15, 7, True)


def test_cli_runs_and_rejects_bad_values(tmp_path: Path) -> None:
    write_stage1(tmp_path / "data")
    runner = CliRunner()
    args = ["correctness", "--data-dir", str(tmp_path / "data"), "--save-dir", str(tmp_path / "out"), "--workers", "1"]
    result = runner.invoke(app, args + ["--num-pairs-per-key", "15", "--max-lines", "100"])
    assert result.exit_code == 0, result.output
    assert "[geoqa] lines=21 malformed=3 positives=8" in result.output
    assert output_paths(tmp_path / "out", "geoqa")["correctness"].is_file()
    bad = runner.invoke(app, args + ["--max-lines", "0"])
    assert bad.exit_code == 2 and "error: --max-lines: must be >= 1, got 0" in bad.output


def test_config_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        PostprocessConfig(data_dir=tmp_path / "nope", save_dir=tmp_path)
    assert str(err.value) == f"--data-dir: not a folder: {tmp_path / 'nope'}"
    with pytest.raises(ValueError) as err:
        PostprocessConfig(data_dir=tmp_path, save_dir=tmp_path, gt_responses=tmp_path / "gt.jsonl")
    assert str(err.value) == f"--gt-responses: no such file: {tmp_path / 'gt.jsonl'}"


def test_lone_surrogate_line_is_malformed_not_fatal(tmp_path: Path) -> None:
    """``"\\ud83d"`` is valid JSON but cannot be encoded: hashing the response raised UnicodeEncodeError and
    ended the dataset. It is a counted malformed line, in the data and in ``--gt-responses``; a valid escaped
    pair (``\\ud83d\\ude00``) is fine."""
    good = json.dumps(rec("How many?", "3", box("3 \U0001f600")))  # ensure_ascii: written as a valid pair
    lone = json.dumps(rec("How many?", "3", box("4"))).replace("Step 1", "Nice \\ud83d Step 1")
    meta = json.dumps(rec("How many?", "3", box("5"), meta="\\udc00")).replace("\\\\udc00", "\\udc00")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "ds.jsonl"
    path.write_text("\n".join([good, lone, meta]) + "\n", encoding="utf-8")
    reference = tmp_path / "gt.jsonl"
    reference.write_text(lone + "\n" + json.dumps(rec("How many?", "3", box("3"))) + "\n", encoding="utf-8")
    logs: list[str] = []
    [stats] = run(tmp_path, logs=logs, gt_responses=reference, force=True)
    assert (stats.lines, stats.malformed, stats.positives, stats.negatives) == (3, 2, 1, 0)
    message = "is not valid Unicode: a \\ud800-\\udfff escape without its other half (lone surrogate)"
    report = tmp_path / "out" / "reports" / "gt_responses" / "malformed_lines.jsonl"
    assert logs[:4] == [f"malformed: {reference}:1: response: {message} (--gt-responses)",
                        f"malformed: 1 line(s) of --gt-responses {reference} cannot be used; every one is in {report}",
                        f"malformed: {path}:2: response: {message}", f"malformed: {path}:3: meta: {message}"]
    assert [(r["dataset"], r["line"], r["raw"]) for r in read_jsonl(report)] == [
        (str(reference), 1, lone)]
    paths = output_paths(tmp_path / "out", "ds")
    assert sorted(p["response"] for p in read_jsonl(paths["pos_items"])) == sorted([box("3"), box("3 \U0001f600")])


def test_empty_answers_are_malformed_by_the_stage_1_rule(tmp_path: Path) -> None:
    """One emptiness rule for both stages (``is_empty_answer``): blank strings and lists of blanks can never be
    matched either, so they are malformed like ``""`` and ``[]`` (Stage 1 refuses such prompt rows)."""
    records = [rec("q", answer, box("3")) for answer in ("", "  ", [], ["", " "])] + [rec("q", ["", "3"], box("3"))]
    write_stage1(tmp_path / "data", "ds", records, bad=False)
    logs: list[str] = []
    [stats] = run(tmp_path, logs=logs)
    assert (stats.lines, stats.malformed, stats.positives) == (5, 4, 1)
    path = tmp_path / "data" / "ds.jsonl"
    assert logs[:4] == [f"malformed: {path}:{i}: answer: missing or empty" for i in range(1, 5)]


def test_same_dataset_name_from_another_input_is_refused_unless_overwrite(tmp_path: Path) -> None:
    """``max_tiles_6/geoqa.jsonl`` then ``max_tiles_12/geoqa.jsonl`` into one ``--save-dir``: the second run
    silently replaced the first one's pairs. It is refused before anything is written; ``--overwrite`` replaces."""
    first = write_stage1(tmp_path / "tiles6")
    second = write_stage1(tmp_path / "tiles12", records=RECORDS[:3], bad=False)
    save = tmp_path / "pairs"
    run_postprocess(PostprocessConfig(data_dir=first.parent, save_dir=save, workers=1), log=lambda _: None)
    paths = output_paths(save, "geoqa")
    before = {k: p.read_bytes() for k, p in paths.items()}
    result = CliRunner().invoke(app, ["correctness", "--data-dir", str(second.parent), "--save-dir", str(save),
                                      "--workers", "1"])
    assert result.exit_code == 2
    assert result.output == (
        f"error: {save / 'manifest.json'}: 'geoqa' was built from {first.resolve()}, not {second.resolve()}: "
        "inputs with one name would overwrite each other's pairs; use another --save-dir, rename the file, or "
        "pass --overwrite to replace them\n")
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    [stats] = run_postprocess(PostprocessConfig(data_dir=second.parent, save_dir=save, workers=1, overwrite=True),
                              log=lambda _: None)
    assert not stats.skipped and stats.lines == 3
    manifest = json.loads((save / "manifest.json").read_text())
    assert manifest["datasets"]["geoqa"]["source"]["path"] == str(second.resolve())
