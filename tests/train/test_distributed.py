"""Two CPU processes (torchrun, gloo) train like one process with the same micro-batches; δ is all-reduced;
checkpoints are written once; a run resumes across a changed world size (2 → 1 and 1 → 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.max_length=512", "data.max_dynamic_patch=1", "train.learning_rate=1e-3",
          "train.lr_scheduler=constant", "train.warmup_steps=0", "train.warmup_ratio=0", "train.logging_steps=1",
          "train.per_device_batch_size=2", "train.save_total_limit=0"]
DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(nproc: int, model, meta, out, *extra, resume=False, launcher=False):
    """``launcher``: start even one process with torchrun (DeepSpeed wants one)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
                if nproc > 1 or launcher else [sys.executable])
    cmd = [*launcher, "-m", "mpo.cli", "train", DEMO, f"model.path={model}", f"data.meta_path={meta}",
           f"train.output_dir={out}", *COMMON, *extra] + (["--resume"] if resume else [])
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(path):
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_equal_one_process_and_resume_with_one(demo_model, demo_data, tmp_path):
    """Loss sigmoid + sft (no δ): 2 procs × 2 pairs == 1 proc × 2 pairs × 2 accumulation, to 1e-5 (fp32 sums in
    another order). Then 2 procs for 2 steps + resume on 1 proc to 4 steps == 2 procs for 4 steps, and 1 → 2."""
    meta = demo_data / "meta.json"
    no_delta = ["loss.loss_types=[sigmoid,sft]", "loss.loss_weights=[0.8,1.0]"]
    _train(2, demo_model, meta, tmp_path / "two", *no_delta, "train.max_steps=4", "train.save_steps=2")
    _train(1, demo_model, meta, tmp_path / "one", *no_delta, "train.max_steps=4", "train.save_steps=2",
           "train.gradient_accumulation_steps=2")
    two, one = _weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")
    assert _max_diff(two, one) < 1e-5
    # checkpoints written once, by rank 0: exactly one folder per save step, no leftovers
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4"]
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one logger, not one per rank

    # resume across world sizes: the data position is (epoch, step) of a fixed global batch
    _train(2, demo_model, meta, tmp_path / "mixed", *no_delta, "train.max_steps=2", "train.save_steps=2")
    _train(1, demo_model, meta, tmp_path / "mixed", *no_delta, "train.max_steps=4", "train.save_steps=2",
           "train.gradient_accumulation_steps=2", resume=True)
    assert _max_diff(_weights(tmp_path / "mixed" / "final"), two) < 1e-5
    # and 1 → 2: rank 0 reads the checkpoint and broadcasts weights and optimizer state to rank 1
    _train(1, demo_model, meta, tmp_path / "grown", *no_delta, "train.max_steps=2", "train.save_steps=2",
           "train.gradient_accumulation_steps=2")
    _train(2, demo_model, meta, tmp_path / "grown", *no_delta, "train.max_steps=4", "train.save_steps=2",
           resume=True)
    assert _max_diff(_weights(tmp_path / "grown" / "final"), two) < 1e-5


def test_a_rank_without_images_keeps_step_with_a_rank_with_images(demo_model, demo_data, tmp_path):
    """One pair per process: the demo's text-only rows give micro-steps where one rank has an image and the other
    none. Without the vision filler DDP's gradient buckets paired up wrongly and gloo aborted at step 5 ("Received
    data size doesn't match expected size"). With it: the run finishes and equals one process with accumulation 2
    (the filler's weight is 0)."""
    meta = demo_data / "meta.json"
    no_delta = ["loss.loss_types=[sigmoid,sft]", "loss.loss_weights=[0.8,1.0]", "train.per_device_batch_size=1",
                "train.max_steps=8", "train.save_steps=0"]
    _train(2, demo_model, meta, tmp_path / "two", *no_delta)
    _train(1, demo_model, meta, tmp_path / "one", *no_delta, "train.gradient_accumulation_steps=2")
    assert _max_diff(_weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")) < 1e-5


def _with_bad_rows(demo_data, tmp_path, positions: list[int]) -> Path:
    """A copy of the demo data whose rows at these positions of the epoch-0 order (data.seed 42) are broken JSON.
    With one pair per micro-batch, position 2s + 1 is step s's second micro-batch: rank 1's with two processes,
    the last with accumulation 2."""
    import shutil

    from mpo.data import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.train.data import ResumableOrder

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    mixture = PreferenceMixture(read_meta(data / "meta.json"), seed=42)
    order = ResumableOrder(len(mixture), per_device=1, accumulation=2, seed=42).order(0).tolist()
    for dataset, line in sorted(mixture.source(order[k]) for k in positions):
        ann = data / "annotations" / f"{dataset}.jsonl"
        lines = ann.read_text().splitlines()
        lines[line - 1] = "{broken"
        ann.write_text("\n".join(lines) + "\n")
    return data / "meta.json"


BAD = [1, 5, 9, 10, 11]  # steps 1, 3, 5: the second micro-batch; step 6: both (no pair anywhere: no update)


def test_a_rank_whose_rows_are_all_bad_keeps_step_and_adds_nothing(demo_model, demo_data, tmp_path):
    """One pair per process and broken rows: a rank whose micro-batch has no usable pair used to skip its forward
    and backward while the other rank waited in DDP's all-reduce, for ever. It now runs a usable pair with weight 0:
    the run finishes and equals one process with accumulation 2, which skips the bad micro-batch; a step where no
    rank has a usable pair updates nothing, as in one process."""
    meta = _with_bad_rows(demo_data, tmp_path, BAD)
    no_delta = ["loss.loss_types=[sigmoid,sft]", "loss.loss_weights=[0.8,1.0]", "train.per_device_batch_size=1",
                "train.max_steps=12", "train.save_steps=0"]
    _train(2, demo_model, meta, tmp_path / "two", *no_delta)
    _train(1, demo_model, meta, tmp_path / "one", *no_delta, "train.gradient_accumulation_steps=2")
    assert _max_diff(_weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")) < 1e-5
    rejected = {name: sorted(json.loads(x)["line"] for x in (tmp_path / name / "rejected_rows.jsonl").read_text()
                             .splitlines()) for name in ("two", "one")}
    assert len(rejected["two"]) == len(BAD) and rejected["two"] == rejected["one"]  # each logged once, in both
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # the run's count, of both ranks (rank 1 had 4 of the 5): it was rank 0's alone, in the metric and checkpoint
    for name in ("two", "one"):
        last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        state = json.loads((tmp_path / name / "checkpoint-12" / "trainer_state.json").read_text())
        assert last["skipped_rows"] == state["skipped_rows"] == len(BAD), name
        assert state["skipped_rows_by_kind"] == {"row": len(BAD)}, name


def test_delta_is_all_reduced_across_ranks(demo_model, demo_data, tmp_path):
    """Full MPO: each rank prints its δ after training; they are equal, and equal to the 1-process δ (the running
    mean of per-micro-step global means has the same value at the end of each optimizer step)."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        "from mpo.config import load_config\n"
        "from mpo.train.config import RunConfig\n"
        "from mpo.train.recipe import setup, train\n"
        "run = setup(load_config(RunConfig, sys.argv[1], sys.argv[2:]))\n"
        "train(run)\n"
        # one write() per line: two ranks share the pipe, and print() writes the text and the newline apart
        "sys.stdout.write(f'DELTA {run.accelerator.process_index} {run.delta.value!r}\\n'); sys.stdout.flush()\n")
    args = [DEMO, f"model.path={demo_model}", f"data.meta_path={demo_data / 'meta.json'}", *COMMON,
            "train.max_steps=3", "train.save_steps=0"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                          str(driver), *args, f"train.output_dir={tmp_path / 'two'}"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    deltas = {line.split()[1]: float(line.split()[2]) for line in two.stdout.splitlines() if line.startswith("DELTA")}
    assert set(deltas) == {"0", "1"} and deltas["0"] == deltas["1"] != 0.0
    one = subprocess.run([sys.executable, str(driver), *args, f"train.output_dir={tmp_path / 'one'}",
                          "train.gradient_accumulation_steps=2"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    one_delta = float(next(line.split()[2] for line in one.stdout.splitlines() if line.startswith("DELTA")))
    assert one_delta == pytest.approx(deltas["0"], abs=2e-3)
