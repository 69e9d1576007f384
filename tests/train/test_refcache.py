"""mpo precompute-ref: the cached reference gives the run the in-loop reference gives; mismatches are refused;
a killed precompute resumes without recomputing finished pairs."""

from __future__ import annotations

import json
import logging
import re
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


def test_cached_reference_trains_like_the_in_loop_reference(demo_model, demo_data, tmp_path, caplog):
    meta = demo_data / "meta.json"
    with caplog.at_level(logging.INFO, logger="mpo.refcache"):
        cache = run_precompute(run_config(demo_model, meta, tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}"),
                               progress=False)
    lines = list(read_parts(cache))
    assert len(lines) == len({(d, line) for d, line, _, _ in lines}) == 96  # every pair once
    # the rank's time, split into the reference forward and the wait for batches, is logged
    (timing,) = [r.timing for r in caplog.records if hasattr(r, "timing")]
    assert 0 < timing.scoring_s and 0 <= timing.waiting_s and timing.scoring_s + timing.waiting_s <= timing.total_s
    assert re.search(r"rank 0: 96 pairs in [\d.]+ s: reference forward [\d.]+ s, waiting for batches [\d.]+ s",
                     caplog.text)
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


def test_data_augment_trains_the_same_with_the_cache_as_in_the_loop(demo_model, demo_data, tmp_path):
    """data_augment draws a row's JPEG qualities from (seed, dataset, line), so the cache (one entry per row, its
    question's pairs scored together) holds the reference log-probs of exactly the tiles training sees."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["shape_colour"]["data_augment"] = meta["pair_colour"]["data_augment"] = True
    (data / "meta.json").write_text(json.dumps(meta))
    cache = run_precompute(run_config(demo_model, data / "meta.json", tmp_path / "pre",
                                      f"train.ref_cache={tmp_path / 'cache'}"), progress=False)
    run_train(run_config(demo_model, data / "meta.json", tmp_path / "a"))
    run_train(run_config(demo_model, data / "meta.json", tmp_path / "b", f"train.ref_cache={cache}"))
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    with pytest.raises(TrainingError, match=r"datasets.shape_colour.data_augment: cache has True, this run has "
                                            r"False"):
        meta["shape_colour"]["data_augment"] = False
        (data / "meta.json").write_text(json.dumps(meta))
        run_train(run_config(demo_model, data / "meta.json", tmp_path / "c", f"train.ref_cache={cache}"))


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


def test_a_questions_pairs_are_scored_in_one_span_and_equal_pair_by_pair(demo_model, demo_data, tmp_path, monkeypatch):
    """Pairs of one question (the correctness pipeline writes up to 15) are scored together: the image decoded once,
    the prompt run once for all distinct answers; each pair's cached log-probs equal its own plain two-sequence
    forward within 1e-5. A sibling that is too long is reported and set aside; its question's others are cached."""
    from mpo.data.encode import PairEncoder
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.data.system import resolve_system_prompt
    from mpo.models import load_model, load_processor
    from mpo.train.batch import collate_naive
    from mpo.train.data import EncodedPairs
    from mpo.train.forward import PairScorer

    rows = [json.loads(x) for x in (demo_data / "annotations" / "shape_colour.jsonl").read_text().splitlines()[:5]]
    out = []
    for k, row in enumerate(rows):
        nxt = rows[(k + 1) % len(rows)]
        out += [row, {**row, "rejected": "No: " + nxt["rejected"]}, {**row, "chosen": "Yes: " + nxt["chosen"]}]
    out.append({**rows[0], "chosen": "word " * 600})  # over max_length 512: reported, not cached
    ann = tmp_path / "questions.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in out))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"questions": {"root": str(demo_data / "images"), "annotation": str(ann),
                                              "repeat_time": 1, "max_dynamic_patch": 1}}))
    decoded = []
    original = PreferenceMixture.images
    monkeypatch.setattr(PreferenceMixture, "images", lambda self, record: decoded.append(record.line) or
                        original(self, record))
    scored = []
    forward = PairScorer.forward
    monkeypatch.setattr(PairScorer, "forward", lambda self, batch, *a: scored.append(batch.num_answers) or
                        forward(self, batch, *a))
    cache = run_precompute(run_config(demo_model, meta, tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}"),
                           progress=False)
    assert sorted(decoded) == [1, 4, 7, 10, 13]  # one decode per question: its first row
    assert sum(scored) == 5 * 4  # per question: its chosen and rejected, one more of each (not 3 · 2 answers)
    cached = {line: (c, r) for _, line, c, r in read_parts(cache)}
    assert sorted(cached) == list(range(1, 16))
    rejected = [json.loads(x) for x in (cache / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejected] == [(16, "chosen")]
    decoded.clear()  # run again (as after a kill): only the rejected row is tried again, and it is logged once
    run_precompute(run_config(demo_model, meta, tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}"),
                   progress=False)
    assert decoded == [16] and (cache / "rejected_rows.jsonl").read_text().count('"line": 16') == 1

    processor = load_processor(str(demo_model))
    model = load_model(str(demo_model)).eval()
    encoder = PairEncoder(processor, max_length=512, system_prompt=resolve_system_prompt(processor, "auto"))
    pairs = EncodedPairs(PreferenceMixture(read_meta(meta), max_dynamic_patch=1), encoder)
    with torch.no_grad():
        for i in range(15):
            pair = pairs[i]
            want = PairScorer(model)(collate_naive([pair], processor.tokenizer.pad_token_id))
            c, r = cached[pair.line]
            assert c == pytest.approx(want.chosen_logps.item(), abs=1e-5)
            assert r == pytest.approx(want.rejected_logps.item(), abs=1e-5)


def test_precompute_with_loader_workers_equals_in_process(demo_model, demo_data, tmp_path):
    """data.num_workers > 0 (the presets use 8): DataLoader workers decode and collate the batches; the cache and
    the rejected rows (a missing image, found in a worker) are those of the in-process precompute."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    ann = data / "annotations" / "shape_colour.jsonl"
    lines = ann.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "image": "train/missing.png"})
    ann.write_text("\n".join(lines) + "\n")
    caches = {}
    for workers in (0, 2):
        cache = tmp_path / f"cache{workers}"
        run_precompute(run_config(demo_model, data / "meta.json", tmp_path / f"pre{workers}", f"train.ref_cache={cache}",
                                  f"data.num_workers={workers}"), progress=False)
        rejected = [json.loads(x) for x in (cache / "rejected_rows.jsonl").read_text().splitlines()]
        assert [(r["dataset"], r["line"], r["kind"]) for r in rejected] == [("shape_colour", 4, "image")]
        caches[workers] = {(d, line): (c, r) for d, line, c, r in read_parts(cache)}
    assert len(caches[0]) == 95 and caches[2] == caches[0]


def test_a_cache_of_other_tokens_or_other_usable_rows_is_refused(demo_model, demo_data, tmp_path):
    """The fingerprint holds how mpo renders pairs (ENCODING_VERSION: a Qwen-VL cache from before the newline after
    an image was kept holds log-probs of other tokens) and the image-size limit (it decides which rows exist)."""
    import json

    from mpo.data.encode import ENCODING_VERSION

    meta = demo_data / "meta.json"
    cache = run_precompute(run_config(demo_model, meta, tmp_path / "pre", f"train.ref_cache={tmp_path / 'cache'}"),
                           progress=False)
    with pytest.raises(TrainingError, match=r"max_image_pixels: cache has 178956970, this run has 0"):
        run_train(run_config(demo_model, meta, tmp_path / "run", f"train.ref_cache={cache}",
                             "data.max_image_pixels=0"))
    stamp = cache / "fingerprint.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "encoding_version": ENCODING_VERSION - 1}))
    with pytest.raises(TrainingError, match=rf"encoding_version: cache has {ENCODING_VERSION - 1}, this run has "
                                            rf"{ENCODING_VERSION}"):
        run_train(run_config(demo_model, meta, tmp_path / "run2", f"train.ref_cache={cache}"))


def test_max_image_pixels_reaches_the_training_data(demo_model, demo_data, tmp_path):
    """data.max_image_pixels=100 under the demo's 64x64 images: every image row is a bad row naming the key."""
    import json

    run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.max_steps=2",
                         "data.max_image_pixels=100"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "rejected_rows.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] == "image" and "over max_image_pixels 100" in r["message"] for r in rows)
    assert "raise data.max_image_pixels" in rows[0]["message"]
