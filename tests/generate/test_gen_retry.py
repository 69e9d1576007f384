"""Reruns of a generation output after its prompt rows changed: an edited ``system_prompt`` is sampled anew, and a
row whose last attempt ended in an item error (an unreadable image, a row the processor refused) is tried again,
the report saying what the latest attempt found. Driven by the fake sampler."""

from __future__ import annotations

import hashlib
import json

from gen_fakes import FakeSampler, write_jsonl
from PIL import Image

from mpo.generate.correctness import CorrectnessConfig, run_correctness
from mpo.generate.dropout_ntp import DropoutNTPConfig, run_dropout_ntp
from mpo.generate.items import item_id, read_prompts
from mpo.generate.sharding import OutputLayout, scan_parts


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_item_id_holds_the_rows_own_system_prompt_only_when_it_has_one(tmp_path):
    """Without one the id is what it was (outputs started before keep their samples); with one it is part of the
    request, so it is part of the id. Only a string counts, as only a string leads the request."""
    assert item_id(["a.png"], "Q?") == hashlib.sha1(b'[["a.png"], "Q?"]').hexdigest()
    assert item_id(["a.png"], "Q?", system_prompt="Be terse.") == hashlib.sha1(
        b'[["a.png"], "Q?", {"system_prompt": "Be terse."}]').hexdigest()
    assert item_id([], "Q?", "A.", "Be terse.") not in (item_id([], "Q?", "A."), item_id([], "Q?", "A.", "Be kind."))
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "Q?", "answer": "1"}, {"question": "Q?", "answer": "1", "system_prompt": None},
                       {"question": "Q?", "answer": "1", "system_prompt": "Be terse."}])
    prompts = read_prompts(path, required=("question", "answer"), prepare=lambda row, n: row["question"])
    assert [i.item_id for i in prompts.items] == [item_id([], "Q?"), item_id([], "Q?", system_prompt="Be terse.")]
    assert [(e.line, e.message) for e in prompts.rejected] == [
        (2, "duplicate of line 1 (same images and text); generated once")]


def _edit_system_prompt(path, text):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["system_prompt"] = text
    write_jsonl(path, rows)


def test_dropout_ntp_samples_a_row_again_after_its_system_prompt_changed(tmp_path):
    """The merge copies the current row: the new system prompt sat next to a rejected answer drawn under the old."""
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"question": "2+2?", "chosen": "The answer is 4", "system_prompt": "Be terse."},
                          {"question": "3+3?", "chosen": "The answer is 6"}])
    cfg = DropoutNTPConfig(checkpoint="org/m", prompt_path=str(prompts), out_dir=str(tmp_path / "o"),
                           progress=False, num_workers=0)
    first = _lines(run_dropout_ntp(cfg, FakeSampler(), env={}).output)
    _edit_system_prompt(prompts, "Answer like a pirate.")
    fake = FakeSampler()
    result = run_dropout_ntp(cfg, fake, env={})
    assert fake.calls == [(1, 1)] and fake.requests[0].messages[0]["content"][0]["text"] == "Answer like a pirate."
    merged = _lines(result.output)
    assert merged[0]["system_prompt"] == "Answer like a pirate." and merged[0]["item_id"] != first[0]["item_id"]
    assert merged[0]["seed"] != first[0]["seed"] and merged[1] == first[1]  # the untouched row keeps its sample
    assert result.summary["stale_samples"] == 1


def test_correctness_samples_a_row_again_after_its_system_prompt_changed(tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"question": "What is 1 plus 1?", "answer": "2", "system_prompt": "Be terse."},
                          {"question": "What is 2 plus 1?", "answer": "3"}])
    cfg = CorrectnessConfig(checkpoint="org/m", prompt_path=str(prompts), out_dir=str(tmp_path / "o"),
                            num_return_sequences=2, progress=False, num_workers=0)
    first = _lines(run_correctness(cfg, FakeSampler(), env={}).output)
    _edit_system_prompt(prompts, "Be verbose.")
    fake = FakeSampler()
    merged = _lines(run_correctness(cfg, fake, env={}).output)
    assert fake.calls == [(1, 2)]
    assert [r["system_prompt"] for r in merged[:2]] == ["Be verbose."] * 2
    assert {r["response"] for r in merged[:2]}.isdisjoint(r["response"] for r in first[:2])
    assert merged[2:] == first[2:]


def _green(tmp_path):
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "green.png")


def _image_cfg(tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"image": "green.png", "question": "<image>\nWhat colour?", "answer": "green"},
                          {"question": "What is 1 plus 1?", "answer": "2"}])
    return CorrectnessConfig(checkpoint="org/m", prompt_path=str(prompts), out_dir=str(tmp_path / "o"),
                             num_return_sequences=2, image_root=str(tmp_path), progress=False, num_workers=0)


def test_a_repaired_image_is_sampled_on_the_rerun_and_leaves_the_report(tmp_path):
    """The row got an item_error marker and was never tried again; the report kept calling the image unreadable."""
    (tmp_path / "green.png").write_bytes(b"broken")
    cfg = _image_cfg(tmp_path)
    result = run_correctness(cfg, FakeSampler(), env={})
    layout = OutputLayout(result.output)
    [bad] = _lines(layout.rejected_prompts)
    assert "is not an image PIL can read" in bad["message"] and result.summary["samples"] == 2

    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "broken.png")  # a truncated PNG: another reason
    (tmp_path / "green.png").write_bytes((tmp_path / "broken.png").read_bytes()[:60])

    def no_model():
        raise AssertionError("a row whose image still cannot be read needs no model")

    cfg.sampler_factory = lambda prompts: no_model  # type: ignore[method-assign]
    result = run_correctness(cfg, env={})
    [bad] = _lines(layout.rejected_prompts)
    assert "truncated or corrupt" in bad["message"]  # what the latest attempt found
    assert [m["attempt"] for m in scan_parts(layout).item_errors.values()] == [2]

    _green(tmp_path)
    fake = FakeSampler()
    result = run_correctness(_image_cfg(tmp_path), fake, env={})
    assert fake.calls == [(1, 2)] and result.generated == 2
    assert _lines(layout.rejected_prompts) == []
    assert (result.summary["items"], result.summary["samples"], result.summary["rejected_prompts"]) == (2, 4, 0)
    assert [r["answer"] for r in _lines(result.output)] == ["green", "green", "2", "2"]


class _TextOnlySampler(FakeSampler):
    def sample(self, requests, n, params):
        if any(req.images for req in requests):
            raise ValueError("this checkpoint is a text-only model: it cannot take an image")
        return super().sample(requests, n, params)


def test_a_refused_row_is_tried_again_once_its_image_file_changed(tmp_path):
    """Unchanged, the processor would refuse it again (and the rerun would load the model for nothing)."""
    _green(tmp_path)
    cfg = _image_cfg(tmp_path)
    run_correctness(cfg, _TextOnlySampler(), env={})
    again = _TextOnlySampler()
    run_correctness(cfg, again, env={})
    assert again.calls == []
    Image.new("RGB", (32, 16), (0, 200, 0)).save(tmp_path / "green.png")  # replaced: another size
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={})
    assert fake.calls == [(1, 2)] and result.summary["rejected_prompts"] == 0 and result.summary["samples"] == 4


def _rank(r):
    return {"RANK": str(r), "WORLD_SIZE": "2"}


def test_no_rank_merges_before_a_retried_row_is_done(tmp_path):
    """World size 2, rank 0's row had an unreadable image, now repaired. Rank 1 has no work: it counted the old
    marker as settled and merged without the row while rank 0 was still sampling it (a merge that could land
    after, and replace, rank 0's complete one; the report still named the repaired image)."""
    (tmp_path / "green.png").write_bytes(b"broken")
    cfg = _image_cfg(tmp_path)
    run_correctness(cfg, FakeSampler(), env=_rank(0))
    first = run_correctness(cfg, FakeSampler(), env=_rank(1))
    assert (first.summary["samples"], first.summary["rejected_prompts"]) == (2, 1)

    _green(tmp_path)
    idle = FakeSampler()
    early = run_correctness(cfg, idle, env=_rank(1))
    assert idle.calls == [] and (early.output, early.summary) == (None, None)  # it leaves the merge to rank 0
    busy = FakeSampler()
    done = run_correctness(cfg, busy, env=_rank(0))
    assert busy.calls == [(1, 2)]
    assert (done.summary["items"], done.summary["samples"], done.summary["rejected_prompts"]) == (2, 4, 0)
    layout = OutputLayout(done.output)
    assert [r["answer"] for r in _lines(done.output)] == ["green", "green", "2", "2"]
    assert _lines(layout.rejected_prompts) == []
    late = run_correctness(cfg, FakeSampler(), env=_rank(1))  # a rank that finishes after it merges the same
    assert late.output.read_bytes() == done.output.read_bytes() and late.summary == done.summary


def test_a_row_that_failed_on_unchanged_files_stands_and_every_rank_merges(tmp_path):
    """The marker of a row whose image files are the ones it failed on stands for every rank (the files would fail
    again), so a rerun is a merge on any rank, and loads no model."""
    (tmp_path / "green.png").write_bytes(b"broken")
    cfg = _image_cfg(tmp_path)
    run_correctness(cfg, FakeSampler(), env=_rank(0))
    run_correctness(cfg, FakeSampler(), env=_rank(1))

    def no_model():
        raise AssertionError("nothing is retried: no model")

    cfg.sampler_factory = lambda prompts: no_model  # type: ignore[method-assign]
    for rank in (1, 0):
        result = run_correctness(cfg, env=_rank(rank))
        assert result.summary["samples"] == 2 and result.summary["rejected_prompts"] == 1
    assert [m["attempt"] for m in scan_parts(OutputLayout(result.output)).item_errors.values()] == [1]
