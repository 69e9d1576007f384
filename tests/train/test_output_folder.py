"""What mpo train and mpo precompute-ref may write into: one writer per folder, never the user's own files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from train_helpers import run_config
from typer.testing import CliRunner

from mpo.cli import app
from mpo.train.precompute import run_precompute
from mpo.train.recipe import TrainingError, run_train
from mpo.train.refcache import RefCacheError, read_parts
from mpo.train.setup import LOCK_FILE

_HOLD = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
f.write("pid 4242 on elsewhere\\n"); f.flush()
fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
if sys.argv[2] == "fork":  # a child that outlives its parent, as DataLoader workers after a kill
    if os.fork() == 0:
        time.sleep(20); os._exit(0)
    print("locked", flush=True); os._exit(0)
print("locked", flush=True); time.sleep(60)
"""


def _hold(lock, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), how], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_folder_another_process_writes_to_is_refused(demo_model, demo_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = _hold(out / LOCK_FILE, "hold")
    try:
        with pytest.raises(TrainingError, match=r"^train\.output_dir .*/run: another mpo process \(pid 4242 on "
                                                r"elsewhere\) is writing to it; wait for it to end or choose another "
                                                r"folder$"):
            run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1"))
        with pytest.raises(ValueError, match=r"^train\.ref_cache .*/run: another mpo process"):
            run_precompute(run_config(demo_model, demo_data / "meta.json", tmp_path / "x", f"train.ref_cache={out}"),
                           progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written meanwhile
    finally:
        other.kill()
        other.wait()
    result = run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1"))
    assert result.steps == 1  # the lock went with its holder; the finished run released its own
    run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=2"), resume=True)  # again


def test_the_lock_dies_with_its_process_not_with_its_forked_children(demo_model, demo_data, tmp_path):
    """flock would stay held by forked DataLoader workers that outlive a killed run: the rerun was refused."""
    out = tmp_path / "run"
    out.mkdir()
    _hold(out / LOCK_FILE, "fork").wait()  # the holder exited; its forked child still runs
    assert run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1")).steps == 1


def test_an_output_folder_that_is_a_file_is_one_line(demo_model, demo_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match=r"^train\.output_dir .*/afile: is a file, not a folder$"):
        run_train(run_config(demo_model, demo_data / "meta.json", tmp_path / "afile"))


def test_the_config_file_given_is_never_rewritten(demo_model, demo_data, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    cfg = run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1")
    mine = "# my notes\n" + yaml.safe_dump(json.loads(json.dumps(cfg, default=vars)), sort_keys=False)
    (out / "config.yaml").write_text(mine)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier attempt's log: a refusal keeps it too
    result = CliRunner().invoke(app, ["train", str(out / "config.yaml"), "train.learning_rate=0.5"])
    assert result.exit_code == 2
    assert result.output.endswith(f"error: {out / 'config.yaml'}: this config file is the run folder's config.yaml, "
                                  "where mpo writes the run's resolved config (your comments would go, the overrides "
                                  "would become its values); copy it out of train.output_dir and start from the "
                                  "copy\n")
    assert (out / "config.yaml").read_text() == mine
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_run_resumes_from_its_own_config_file(demo_model, demo_data, tmp_path):
    """The config.yaml mpo wrote is rewritten as usual, so `mpo train RUN/config.yaml --resume` works."""
    out = tmp_path / "run"
    run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1", "train.save_steps=1"))
    result = CliRunner().invoke(app, ["train", str(out / "config.yaml"), "train.max_steps=2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "max_steps: 2" in (out / "config.yaml").read_text()


def test_a_run_from_before_the_system_message_resumes_and_evaluates_without_it(demo_model, demo_data, tmp_path):
    """Its checkpoints record no system message and its config.yaml no data.system_prompt: it trained without one.
    Resuming with InternVL's line would change the prompts mid-run (refused, naming the fix); eval renders none."""
    from mpo.data.system import INTERNVL_SYSTEM_PROMPT
    from mpo.train.evaluate import run_eval

    out = tmp_path / "run"
    run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=1", "train.save_steps=1"))
    state = out / "checkpoint-1" / "trainer_state.json"
    assert json.loads(state.read_text())["system_prompt"] == INTERNVL_SYSTEM_PROMPT
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "system_prompt"}))
    with pytest.raises(TrainingError, match=r"^--resume: .*checkpoint-1 was trained with the system message None "
                                            r"and this run renders '你是书生·万象.*': the rest of the run would see "
                                            r"other prompts; resume with data\.system_prompt=none$"):
        run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=2"), resume=True)
    run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=2", "data.system_prompt=none"),
              resume=True)
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["data"]["system_prompt"]  # as mpo wrote it before the key existed
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    old = run_eval(str(out), str(demo_data / "meta_heldout.json"), max_length=512, max_dynamic_patch=1)
    none = run_eval(str(out), str(demo_data / "meta_heldout.json"), max_length=512, max_dynamic_patch=1,
                    system_prompt="none")
    assert old.to_json() == none.to_json()


def test_precompute_writes_only_into_a_cache_folder(demo_model, demo_data, tmp_path):
    """train.ref_cache pointing at a run folder: its rejected_rows.jsonl was emptied and cache files mixed in."""
    run = tmp_path / "finished_run"
    run.mkdir()
    (run / "rejected_rows.jsonl").write_text('{"line": 3}\n')
    with pytest.raises(RefCacheError, match=r"^train\.ref_cache .*/finished_run: exists and holds no reference "
                                            r"cache; refusing to write into it: choose a new folder$"):
        run_precompute(run_config(demo_model, demo_data / "meta.json", tmp_path / "x", f"train.ref_cache={run}"),
                       progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["rejected_rows.jsonl"]
    assert (run / "rejected_rows.jsonl").read_text() == '{"line": 3}\n'


def test_a_damaged_cache_line_is_named(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "rank0.jsonl").write_text('{"d": "a", "l": 1, "c": -1.0, "r": -2.0}\n{"d": "a", "l"\n')
    with pytest.raises(RefCacheError, match=r"parts/rank0\.jsonl:2: not a cache line \(JSONDecodeError: .*\); "
                                            r"delete the file to recompute its pairs$"):
        list(read_parts(tmp_path))


def test_resume_refuses_data_that_gained_rows(demo_model, demo_data, tmp_path):
    """The epoch order is drawn for the data's size: after rows were added the saved position points elsewhere."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    out = tmp_path / "run"
    run_train(run_config(demo_model, data / "meta.json", out, "train.max_steps=2", "train.save_steps=1"))
    annotation = data / "annotations" / "shape_colour.jsonl"
    lines = annotation.read_text().splitlines(keepends=True)
    annotation.write_text("".join(lines + lines[:8]))
    meta = json.loads((data / "meta.json").read_text())
    meta["shape_colour"]["length"] = len(lines) + 8
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=rf"^--resume: the data changed since .*checkpoint-2 was written \(pairs "
                                            rf"per epoch: shape_colour {len(lines)} → {len(lines) + 8}\): the saved "
                                            r"position would point at other pairs; resume with the data of the "
                                            r"checkpoint, or start a new run$"):
        run_train(run_config(demo_model, data / "meta.json", out, "train.max_steps=4"), resume=True)


def test_precompute_prints_a_train_command_that_works(demo_model, demo_data, tmp_path):
    cache = tmp_path / "my cache"
    overrides = [f"model.path={demo_model}", f"data.meta_path={demo_data / 'meta.json'}", "data.max_length=512",
                 "data.max_dynamic_patch=1", f"train.ref_cache={tmp_path / 'elsewhere'}", f"train.ref_cache={cache}"]
    result = CliRunner().invoke(app, ["precompute-ref", "configs/demo.yaml", *overrides])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    assert line == (f"reference cache: {cache}  (train with: mpo train configs/demo.yaml model.path={demo_model} "
                    f"data.meta_path={demo_data / 'meta.json'} data.max_length=512 data.max_dynamic_patch=1 "
                    f"'train.ref_cache={cache}')")


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory):
    from mpo.models import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("sw") / "q2sw", "qwen2", vocab_size=400)
    config = json.loads((path / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=4096, max_window_layers=0,
                  layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_sliding_window_model_trains_caches_and_evaluates_with_the_plain_layout(sliding_model, demo_data,
                                                                                 tmp_path):
    """The shared layout refuses it at setup (one line, no traceback); pair_layout naive works for all commands."""
    meta = tmp_path / "meta_text.json"
    full = json.loads((demo_data / "meta.json").read_text())
    meta.write_text(json.dumps({"text_arith": {**full["text_arith"], "root": str(demo_data / "images"),
                                               "annotation": str(demo_data / full["text_arith"]["annotation"])}}))
    with pytest.raises(TrainingError, match=r"^Qwen2Model has sliding-window attention layers, which the shared "
                                            r"pair layout does not implement; use train\.pair_layout=naive$"):
        run_train(run_config(sliding_model, meta, tmp_path / "shared", "train.max_steps=1"))
    cache = run_precompute(run_config(sliding_model, meta, tmp_path / "x", f"train.ref_cache={tmp_path / 'c'}",
                                      "train.pair_layout=naive"), progress=False)
    result = run_train(run_config(sliding_model, meta, tmp_path / "naive", "train.max_steps=1",
                                  "train.pair_layout=naive", f"train.ref_cache={cache}"))
    assert result.steps == 1
    from mpo.train.evaluate import run_eval

    report = run_eval(str(tmp_path / "naive"), str(meta), max_length=512)
    assert report.datasets["text_arith"]["pairs"] > 0
