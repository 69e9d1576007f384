"""mpo precompute-ref: the cached reference gives the run the in-loop reference gives; mismatches are refused;
a killed precompute resumes without recomputing finished pairs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import run_config

from mpo.train.precompute import run_precompute
from mpo.train.recipe import TrainingError, run_train
from mpo.train.refcache import read_parts


def _weights(path):
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_cached_reference_trains_like_the_in_loop_reference(demo_model, demo_data, tmp_path):
    meta = demo_data / "meta.json"
    cache = run_precompute(run_config(demo_model, meta, tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}"),
                           progress=False)
    lines = list(read_parts(cache))
    assert len(lines) == len({(d, line) for d, line, _, _ in lines}) == 96  # every pair once
    run_train(run_config(demo_model, meta, tmp_path / "a"))
    run_train(run_config(demo_model, meta, tmp_path / "b", f"train.ref_cache={cache}"))
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["delta"] == pytest.approx(y["delta"], abs=1e-6)


def test_cache_for_other_data_is_refused_with_the_reason(demo_model, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    cache = run_precompute(run_config(demo_model, data / "meta.json", tmp_path / "pre",
                                      f"train.ref_cache={tmp_path / 'cache'}"), progress=False)
    ann = data / "annotations" / "text_arith.jsonl"
    ann.write_text(ann.read_text() + ann.read_text().splitlines()[0] + "\n")
    with pytest.raises(TrainingError, match=r"built for another setting; refusing it because:\n  "
                                            r"datasets.text_arith.mtime_ns: cache has"):
        run_train(run_config(demo_model, data / "meta.json", tmp_path / "run", f"train.ref_cache={cache}"))
    with pytest.raises(TrainingError, match=r"max_length: cache has 512, this run has 600"):
        run_train(run_config(demo_model, data / "meta.json", tmp_path / "run", f"train.ref_cache={cache}",
                             "data.max_length=600"))


def test_precompute_resumes_after_a_kill(demo_model, demo_data, tmp_path):
    cfg = run_config(demo_model, demo_data / "meta.json", tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}")
    cache = run_precompute(cfg, progress=False)
    part = cache / "parts" / "rank0.jsonl"
    lines = part.read_text().splitlines()
    # as if killed mid-write after 40 pairs: 40 whole lines and a torn one, no merged file
    part.write_text("\n".join(lines[:40]) + "\n" + lines[40][:7])
    (cache / "logps.npz").unlink()
    (cache / "fingerprint.json").unlink()
    run_precompute(cfg, progress=False)
    again = part.read_text().splitlines()
    assert len(again) == 96 and again[:40] == lines[:40]
    assert sorted(again) == sorted(lines)
    assert (cache / "logps.npz").is_file()


def test_missing_cache_is_a_clear_error(demo_model, demo_data, tmp_path):
    with pytest.raises(TrainingError, match="no complete reference cache"):
        run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "run",
                             f"train.ref_cache={tmp_path / 'none'}"))
