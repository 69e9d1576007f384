"""``mpo precompute-ref`` on two CPU processes (torchrun, gloo): the merged cache equals the one-process cache,
a killed two-process precompute resumes, and two processes train with the cache like one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_distributed import COMMON, DEMO, _env, _free_port, _max_diff, _train, _weights

from mpo.config import load_config
from mpo.train.config import RunConfig
from mpo.train.precompute import run_precompute
from mpo.train.refcache import read_parts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _precompute_two(model, meta, cache, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "mpo.cli", "precompute-ref", DEMO, f"model.path={model}", f"data.meta_path={meta}",
           f"train.output_dir={out}", f"train.ref_cache={cache}", *COMMON]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _table(cache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """dataset → (lines, (N, 2) chosen/rejected log-probs) of a merged cache."""
    with np.load(cache / "logps.npz") as z:
        return {k.rsplit("/", 1)[0]: (z[k], z[k.rsplit("/", 1)[0] + "/logps"]) for k in z.files if k.endswith("/lines")}


def test_two_process_cache_equals_one_process_cache_and_trains(demo_model, demo_data, tmp_path):
    meta = demo_data / "meta.json"
    one = tmp_path / "cache1"
    run_precompute(load_config(RunConfig, DEMO, [f"model.path={demo_model}", f"data.meta_path={meta}",
                                                 f"train.output_dir={tmp_path / 'pre1'}", f"train.ref_cache={one}",
                                                 *COMMON]), progress=False)
    two = tmp_path / "cache2"
    _precompute_two(demo_model, meta, two, tmp_path / "pre2")

    # each rank scored its own half, every pair exactly once
    parts = {p.name: p.read_text().splitlines() for p in (two / "parts").glob("rank*.jsonl")}
    assert sorted(parts) == ["rank0.jsonl", "rank1.jsonl"] and sorted(map(len, parts.values())) == [48, 48]
    keys = [(d, line) for d, line, _, _ in read_parts(two)]
    assert len(keys) == len(set(keys)) == 96
    a, b = _table(one), _table(two)
    assert sorted(a) == sorted(b)
    for d in a:
        np.testing.assert_array_equal(a[d][0], b[d][0])
        np.testing.assert_allclose(b[d][1], a[d][1], rtol=0, atol=1e-5, err_msg=d)
    assert (two / "fingerprint.json").read_text() == (one / "fingerprint.json").read_text()

    # killed after rank 1 wrote 10 pairs (and half a line), before the merge: the rerun on two processes computes
    # only the 38 missing pairs, split over both ranks, and merges the same cache
    part1 = two / "parts" / "rank1.jsonl"
    part1.write_text("\n".join(parts["rank1.jsonl"][:10]) + "\n" + parts["rank1.jsonl"][10][:9])
    (two / "logps.npz").unlink()
    (two / "fingerprint.json").unlink()
    _precompute_two(demo_model, meta, two, tmp_path / "pre2")
    again = {p.name: p.read_text().splitlines() for p in (two / "parts").glob("rank*.jsonl")}
    assert again["rank0.jsonl"][:48] == parts["rank0.jsonl"] and again["rank1.jsonl"][:10] == parts["rank1.jsonl"][:10]
    assert len(again["rank0.jsonl"]) + len(again["rank1.jsonl"]) == 96  # 38 recomputed, 19 per rank
    keys = [(d, line) for d, line, _, _ in read_parts(two)]
    assert len(keys) == len(set(keys)) == 96
    c = _table(two)
    for d in a:
        np.testing.assert_array_equal(a[d][0], c[d][0])
        np.testing.assert_allclose(c[d][1], a[d][1], rtol=0, atol=1e-5, err_msg=d)

    # training with the two-process cache: two processes equal one process with the same global batch (full MPO:
    # δ's running mean differs slightly between the two, see test_distributed.py, so sigmoid + sft here)
    no_delta = ["loss.loss_types=[sigmoid,sft]", "loss.loss_weights=[0.8,1.0]", "train.max_steps=3"]
    _train(2, demo_model, meta, tmp_path / "train2", *no_delta, f"train.ref_cache={two}")
    _train(1, demo_model, meta, tmp_path / "train1", *no_delta, f"train.ref_cache={two}",
           "train.gradient_accumulation_steps=2")
    assert _max_diff(_weights(tmp_path / "train2" / "final"), _weights(tmp_path / "train1" / "final")) < 1e-5


def test_zero3_precompute_is_sharded_in_lock_step_and_equals_the_plain_cache(demo_model, demo_data, tmp_path):
    """``train.deepspeed`` naming ZeRO-3 (every weight partitioned): the reference is loaded partitioned and runs as
    a ZeRO-3 engine. 88 pairs of 87 questions (text rows subsampled to make the count odd; one question has two
    pairs, which share a batch) at one question per batch: rank 0 has 44 batches (45 pairs), rank 1 43 and repeats
    one to stay in step; text-only batches on one rank meet image batches on the other (the vision filler). The
    merged cache equals the one-process plain cache within 1e-5."""
    pytest.importorskip("deepspeed")
    import json

    meta = json.loads((demo_data / "meta.json").read_text())
    for spec in meta.values():
        for key in ("root", "annotation"):
            spec[key] = str(demo_data / spec[key])
    meta["text_arith"]["repeat_time"] = 0.5
    odd = tmp_path / "meta.json"
    odd.write_text(json.dumps(meta))
    zero3 = json.loads((Path(DEMO).parent / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # tiny weights would otherwise stay whole
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))

    one = tmp_path / "cache1"
    run_precompute(load_config(RunConfig, DEMO, [f"model.path={demo_model}", f"data.meta_path={odd}",
                                                 f"train.output_dir={tmp_path / 'pre1'}", f"train.ref_cache={one}",
                                                 *COMMON]), batch_size=1, progress=False)
    two = tmp_path / "cache2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "mpo.cli", "precompute-ref", DEMO, f"model.path={demo_model}", f"data.meta_path={odd}",
           f"train.output_dir={tmp_path / 'pre2'}", f"train.ref_cache={two}", *COMMON,
           f"train.deepspeed={tmp_path / 'zero3.json'}", "--batch-size", "1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = {p.name: p.read_text().splitlines() for p in (two / "parts").glob("rank*.jsonl")}
    assert {k: len(v) for k, v in parts.items()} == {"rank0.jsonl": 45, "rank1.jsonl": 43}  # the repeat wrote nothing
    a, b = _table(one), _table(two)
    assert sorted(a) == sorted(b) and sum(len(v[0]) for v in a.values()) == 88
    for d in a:
        np.testing.assert_array_equal(a[d][0], b[d][0])
        np.testing.assert_allclose(b[d][1], a[d][1], rtol=0, atol=1e-5, err_msg=d)
