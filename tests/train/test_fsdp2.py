"""FSDP2 on two CPU processes (torchrun, gloo): mpo's pair scoring trains like one process, and mpo's checkpoints
hold the full optimizer state (not rank 0's shard) and resume under FSDP2 or on one plain process.

accelerate 1.15 turns FSDP on for GPU-like devices only, so ``mpo train`` under ``accelerate launch --config_file
configs/fsdp2.yaml`` cannot run here; ``fsdp2_worker.py`` shards with torch's ``fully_shard`` over the units that
config names (the decoder and vision layers, then the PairScorer root), which is what accelerate's FSDP2 path does,
and calls the same ``mpo.train.checkpoint`` functions as the training loop.

A second test gives one rank an image pair and the other a text-only pair at every step (mpo's vision filler keeps
FSDP2's collectives paired; without it gloo aborts with "Received data size doesn't match expected size").

Measured: FSDP2 weights after 4 steps vs one process 6e-8; the gathered optimizer state vs the one-process state
8e-9 (test tolerance 1e-5, 4 steps at lr 1e-3 move the weights by about 1e-3).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _env, _free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = str(Path(__file__).resolve().parent / "fsdp2_worker.py")
TOL = 1e-5


def _run(nproc: int, model, meta, out: Path, *extra: str) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={_free_port()}"] if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, WORKER, str(model), str(meta), str(out), "--steps", "4", "--save-at", "2",
                           *extra], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "returned a view tensor" not in proc.stderr  # PairScores are copies: FSDP2's backward hook stays on


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp2_trains_like_one_process_and_its_checkpoint_resumes_anywhere(demo_model, demo_data, tmp_path):
    meta = demo_data / "meta.json"
    _run(1, demo_model, meta, tmp_path / "plain")
    _run(2, demo_model, meta, tmp_path / "fsdp", "--fsdp")
    plain, fsdp = _final(tmp_path / "plain"), _final(tmp_path / "fsdp")
    assert _max_diff(plain, fsdp) < TOL
    assert _max_diff(plain, torch.load(tmp_path / "plain" / "step2.pt", weights_only=True)) > 1e-4  # steps 3-4 move

    # the checkpoint: full optimizer state (every parameter, full shapes) equal to the one-process state, and the
    # same safetensors keys and values as a plain run's (the tied lm_head alias dropped in both)
    a = torch.load(tmp_path / "plain" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "fsdp" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(plain)) - 1  # minus the alias
    assert a["param_groups"] == b["param_groups"]
    for name, moments in a["state"].items():
        for key, value in moments.items():
            assert value.shape == b["state"][name][key].shape, (name, key)
            assert (value - b["state"][name][key]).abs().max().item() < TOL, (name, key)
    assert _max_diff(load_file(tmp_path / "plain" / "checkpoint-2" / "model" / "model.safetensors"),
                     load_file(tmp_path / "fsdp" / "checkpoint-2" / "model" / "model.safetensors")) < TOL

    # resume the FSDP2 checkpoint under FSDP2 (2 processes) and on one plain process: both end where the
    # uninterrupted runs end
    _run(2, demo_model, meta, tmp_path / "fsdp_resumed", "--fsdp", "--resume", str(tmp_path / "fsdp" / "checkpoint-2"))
    _run(1, demo_model, meta, tmp_path / "plain_resumed", "--resume", str(tmp_path / "fsdp" / "checkpoint-2"))
    assert _max_diff(fsdp, _final(tmp_path / "fsdp_resumed")) < TOL
    assert _max_diff(plain, _final(tmp_path / "plain_resumed")) < TOL


def test_fsdp2_rank_without_images_keeps_step_with_a_rank_with_images(demo_model, demo_data, tmp_path):
    """Each step one rank scores an image pair and the other a text-only pair (with mpo's vision filler): FSDP2's
    per-layer all-gathers and reduce-scatters stay paired, and 4 steps equal one process accumulating both."""
    meta = demo_data / "meta.json"
    _run(1, demo_model, meta, tmp_path / "plain", "--mixed", "--save-at", "0")
    _run(2, demo_model, meta, tmp_path / "fsdp", "--fsdp", "--mixed", "--save-at", "0")
    assert _max_diff(_final(tmp_path / "plain"), _final(tmp_path / "fsdp")) < TOL
