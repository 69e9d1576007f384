"""Correctness sampling end to end on the tiny InternVL and the demo prompts."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from mpo.data.demo import write_demo
from mpo.generate.correctness import CorrectnessConfig, run_correctness
from mpo.generate.prompts import wrap_question
from mpo.generate.samplers import HFSampler


class _SpyProcessor:
    """Forwards to the real processor and records the image kwargs of every call."""

    def __init__(self, processor: Any):
        self._processor = processor
        self.image_calls: list[tuple[int, int | None]] = []

    def __call__(self, **kwargs: Any) -> Any:
        if "images" in kwargs:
            self.image_calls.append((len(kwargs["images"]), kwargs.get("max_patches")))
        return self._processor(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_internvl_dir):
    tmp = tmp_path_factory.mktemp("correctness")
    demo = write_demo(tmp / "demo", n=20, n_heldout=4, n_prompts=8, seed=1)
    cfg = CorrectnessConfig(checkpoint=str(tiny_internvl_dir), prompt_path=str(demo["correctness_prompts"]),
                            out_dir=str(tmp / "out"), image_root=str(demo["images"]), num_return_sequences=3,
                            max_new_tokens=5, batch_size=4, num_workers=1, dynamic=True, max_num=6, progress=False)
    sampler = HFSampler(tiny_internvl_dir, dynamic=True, max_num=6)
    spy = _SpyProcessor(sampler.processor)
    sampler.processor = spy
    result = run_correctness(cfg, sampler, env={})
    inputs = [json.loads(line) for line in demo["correctness_prompts"].read_text().splitlines()]
    rows = [json.loads(line) for line in result.output.read_text(encoding="utf-8").splitlines()]
    return result, inputs, rows, spy


def test_every_prompt_gets_n_well_formed_records(run):
    result, inputs, rows, _ = run
    assert len(inputs) == 8 and len(rows) == 24 and result.summary["samples"] == 24
    assert Counter(r["item_id"] for r in rows) == {i: 3 for i in {r["item_id"] for r in rows}}
    assert len({r["item_id"] for r in rows}) == 8
    for row in rows:
        assert {"question", "answer", "question_orig", "response", "prompt_version", "item_id", "sample_idx",
                "seed", "finish_reason", "num_tokens"} <= set(row)
        assert row["prompt_version"] == "en_v2" and row["finish_reason"] in ("stop", "length")
        assert isinstance(row["response"], str) and 1 <= row["num_tokens"] <= 5


def test_question_is_the_wrapped_prompt_with_markers_placed(run):
    _, inputs, rows, _ = run
    by_question = {r["question_orig"]: r["question"] for r in rows}
    for row in inputs:
        wrapped = by_question[row["question"]]
        images = row.get("image") or []
        n_images = 1 if isinstance(images, str) else len(images)
        assert wrapped.count("<image>") == n_images
        if n_images == 1:
            assert wrapped == "<image>\n" + wrap_question(row["question"].replace("<image>\n", ""), "en_v2")
        else:  # the demo writes one marker per image: kept where they are
            assert wrapped == wrap_question(row["question"], "en_v2")


def test_tiles_are_capped_per_image(run):
    """--max-num 6 with --dynamic: 6 tiles for a one-image prompt, 6 // 2 = 3 for each image of a pair."""
    _, inputs, _, spy = run
    assert {cap for _, cap in spy.image_calls} == {6, 3}
    n_images = sum(1 if isinstance(r.get("image"), str) else len(r.get("image") or []) for r in inputs)
    assert sum(n for n, _ in spy.image_calls) == n_images
