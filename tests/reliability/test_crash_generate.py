"""Generation survives SIGKILL: a restart keeps every sample that reached the disk and redoes only the rest.

``mpo generate correctness`` is covered by ``tests/generate/test_gen_cli.py::
test_sigkill_mid_run_then_restart_loses_and_duplicates_nothing`` (a kill after the first part-file lines);
this file covers ``mpo generate dropout-ntp``, killed in the middle of writing a batch (a torn last line).
"""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
from reliability_support import PYTHON, cli_env, kill, start, tail, wait_for

from mpo.generate.dropout_ntp import truncate_chosen


@pytest.mark.slow
def test_dropout_ntp_sigkill_mid_write_then_restart_loses_and_duplicates_nothing(rel_demo, rel_model, tmp_path):
    """6 prompts x 2 samples, one prompt per batch. The first run is killed while writing batch 3: the part file
    holds batches 1-2, the first line of batch 3 and a torn line. The restart must cut the torn line, keep the 5
    whole lines byte for byte, generate the 7 missing samples, and merge 12 unique samples, 2 per prompt."""
    out, log, marker = tmp_path / "out", tmp_path / "gen.log", tmp_path / "hung"
    cmd = [PYTHON, "-m", "mpo.cli", "generate", "dropout-ntp", "--checkpoint", str(rel_model),
           "--prompt-path", str(rel_demo / "prompts" / "dropout_ntp.jsonl"), "--image-root", str(rel_demo / "images"),
           "--out-dir", str(out), "--num-return-sequences", "2", "--max-new-tokens", "4", "--batch-size", "1",
           "--num-workers", "0", "--device", "cpu", "--no-progress"]
    run_dir = out / f"{rel_model.parent.name}_{rel_model.name}"
    final, part = run_dir / "dropout_ntp.jsonl", run_dir / "parts" / "dropout_ntp.jsonl.rank0-of-1.jsonl"

    proc = start(cmd, cli_env(MPO_TEST_TEAR_APPEND="3", MPO_TEST_HANG_MARKER=str(marker)), log)
    try:
        wait_for(marker, proc, log)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL and not final.exists()
    before = part.read_bytes()
    *whole, torn = before.split(b"\n")
    assert len(whole) == 5 and torn and not torn.endswith(b"}")

    rerun = start(cmd, cli_env(), log)
    assert rerun.wait(timeout=600) == 0, tail(log)
    after = part.read_bytes()
    assert after.startswith(b"\n".join(whole) + b"\n")  # what reached the disk whole is kept, the torn tail cut
    assert all(isinstance(json.loads(line), dict) for line in after.splitlines())
    rows = [json.loads(line) for line in final.read_text(encoding="utf-8").splitlines()]
    summary = json.loads((run_dir / "reports" / "dropout_ntp.summary.json").read_text())
    keys = [(r["item_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == summary["samples"]
    assert summary["items"] == 6 and summary["duplicates_ignored"] == 0
    # a continuation that reproduces chosen is dropped (a marker line), so a prompt may keep fewer than 2 samples
    assert summary["samples"] + sum(summary["dropped"].values()) == 12
    assert len(after.splitlines()) == 12  # 5 kept + 7 new lines (samples or drop markers): nothing made twice
    assert set(Counter(r["item_id"] for r in rows).values()) <= {1, 2}
    for row in rows:
        assert row["rejected"].startswith(truncate_chosen(row["chosen"], 0.5))
