"""Sharding, part files, resume and merge, driven by the fake sampler (the loop is the unit under test)."""

from __future__ import annotations

import json

import pytest
from gen_fakes import FakeSampler, write_jsonl
from PIL import Image

from mpo.generate.correctness import CorrectnessConfig, correctness_output_path, run_correctness
from mpo.generate.items import sample_seed
from mpo.generate.sharding import (
    OutputLayout,
    PartFileError,
    ResumeError,
    local_device,
    rank_and_world,
    scan_parts,
    shard_range,
)


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, (3, 8)),
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (0, 2)),  # torchrun wins
])
def test_rank_and_world(env, expected):
    assert rank_and_world(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x', WORLD_SIZE='2': both must be integers"),
    ({"RANK": "0"}, "RANK='0', WORLD_SIZE=None: both must be integers"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID=2 is not in [0, SLURM_NTASKS=2)"),
])
def test_rank_and_world_errors(env, message):
    with pytest.raises(ValueError) as err:
        rank_and_world(env)
    assert str(err.value) == message


@pytest.mark.parametrize("backend, requested, tp, cuda, env, expected", [
    ("hf", "auto", 1, 0, {"LOCAL_RANK": "3"}, ("cpu", None)),
    ("hf", "auto", 1, 8, {}, ("cuda", None)),
    ("hf", "auto", 1, 4, {"LOCAL_RANK": "5"}, ("cuda:1", None)),
    ("hf", "auto", 1, 8, {"SLURM_LOCALID": "2"}, ("cuda:2", None)),
    ("hf", "cuda:7", 1, 8, {"LOCAL_RANK": "0"}, ("cuda:7", None)),           # an explicit device wins
    ("vllm", "auto", 2, 0, {"LOCAL_RANK": "1"}, ("auto", "2,3")),            # rank 1 of tp-2 engines
    ("vllm", "auto", 4, 0, {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, ("auto", None)),
    ("vllm", "auto", 1, 0, {}, ("auto", None)),
])
def test_local_device(backend, requested, tp, cuda, env, expected):
    assert local_device(backend, requested, tp, cuda, env) == expected


def test_shards_are_contiguous_and_near_equal():
    shards = [shard_range(10, r, 4) for r in range(4)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(shard_range(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]


# ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def prompt_file(tmp_path):
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "green.png")
    rows = [{"image": "green.png", "question": "<image>\nWhat colour?", "answer": "green", "meta": 1}]
    rows += [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(4)]
    path = tmp_path / "data" / "arith.jsonl"
    write_jsonl(path, rows)
    return path


def _cfg(tmp_path, prompt_file, **kw) -> CorrectnessConfig:
    base = dict(checkpoint="org/model", prompt_path=str(prompt_file), out_dir=str(tmp_path / "out"),
                num_return_sequences=3, image_root=str(tmp_path), progress=False, num_workers=0, batch_size=2)
    return CorrectnessConfig(**{**base, **kw})


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_single_rank_run_writes_every_sample_in_prompt_order(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={})
    final = correctness_output_path(cfg)
    assert final == tmp_path / "out" / "org_model" / "max_tiles_6" / "arith.jsonl"
    assert result.output == final and result.generated == 15 and fake.calls == [(2, 3), (2, 3), (1, 3)]
    recs = _lines(final)
    assert [(r["question_orig"], r["sample_idx"]) for r in recs][:4] == [
        ("<image>\nWhat colour?", 0), ("<image>\nWhat colour?", 1), ("<image>\nWhat colour?", 2),
        ("What is 0 plus 1?", 0)]
    first = recs[0]
    assert first["meta"] == 1 and first["answer"] == "green" and first["prompt_version"] == "en_v2"
    assert first["question"].startswith("<image>\nWhat colour?\nAnswer the preceding question.")
    assert first["seed"] == sample_seed(0, first["item_id"], 0)
    assert first["response"] == f"s{first['seed'] % 1_000_000}" and first["finish_reason"] == "stop"
    assert json.loads(OutputLayout(final).summary.read_text())["samples"] == 15


def test_ranks_share_work_and_the_last_one_merges(tmp_path, prompt_file):
    """World size 2: rank 0 (3 items) cannot merge alone; rank 1 (2 items) finishes and merges everything."""
    cfg = _cfg(tmp_path, prompt_file)
    r0 = run_correctness(cfg, FakeSampler(), env={"RANK": "0", "WORLD_SIZE": "2"})
    assert (r0.output, r0.generated) == (None, 9)
    r1 = run_correctness(cfg, FakeSampler(), env={"RANK": "1", "WORLD_SIZE": "2"})
    assert r1.generated == 6 and r1.output is not None
    single = _cfg(tmp_path, prompt_file, out_dir=str(tmp_path / "single"))
    run_correctness(single, FakeSampler(), env={})
    assert _lines(r1.output) == _lines(correctness_output_path(single))  # same bytes whatever the world size


def test_rerun_with_other_world_size_generates_only_missing_samples(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    run_correctness(cfg, FakeSampler(), env={"RANK": "1", "WORLD_SIZE": "2"})  # items 3, 4 only
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={"RANK": "0", "WORLD_SIZE": "3"})  # items 0, 1; merges nothing
    assert (result.generated, result.output) == (6, None)
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={"RANK": "1", "WORLD_SIZE": "3"})  # items 2, 3: only 2 is missing
    assert result.generated == 3 and fake.calls == [(1, 3)] and result.output is not None
    keys = [(r["item_id"], r["sample_idx"]) for r in _lines(result.output)]
    assert len(keys) == len(set(keys)) == 15


def test_partial_item_gets_only_its_missing_indices_with_their_own_seeds(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, num_return_sequences=2)
    run_correctness(cfg, FakeSampler(), env={})
    final = correctness_output_path(cfg)
    part = OutputLayout(final).part(0, 1)
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:3]) + "\n")  # keep item 0 (2 samples) and sample 0 of item 1
    final.unlink()
    fake = FakeSampler()
    run_correctness(cfg, fake, env={})
    # Batches of 2 over the unfinished items: (1, 2) then (3, 4); item 1 misses one sample, the others two,
    # and a batch makes one sampler call per missing count.
    assert fake.calls == [(1, 1), (1, 2), (2, 2)]
    item1 = json.loads(lines[2])["item_id"]
    assert fake.requests[0].seeds == (sample_seed(0, item1, 1),)
    assert _lines(final) == [json.loads(line) for line in lines]  # the regenerated samples are identical


def test_more_samples_later_only_adds_the_new_indices(tmp_path, prompt_file):
    run_correctness(_cfg(tmp_path, prompt_file, num_return_sequences=2), FakeSampler(), env={})
    fake = FakeSampler()
    result = run_correctness(_cfg(tmp_path, prompt_file, num_return_sequences=3), fake, env={})
    assert result.generated == 5 and fake.calls == [(2, 1), (2, 1), (1, 1)]
    assert [r["sample_idx"] for r in _lines(result.output)][:3] == [0, 1, 2]


def test_everything_done_only_merges_and_loads_no_model(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    run_correctness(cfg, FakeSampler(), env={})
    correctness_output_path(cfg).unlink()

    def no_model():
        raise AssertionError("the sampler must not be built when nothing is missing")

    cfg.sampler_factory = lambda prompts: no_model  # type: ignore[method-assign]
    result = run_correctness(cfg, env={})
    assert result.generated == 0 and len(_lines(result.output)) == 15


def test_changed_sampling_settings_are_refused(tmp_path, prompt_file):
    run_correctness(_cfg(tmp_path, prompt_file), FakeSampler(), env={})
    cfg = _cfg(tmp_path, prompt_file, temperature=1.0)
    settings = OutputLayout(correctness_output_path(cfg)).settings
    with pytest.raises(ResumeError) as err:
        run_correctness(cfg, FakeSampler(), env={})
    assert str(err.value) == (f"{settings}: temperature: this output was started with 0.7, now 1.0; rerun with "
                              "the same settings or use another --out-dir")


def test_torn_last_line_is_ignored_by_readers_and_cut_by_its_owner(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    run_correctness(cfg, FakeSampler(), env={"RANK": "0", "WORLD_SIZE": "2"})
    layout = OutputLayout(correctness_output_path(cfg))
    part = layout.part(0, 2)
    whole = part.read_bytes()
    part.write_bytes(whole + b'{"item_id": "abc", "sampl')  # a kill in the middle of a write
    state = scan_parts(layout)
    assert (len(state.samples), state.torn) == (9, 1) and part.read_bytes().endswith(b"sampl")
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert result.generated == 0 and fake.calls == [] and part.read_bytes() == whole  # cut, nothing redone


def test_damage_in_the_middle_of_a_part_file_is_an_error(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    run_correctness(cfg, FakeSampler(), env={})
    layout = OutputLayout(correctness_output_path(cfg))
    part = layout.part(0, 1)
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    with pytest.raises(PartFileError) as err:
        scan_parts(layout)
    assert str(err.value) == (f"{part}:3: not a JSON object, and not the last line: the part file was damaged by "
                              "something other than a kill; move it away to regenerate its samples")


def test_undecodable_image_is_reported_and_a_rerun_needs_no_model_while_it_stays_broken(tmp_path, prompt_file):
    """A rerun decodes it again (test_gen_retry.py: a repaired image is sampled); still broken, nothing is asked
    of the sampler."""
    (tmp_path / "green.png").write_bytes(b"broken")
    cfg = _cfg(tmp_path, prompt_file)
    result = run_correctness(cfg, FakeSampler(), env={})
    layout = OutputLayout(result.output)
    assert result.summary["items"] == 4 and result.summary["rejected_prompts"] == 1
    assert result.summary["samples"] == 12
    rejected = _lines(layout.rejected_prompts)
    assert [(r["line"], r["field"], r["kind"]) for r in rejected] == [(1, "image", "image")]
    fake = FakeSampler()
    run_correctness(cfg, fake, env={})
    assert fake.calls == []


def test_output_without_a_sample_is_not_started(tmp_path, prompt_file):
    """Settings are written once the model is built, and bind only an output that holds a sample: a run that
    failed before its first sample (here: the model did not load) does not lock the folder to its settings.
    (The settings were written first, so a rerun with the right flags hit a ResumeError for nothing.)"""
    cfg = _cfg(tmp_path, prompt_file, top_k=5)
    layout = OutputLayout(correctness_output_path(cfg))

    def broken():
        raise RuntimeError("the model did not load")

    cfg.sampler_factory = lambda prompts: broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        run_correctness(cfg, env={})
    assert not layout.settings.exists() and layout.part_files() == []
    layout.parts_dir.mkdir(parents=True)
    layout.settings.write_text(json.dumps({"backend": "hf", "top_k": 5}))  # as an older version left it
    layout.part(0, 1).write_bytes(b'{"item_id": "abc", "sampl')  # a torn line is no sample either
    result = run_correctness(_cfg(tmp_path, prompt_file, top_k=7), FakeSampler(), env={})
    assert result.generated == 15
    assert json.loads(layout.settings.read_text())["top_k"] == 7
    with pytest.raises(ResumeError, match="top_k: this output was started with 7, now 5"):
        run_correctness(_cfg(tmp_path, prompt_file, top_k=5), FakeSampler(), env={})


def test_merge_takes_the_current_prompt_row_and_the_stored_samples(tmp_path, prompt_file):
    """A corrected answer (or meta) keeps its item id, so its samples are not regenerated; the merged output
    must carry the correction. (The stored record was merged as it was: the old answer stayed.)"""
    cfg = _cfg(tmp_path, prompt_file)
    first = _lines(run_correctness(cfg, FakeSampler(), env={}).output)
    rows = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    rows[0]["answer"], rows[0]["meta"] = "lime", {"fixed": True}
    rows[1]["answer"] = "one"
    write_jsonl(prompt_file, rows)
    fake = FakeSampler()
    result = run_correctness(cfg, fake, env={})
    assert result.generated == 0 and fake.calls == []
    merged = _lines(result.output)
    assert [r["answer"] for r in merged] == ["lime"] * 3 + ["one"] * 3 + [r["answer"] for r in first[6:]]
    assert [r["meta"] for r in merged[:3]] == [{"fixed": True}] * 3
    keep = ("response", "seed", "sample_idx", "item_id", "question", "question_orig", "finish_reason")
    assert [{k: r[k] for k in keep} for r in merged] == [{k: r[k] for k in keep} for r in first]
    assert list(merged[3]) == ["question", "answer", "question_orig", "response", "prompt_version", "item_id",
                               "sample_idx", "seed", "finish_reason", "num_tokens"]


def test_another_prompt_file_with_the_same_name_is_refused(tmp_path, prompt_file):
    """Outputs are named by the prompt file's basename: a second ``arith.jsonl`` from another folder would
    silently replace the first one's merged output. The resolved prompt path is part of the settings."""
    run_correctness(_cfg(tmp_path, prompt_file), FakeSampler(), env={})
    other = tmp_path / "other" / "arith.jsonl"
    write_jsonl(other, [{"question": "What is 9 plus 1?", "answer": "10"}])
    cfg = _cfg(tmp_path, other)
    settings = OutputLayout(correctness_output_path(cfg)).settings
    with pytest.raises(ResumeError) as err:
        run_correctness(cfg, FakeSampler(), env={})
    assert str(err.value) == (
        f"{settings}: prompt_path: this output was started with {str(prompt_file.resolve())!r}, now "
        f"{str(other.resolve())!r}; another prompt file with the same name already fills this output; rename "
        "one of them or use another --out-dir")
    assert len(_lines(correctness_output_path(cfg))) == 15  # the first file's output is untouched


def test_tp_without_vllm_is_refused_before_anything_is_written(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, tp=8)
    with pytest.raises(ValueError) as err:
        run_correctness(cfg, env={})
    assert str(err.value) == ("--tp 8: tensor parallelism needs --backend vllm (hf runs one model per process; "
                              "start one process per GPU instead)")
    assert not (tmp_path / "out").exists()


class _TextOnlySampler(FakeSampler):
    """Refuses a call with an image, as HFSampler does for a text-only model (or Qwen-VL for an image it cannot
    size): ValueError from the processor, for the whole batched call."""

    def sample(self, requests, n, params):
        if any(req.images for req in requests):
            raise ValueError("this checkpoint is a text-only model: it cannot take an image")
        return super().sample(requests, n, params)


def test_a_row_the_sampler_refuses_is_reported_and_the_others_are_sampled(tmp_path, prompt_file):
    """It crashed the run with a traceback, and every rerun crashed on it again."""
    cfg = _cfg(tmp_path, prompt_file)
    result = run_correctness(cfg, _TextOnlySampler(), env={})
    assert result.summary["items"] == 4 and result.summary["rejected_prompts"] == 1
    assert result.summary["samples"] == 12 and result.generated == 12
    (rejected,) = _lines(OutputLayout(result.output).rejected_prompts)
    assert (rejected["line"], rejected["field"]) == (1, "image")
    assert rejected["message"] == ("the model's processor refused it: this checkpoint is a text-only model: it cannot "
                                   "take an image")
    again = _TextOnlySampler()
    run_correctness(cfg, again, env={})
    assert again.calls == []  # its image is unchanged: it would be refused again (test_gen_retry.py: changed)


def test_a_rows_own_system_prompt_leads_its_request(tmp_path):
    """Training renders the pair with the row's system_prompt, so its samples are drawn under it."""
    from mpo.generate.dropout_ntp import DropoutNTPConfig, run_dropout_ntp

    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"question": "2+2?", "chosen": "The answer is 4", "system_prompt": "Be terse."},
                          {"question": "3+3?", "chosen": "The answer is 6"}])
    fake = FakeSampler()
    run_dropout_ntp(DropoutNTPConfig(checkpoint="org/m", prompt_path=str(prompts), out_dir=str(tmp_path / "o"),
                                     progress=False, num_workers=0), fake, env={})
    first, second = fake.requests
    assert first.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be terse."}]}
    assert [m["role"] for m in second.messages] == ["user", "assistant"]  # the sampler adds --system-prompt's
