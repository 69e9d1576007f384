"""Helpers shared by the reliability tests (a module of its own: ``conftest`` names are ambiguous on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HOOKS = Path(__file__).parent / "hooks"
PYTHON = sys.executable

# 12 steps of 4 pairs (2 per micro-batch x 2 micro-batches) over a 29-row mixture (7 steps per epoch), so a run
# crosses an epoch boundary; a checkpoint every 4 steps. fp32, constant lr, no dropout: runs are bit-reproducible.
# With data seed 8 the mixture's bad row (item 27) falls in step 3 of epoch 0 and step 9 (epoch 1, step 2).
DATA_SEED = 8
RUN_YAML = f"""\
# mpo train run.yaml model.path=... data.meta_path=... train.output_dir=...
data: {{max_length: 512, max_dynamic_patch: 1, seed: {DATA_SEED}}}
train:
  learning_rate: 1.0e-3
  lr_scheduler: constant
  warmup_steps: 0
  warmup_ratio: 0.0
  per_device_batch_size: 2
  gradient_accumulation_steps: 2
  logging_steps: 1
  save_steps: 4
  save_total_limit: 0
  max_steps: 12
"""


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``python -m mpo.cli`` subprocess: offline, one thread (bit-equal to an in-process run under
    ``torch.set_num_threads(1)``: fp32 sums depend on the thread count), and the test hooks importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a subprocess with stdout and stderr going to ``log`` (a pipe could fill up and stall it)."""
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Poll until ``path`` exists; fail with the process log if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {path.name} appeared:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"{path.name} did not appear within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:] if log.exists() else "(no log)"


def metrics_by_step(path: Path) -> dict[int, list[dict]]:
    """Every logged row of ``metrics.jsonl`` per step, in file order (a resumed run logs some steps again)."""
    rows: dict[int, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], []).append(row)
    return rows


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread if the block runs longer than ``seconds`` (a hang fails the test
    instead of stalling the suite). Python-level code is interrupted; the guarded data code has no long C calls."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
