"""``mpo generate``: the seed's flags, flag errors, and a real run killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from typer.testing import CliRunner

from mpo.cli import app
from mpo.data.demo import write_demo

SEED_FLAGS = ["--checkpoint", "--prompt-path", "--out-dir", "--batch-size", "--num-workers", "--num-return-sequences",
              "--top-k", "--temperature", "--dynamic", "--max-num", "--sample-max-num", "--tp", "--max-new-tokens",
              "--seed", "--backend"]


@pytest.mark.parametrize("command, extra", [("dropout-ntp", ["--start-ratio"]),
                                            ("correctness", ["--prompt-version", "--top-p"])])
def test_help_lists_the_seed_flags(command, extra):
    result = CliRunner().invoke(app, ["generate", command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in SEED_FLAGS + extra:
        assert flag in result.output, flag


@pytest.mark.parametrize("args, message", [
    (["--top-p", "2"], "--top-p: must be > 0 and <= 1 (got 2.0)"),
    (["--prompt-version", "en_v9"], "--prompt-version must be one of en, zh, en_v2, zh_v2, en_r1, zh_r1, got 'en_v9'"),
    (["--batch-size", "0"], "--batch-size: must be >= 1 (got 0)"),
])
def test_bad_flag_values_name_the_flag(tmp_path, args, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "q", "answer": "a"}\n')
    result = CliRunner().invoke(app, ["generate", "correctness", "--checkpoint", "x", "--prompt-path", str(prompts),
                                      *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_missing_prompt_file_is_named(tmp_path):
    result = CliRunner().invoke(app, ["generate", "dropout-ntp", "--checkpoint", "x", "--prompt-path",
                                      str(tmp_path / "none.jsonl")], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert f"--prompt-path {tmp_path / 'none.jsonl'}: no such file" in " ".join(
        result.output.replace("│", " ").split())


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_loses_and_duplicates_nothing(tmp_path, tiny_internvl_dir):
    """Kill a real generator subprocess once its first part-file lines are on disk, restart it, and check that
    the merged output holds exactly N samples per item, no duplicate, and that no file holds a torn line."""
    demo = write_demo(tmp_path / "demo", n=20, n_heldout=4, n_prompts=8, seed=2)
    out = tmp_path / "out"
    n, items = 2, 8
    cmd = [sys.executable, "-m", "mpo.cli", "generate", "correctness", "--checkpoint", str(tiny_internvl_dir),
           "--prompt-path", str(demo["correctness_prompts"]), "--image-root", str(demo["images"]),
           "--out-dir", str(out), "--num-return-sequences", str(n), "--max-new-tokens", "4", "--batch-size", "1",
           "--num-workers", "0", "--device", "cpu", "--no-progress"]
    # One thread: the test machine is small and shared; oversubscribed threads only slow every process down.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = out / f"{tiny_internvl_dir.parent.name}_internvl" / "max_tiles_6"
    part, final = run_dir / "parts" / "correctness.jsonl.rank0-of-1.jsonl", run_dir / "correctness.jsonl"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (part.exists() and part.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part-file line after 180 s"
        time.sleep(0.05)
    assert proc.poll() is None  # still generating: the kill lands mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not final.exists()
    done_before = len(part.read_bytes().split(b"\n")) - 1
    assert 1 <= done_before < items * n

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = [json.loads(line) for line in final.read_text(encoding="utf-8").splitlines()]
    keys = [(r["item_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == items * n
    assert set(Counter(r["item_id"] for r in rows).values()) == {n}
    for path in (part, final):
        data = path.read_bytes()
        assert data.endswith(b"\n")
        assert all(isinstance(json.loads(line), dict) for line in data.splitlines())
    summary = json.loads((run_dir / "reports" / "correctness.summary.json").read_text())
    assert summary["samples"] == items * n and summary["duplicates_ignored"] == 0


def _one_line(result) -> str:
    return " ".join(result.output.replace("│", " ").split())


def test_tp_on_the_hf_backend_is_a_flag_error_and_writes_nothing(tmp_path):
    """The seed README's ``--tp 8`` on the default backend: a traceback after settings.json was written, which
    then refused ``--backend vllm``. Now a flag error before anything exists."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "q", "answer": "a"}\n')
    result = CliRunner().invoke(app, ["generate", "dropout-ntp", "--checkpoint", "x", "--prompt-path", str(prompts),
                                      "--out-dir", str(tmp_path / "out"), "--tp", "8"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert ("--tp 8: tensor parallelism needs --backend vllm (hf runs one model per process; start one process "
            "per GPU instead)") in _one_line(result)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_flag_error_and_writes_nothing(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "q", "answer": "a"}\n')
    result = CliRunner().invoke(app, ["generate", "correctness", "--checkpoint", str(tmp_path / "none"),
                                      "--prompt-path", str(prompts), "--out-dir", str(tmp_path / "out")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert f"--checkpoint: {tmp_path / 'none'}: no such model folder" in _one_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (None, "temperature: this output was started with 1.0, now 0.7; rerun with the same settings or use another "
           "--out-dir"),
    (b"garbage\n", "not a JSON object, and not the last line"),
])
def test_resume_and_part_file_errors_are_one_line_with_exit_code_2(tmp_path, damage, message):
    """ResumeError and PartFileError ended the command with a traceback; they are one ``error:`` line now."""
    from gen_fakes import FakeSampler

    from mpo.generate.correctness import CorrectnessConfig, correctness_output_path, run_correctness
    from mpo.generate.sharding import OutputLayout

    ckpt = tmp_path / "ckpt" / "tiny"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text('{"model_type": "qwen2"}')
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "q", "answer": "a"}\n{"question": "r", "answer": "b"}\n')
    cfg = CorrectnessConfig(checkpoint=str(ckpt), prompt_path=str(prompts), out_dir=str(tmp_path / "out"),
                            num_return_sequences=2, progress=False, num_workers=0,
                            temperature=0.7 if damage else 1.0)
    run_correctness(cfg, FakeSampler(), env={})
    if damage:
        part = OutputLayout(correctness_output_path(cfg)).part(0, 1)
        part.write_bytes(damage + part.read_bytes())
    result = CliRunner().invoke(
        app, ["generate", "correctness", "--checkpoint", str(ckpt), "--prompt-path", str(prompts), "--out-dir",
              str(tmp_path / "out"), "--num-return-sequences", "2", "--no-progress"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
