"""Bad rows during training: the rejected-rows log and the skip/error policy."""

from __future__ import annotations

import json

import pytest

from mpo.data import ImageError, RejectedRowLog, RowError, TooLongError, handle_bad_row


def test_log_appends_one_flushed_json_line_per_row_and_counts_kinds(tmp_path):
    path = tmp_path / "run" / "rejected_rows.jsonl"
    log = RejectedRowLog(path)
    log.write(ImageError("ds", 4, "image[1]", "file not found: x.png"))
    # readable before close: every write is flushed
    assert json.loads(path.read_text()) == {"dataset": "ds", "line": 4, "field": "image[1]",
                                            "message": "file not found: x.png", "kind": "image"}
    log.write(RowError("ds", 9, None, "not valid JSON at column 1: Expecting value"))
    log.write(TooLongError("other", 2, None, "4100 tokens > max_length 4096"))
    log.close()
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["image", "row", "too_long"]
    assert (dict(log.counts), log.total) == ({"image": 1, "row": 1, "too_long": 1}, 3)
    with RejectedRowLog(path) as again:  # a resumed run appends
        again.write(RowError("ds", 10, "chosen", "is missing"))
    assert len(path.read_text().splitlines()) == 4


def test_skip_logs_and_error_raises(tmp_path):
    log = RejectedRowLog(tmp_path / "rejected_rows.jsonl")
    err = RowError("ds", 1, "question", "is empty")
    handle_bad_row(err, "skip", log)
    assert log.counts == {"row": 1}
    with pytest.raises(RowError) as raised:
        handle_bad_row(err, "error", log)
    assert raised.value is err and log.counts == {"row": 1}


def test_skip_without_a_log_and_unknown_policy_are_refused():
    err = RowError("ds", 1, "question", "is empty")
    with pytest.raises(ValueError, match="on_bad_row=skip needs a RejectedRowLog: rows are never dropped silently"):
        handle_bad_row(err, "skip", None)
    with pytest.raises(ValueError, match="on_bad_row must be one of skip, error, got 'drop'"):
        handle_bad_row(err, "drop", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", ["RowError", "ImageError", "TooLongError"])
def test_row_errors_survive_pickling(cls):
    """DataLoader workers pickle the row errors they return; each comes back whole (class, fields, message)."""
    import pickle

    from mpo.data import errors

    err = getattr(errors, cls)("shape_colour", 7, "image", "file not found: x.png", severity="warning")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) == "shape_colour:7: image: file not found: x.png"
    assert back.to_dict() == err.to_dict()


def test_the_first_rows_are_logged_then_where_the_rest_go(tmp_path, caplog):
    from mpo.data.rejects import LOGGED_ROWS

    log = RejectedRowLog(tmp_path / "rejected_rows.jsonl")
    with caplog.at_level("WARNING", logger="mpo.data"):
        for line in range(1, LOGGED_ROWS + 6):
            log.write(RowError("ds", line, "chosen", "is empty"))
    log.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "mpo.data"]
    assert len(messages) == LOGGED_ROWS and log.total == LOGGED_ROWS + 5
    assert messages[0] == "skipped row ds:1: chosen: is empty (written to rejected_rows.jsonl)"
    assert messages[-1].endswith(f"further skipped rows are only written to {tmp_path / 'rejected_rows.jsonl'}")
    assert len((tmp_path / "rejected_rows.jsonl").read_text().splitlines()) == LOGGED_ROWS + 5
    resumed = RejectedRowLog(tmp_path / "rejected_rows.jsonl")  # a resumed run's log: the count goes on
    resumed.counts.update({"row": 12})
    caplog.clear()
    with caplog.at_level("WARNING", logger="mpo.data"):
        resumed.write(RowError("ds", 99, "chosen", "is empty"))
    resumed.close()
    assert [r.getMessage() for r in caplog.records] == ["skipped row ds:99: chosen: is empty (written to "
                                                        "rejected_rows.jsonl)"]
