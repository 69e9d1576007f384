"""Training survives SIGKILL: a crash costs the steps since the last checkpoint, never the run.

The slow test drives the real command line (``python -m mpo.cli train run.yaml ... [--resume]``) and kills it twice:
between two checkpoints, and in the middle of a checkpoint save. It then resumes to the end and compares with an
uninterrupted run of the same config: bit-identical final weights and, step by step, identical metrics.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from reliability_support import DATA_SEED, PYTHON, cli_env, kill, metrics_by_step, start, tail, wait_for
from safetensors.torch import load_file

from mpo.config import load_config
from mpo.train.checkpoint import latest_checkpoint
from mpo.train.config import RunConfig

# Logged per step but measured, not computed: they differ between any two runs.
UNCOMPARED = {"pairs_per_s", "tokens_per_s"}
BAD_ROW = 27  # the mixture item of broken.jsonl line 1 (29 items: 14 + 6 + 7 + 2)


def _overrides(model: Path, meta: Path, out: Path) -> list[str]:
    return [f"model.path={model}", f"data.meta_path={meta}", f"train.output_dir={out}"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    assert state, f"no safetensors in {folder}"
    return state


def _uninterrupted(run_yaml: Path, model: Path, meta: Path, out: Path) -> None:
    """The reference run, in this process with one thread: the same arithmetic as the one-thread subprocesses."""
    from mpo.train.recipe import run_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(load_config(RunConfig, run_yaml, _overrides(model, meta, out)))
    finally:
        torch.set_num_threads(threads)


def _cli(run_yaml: Path, model: Path, meta: Path, out: Path, *, resume: bool) -> list[str]:
    return [PYTHON, "-m", "mpo.cli", "train", str(run_yaml), *_overrides(model, meta, out),
            *(["--resume"] if resume else [])]


@pytest.mark.slow
def test_sigkill_between_and_during_checkpoints_then_resume_equals_uninterrupted(rel_model, rel_meta, run_yaml,
                                                                                  tmp_path):
    """12 steps, checkpoints at 4, 8, 12; 7 steps per epoch.

    1. run, killed after step 6 is logged (checkpoint-4 on disk, checkpoint-8 not yet);
    2. ``--resume``: from checkpoint-4 (epoch 0, step 4), killed while saving checkpoint-8: ``.tmp-checkpoint-8``
       holds everything but ``trainer_state.json``; ``checkpoint-8`` does not exist; checkpoint-4 is still the newest;
    3. ``--resume``: from checkpoint-4 again, across the epoch boundary (step 7) to the end.

    Steps 5-6 are then logged three times and 7-8 twice; every copy must equal the uninterrupted run's value.
    The mixture's bad row falls in steps 3 and 9: it is dropped and logged, and training goes on.
    """
    reference, out, log = tmp_path / "reference", tmp_path / "killed", tmp_path / "cli.log"
    _uninterrupted(run_yaml, rel_model, rel_meta, reference)
    marker = tmp_path / "hung"

    # 1. a kill between two checkpoints
    proc = start(_cli(run_yaml, rel_model, rel_meta, out, resume=False),
                 cli_env(MPO_TEST_HANG_AFTER_STEP="6", MPO_TEST_HANG_MARKER=str(marker)), log)
    try:
        wait_for(marker, proc, log)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-4"]
    assert sorted(metrics_by_step(out / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
    assert not (out / "final").exists()

    # 2. a kill in the middle of a checkpoint save
    marker.unlink()
    proc = start(_cli(run_yaml, rel_model, rel_meta, out, resume=True),
                 cli_env(MPO_TEST_HANG_IN_SAVE="8", MPO_TEST_HANG_MARKER=str(marker)), log)
    try:
        wait_for(marker, proc, log)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    torn = out / ".tmp-checkpoint-8"
    assert sorted(p.name for p in torn.iterdir()) == ["config.yaml", "model", "optimizer.pt", "rng.pt",
                                                       "scheduler.pt"]
    assert not (out / "checkpoint-8").exists()
    assert latest_checkpoint(out) == out / "checkpoint-4"  # the interrupted save left the previous one in charge

    # 3. resume to the end
    done = start(_cli(run_yaml, rel_model, rel_meta, out, resume=True), cli_env(), log)
    assert done.wait(timeout=600) == 0, tail(log)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert text.count(f"resumed from {out / 'checkpoint-4'} (step 4, epoch 0)") == 2

    assert sorted(p.name for p in out.iterdir()) == [".mpo.lock", "checkpoint-12", "checkpoint-4", "checkpoint-8",
                                                     "config.yaml", "final", "metrics.jsonl", "rejected_rows.jsonl"]
    expected, got = _weights(reference / "final"), _weights(out / "final")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    straight, logged = metrics_by_step(reference / "metrics.jsonl"), metrics_by_step(out / "metrics.jsonl")
    assert sorted(logged) == sorted(straight) == list(range(1, 13))
    # steps 5-8 ran three and two times (the kills came after step 6 and in step 8's save), and each resume cut the
    # logs back to checkpoint-4: every step is logged once, as in the uninterrupted run
    assert {step: len(rows) for step, rows in logged.items()} == {step: 1 for step in range(1, 13)}
    for step, rows in logged.items():
        want = {k: v for k, v in straight[step][0].items() if k not in UNCOMPARED}
        for row in rows:
            assert {k: v for k, v in row.items() if k not in UNCOMPARED} == want, f"step {step}"
    assert [straight[s][0]["skipped_rows"] for s in range(1, 13)] == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    dropped = [json.loads(line) for line in (out / "rejected_rows.jsonl").read_text().splitlines()]
    assert {(r["dataset"], r["line"], r["kind"]) for r in dropped} == {("../../broken", 1, "image")}
    assert len(dropped) == 2  # step 3 (run 1) and step 9 (run 3); runs 2 and 3 resumed after step 4

    ckpt_a = json.loads((reference / "checkpoint-12" / "trainer_state.json").read_text())
    ckpt_b = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert ckpt_a["position"] == ckpt_b["position"] == {"epoch": 1, "step_in_epoch": 5}
    assert ckpt_a["delta"] == ckpt_b["delta"]


def test_latest_checkpoint_ignores_torn_and_incomplete_folders(tmp_path):
    """What a kill can leave behind (a ``.tmp-checkpoint-N`` being written; a ``checkpoint-N`` whose state file is
    missing) is never picked: only a folder with ``trainer_state.json`` and ``optimizer.pt`` counts."""
    def folder(name: str, *files: str) -> Path:
        path = tmp_path / name
        (path / "model").mkdir(parents=True)
        for file in files:
            (path / file).write_text("{}")
        return path

    good = folder("checkpoint-4", "trainer_state.json", "optimizer.pt")
    folder(".tmp-checkpoint-12", "trainer_state.json", "optimizer.pt")  # complete files, but never renamed
    folder("checkpoint-8", "optimizer.pt")  # trainer_state.json is written last: its absence means torn
    folder("checkpoint-10", "trainer_state.json")  # optimizer state lost
    folder(".checkpoint-16.old", "trainer_state.json", "optimizer.pt")  # replace_dir's trash
    folder("checkpoint-x", "trainer_state.json", "optimizer.pt")
    assert latest_checkpoint(tmp_path) == good
    shutil.rmtree(good)
    assert latest_checkpoint(tmp_path) is None


def _counting_reads(monkeypatch) -> list[int]:
    """Record every dataset item the loop reads (index into the mixture)."""
    from mpo.train.data import EncodedPairs

    reads: list[int] = []
    getitem = EncodedPairs.__getitem__

    def counted(self, i):
        reads.append(int(i))
        return getitem(self, i)

    monkeypatch.setattr(EncodedPairs, "__getitem__", counted)
    return reads


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The documented order of an epoch (``mpo.train.data``): ``randperm(n, seed + epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


@pytest.fixture(scope="module")
def four_steps(rel_model, rel_meta, run_yaml, tmp_path_factory) -> Path:
    """An in-process run stopped after 4 steps: ``checkpoint-4`` is position (epoch 0, step 4); the bad row was
    dropped at step 3, so its ``trainer_state.json`` says skipped_rows 1."""
    from mpo.train.recipe import run_train

    out = tmp_path_factory.mktemp("four") / "run"
    run_train(load_config(RunConfig, run_yaml, [*_overrides(rel_model, rel_meta, out), "train.max_steps=4"]))
    return out


def _resume_from(four_steps: Path, out: Path, position: dict | None = None) -> Path:
    """A fresh output folder holding a copy of checkpoint-4 (optionally with another data position)."""
    shutil.copytree(four_steps / "checkpoint-4", out / "checkpoint-4")
    if position is not None:
        state_file = out / "checkpoint-4" / "trainer_state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "position": position}))
    return out


def test_resume_jumps_to_the_data_position_without_replaying_the_loader(rel_model, rel_meta, run_yaml, four_steps,
                                                                        tmp_path, monkeypatch):
    """Resume reads only the pairs of the steps it trains, both from a real checkpoint and from one whose position
    says epoch 500: no earlier item is read (not even setup's usability probe, which only a fresh run makes), so
    the cost of a resume does not grow with the distance already trained (O(1) in the position)."""
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.train.recipe import run_train

    n, global_batch = len(PreferenceMixture(read_meta(rel_meta), seed=DATA_SEED)), 4
    assert n == 29
    reads = _counting_reads(monkeypatch)
    for position, first_step in ((None, 4), ({"epoch": 500, "step_in_epoch": 3}, 3)):
        reads.clear()
        out = _resume_from(four_steps, tmp_path / f"from-{first_step}", position)
        cfg = load_config(RunConfig, run_yaml, [*_overrides(rel_model, rel_meta, out), "train.max_steps=6"])
        assert run_train(cfg, resume=True).steps == 6
        epoch = position["epoch"] if position else 0
        per_epoch = n // global_batch * global_batch  # the trailing partial batch is dropped
        stream = (_epoch_order(n, DATA_SEED, epoch)[first_step * global_batch:per_epoch]
                  + _epoch_order(n, DATA_SEED, epoch + 1)[:per_epoch])
        # 500 epochs are 3,500 steps (14,000 reads to replay); the jump reads the 8 pairs it trains on, then at
        # most the prefetch thread's look-ahead (data.prefetch_batches queued + 1 being prepared) of what follows
        ahead = (cfg.data.prefetch_batches + 1) * cfg.train.per_device_batch_size
        assert reads[:2 * global_batch] == stream[:2 * global_batch]
        assert reads == stream[:len(reads)] and len(reads) <= 2 * global_batch + ahead


def test_skipped_rows_count_continues_after_resume(rel_model, rel_meta, run_yaml, four_steps, tmp_path):
    """``skipped_rows`` is a running total: after resuming from a checkpoint that saved 1, step 5 logs 1, as the
    uninterrupted run does (the bad row was dropped at step 3), not 0."""
    from mpo.train.recipe import run_train

    out = _resume_from(four_steps, tmp_path / "run")
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["skipped_rows"] == 1
    run_train(load_config(RunConfig, run_yaml, [*_overrides(rel_model, rel_meta, out), "train.max_steps=5"]),
              resume=True)
    assert metrics_by_step(out / "metrics.jsonl")[5][0]["skipped_rows"] == 1


def test_training_output_names_never_come_from_the_data(four_steps, rel_demo):
    """The output folder holds fixed names only (step numbers aside), although the mixture's bad row and its
    dataset name are made of paths (``../../broken``, ``../../pwned``, ``/tmp/pwned``); nothing is written beside
    the data either."""
    assert sorted(p.name for p in four_steps.iterdir()) == [".mpo.lock", "checkpoint-4", "config.yaml", "final",
                                                            "metrics.jsonl", "rejected_rows.jsonl"]
    assert sorted(p.name for p in (four_steps / "checkpoint-4").iterdir()) == [
        "config.yaml", "model", "optimizer.pt", "rng.pt", "scheduler.pt", "trainer_state.json"]
    (dropped,) = [json.loads(line) for line in (four_steps / "rejected_rows.jsonl").read_text().splitlines()]
    assert dropped["dataset"] == "../../broken" and dropped["kind"] == "image"
    assert "outside the dataset root" in dropped["message"]
    assert not list(rel_demo.parent.parent.rglob("*pwned*")) and not Path("/tmp/pwned").exists()
