"""The training loop on a tiny InternVL, CPU fp32: it learns, it resumes exactly, it fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import run_config

from mpo.config import ConfigError
from mpo.train.recipe import TrainingError, run_train, setup, train

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _weights(path):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_train_writes_metrics_checkpoint_and_final_model(demo_model, demo_data, tmp_path):
    cfg = run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.save_steps=2")
    result = run_train(cfg)
    assert result.steps == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    expected = {"loss", "loss/sigmoid", "loss/sigmoid_weighted", "loss/bco_pair", "loss/bco_pair_weighted",
                "loss/sft", "loss/sft_weighted", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "delta", "grad_norm", "lr", "pairs_per_s",
                "tokens_per_s", "skipped_rows"}
    assert expected <= set(rows[0])
    first = rows[0]
    # step 1: policy == reference, so every reward is 0: DPO = ln 2, BCO = 2 ln 2, weighted 0.8 and 0.2
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss/sigmoid"] == pytest.approx(0.693147, abs=1e-5)
    assert first["loss/bco_pair"] == pytest.approx(1.386294, abs=1e-5)
    assert first["loss"] == pytest.approx(0.8 * 0.693147 + 0.2 * 1.386294 + first["loss/sft"], abs=1e-4)
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.json").is_file()
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    # a checkpoint's model loads by path like final/ (mpo eval, mpo models info): it has the processor too
    from mpo.models import load_processor

    assert type(load_processor(tmp_path / "run" / "checkpoint-2" / "model")).__name__ == "InternVLProcessor"


@pytest.mark.parametrize(("workers", "drop_path"), [(0, 0.0), (2, 0.0), (0, 0.2)],
                         ids=["in_process", "loader_workers", "drop_path"])
def test_resume_gives_the_same_weights_and_delta(demo_model, demo_data, tmp_path, workers, drop_path):
    """4 steps straight == 2 steps, stop, --resume to 4 (fp32, CPU): weights bit-identical, δ equal; also when
    DataLoader workers load the data (the resumed sampler starts them at the saved position), and with drop path,
    whose masks come from the restored RNG (the loader's iterator used to draw from that stream after a resume's
    restore, but before a fresh run's first step: weights differed by up to 2e-3)."""
    meta = demo_data / "meta.json"
    loader = f"data.num_workers={workers} model.drop_path_rate={drop_path}".split()
    straight = run_config(demo_model, meta, tmp_path / "a", "train.max_steps=4", "train.save_steps=2", *loader)
    run_train(straight)
    first = run_config(demo_model, meta, tmp_path / "b", "train.max_steps=2", "train.save_steps=2", *loader)
    run_train(first)
    resumed = run_config(demo_model, meta, tmp_path / "b", "train.max_steps=4", "train.save_steps=2", *loader)
    result = run_train(resumed, resume=True)
    assert result.steps == 4
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "a" / "checkpoint-4" / "trainer_state.json").read_text())
    sb = json.loads((tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text())
    assert sa["delta"] == sb["delta"] and sa["delta"]["value"] != 0.0
    assert sa["position"] == sb["position"]
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_resume_with_another_global_batch_is_refused(demo_model, demo_data, tmp_path):
    """The saved data position counts steps of 4 pairs: resumed at 2 pairs a step it would point at other pairs."""
    meta = demo_data / "meta.json"
    run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=2", "train.save_steps=2"))
    with pytest.raises(TrainingError, match=r"--resume: .*checkpoint-2 was written with 4 pairs per optimizer step "
                                            r".* and this run has 2: .* resume with train.global_batch_size=4$"):
        run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=4",
                             "train.per_device_batch_size=2"), resume=True)
    assert run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=4", "train.per_device_batch_size=2",
                                "train.gradient_accumulation_steps=2"), resume=True).steps == 4


def test_nonfinite_loss_stops_and_names_the_step(demo_model, demo_data, tmp_path):
    run = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run"))
    with torch.no_grad():
        next(p for p in run.scorer.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1: the loss is nan .*last good checkpoint"):
        train(run)


def test_missing_model_path_is_a_clear_error(demo_data, tmp_path):
    cfg = run_config(tmp_path / "nope", demo_data / "meta.json", tmp_path / "run")
    with pytest.raises(TrainingError, match="nope: no such model folder"):
        run_train(cfg)


def test_usage_errors_are_one_line_with_exit_code_2_not_a_traceback(demo_model, demo_data, tmp_path):
    """The CLI prints what is wrong and exits 2 for a model, data or setting that cannot make the run: these were
    tracebacks with exit 1 (a ModelLoadError or ValueError from setup, eval's batch size 0)."""
    from typer.testing import CliRunner

    from mpo.cli import app

    base = ["train", str(DEMO), f"model.path={demo_model}", f"data.meta_path={demo_data / 'meta.json'}"]
    cases = {
        "no_model": (base + [f"model.path={tmp_path / 'nope'}"], "nope: no such model folder"),
        "batch": (base + ["train.per_device_batch_size=1000"], "per_device"),
        "frozen": (base + ["model.freeze_backbone=true", "model.freeze_mlp=true", "model.freeze_llm=true"],
                   "nothing to train: model.freeze_backbone, freeze_mlp and freeze_llm freeze every parameter"),
        "eval_model": (["eval", "--model", str(tmp_path / "nope"), "--meta", str(demo_data / "meta.json")],
                       "nope: no such model folder"),
        "eval_meta": (["eval", "--model", str(demo_model), "--meta", str(tmp_path / "none.json")], "none.json"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / name
        result = CliRunner().invoke(app, [*args, f"train.output_dir={out}"] if args[0] == "train" else args)
        assert result.exit_code == 2, (name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), name
        assert "error: " in result.output and message in result.output, (name, result.output)
    result = CliRunner().invoke(app, ["eval", "--model", str(demo_model), "--meta", str(demo_data / "meta.json"),
                                      "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_meta_without_usable_rows_fails_before_training(demo_model, tmp_path):
    ann = tmp_path / "bad.jsonl"
    ann.write_text('{"question": "q"}\nnot json\n')
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"bad": {"root": ".", "annotation": "bad.jsonl", "repeat_time": 1}}))
    with pytest.raises(TrainingError, match=r"none of the 2 rows is usable"):
        run_train(run_config(demo_model, meta, tmp_path / "run"))
    rejected = (tmp_path / "run" / "rejected_rows.jsonl").read_text().splitlines()
    assert [json.loads(r)["line"] for r in rejected] == [1, 2]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "loader_workers"])
def test_bad_rows_are_skipped_counted_and_written_aside(demo_model, demo_data, tmp_path, workers):
    """Also from DataLoader worker processes (the presets use 8): the row error crosses the process boundary."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    ann = data / "annotations" / "shape_colour.jsonl"
    lines = ann.read_text().splitlines()
    lines[0] = "{broken"
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "train/missing.png"})  # found when decoded
    ann.write_text("\n".join(lines) + "\n")
    # one epoch (96 pairs, 24 steps of 4): each bad row is met once, and written once (the check for usable rows
    # before training, which meets the first one at index 0, reports nothing itself)
    cfg = run_config(demo_model, data / "meta.json", tmp_path / "run", "train.max_steps=24",
                     f"data.num_workers={workers}")
    result = run_train(cfg)
    rejected = [json.loads(r) for r in (tmp_path / "run" / "rejected_rows.jsonl").read_text().splitlines()]
    assert sorted((r["dataset"], r["line"], r["kind"]) for r in rejected) == [("shape_colour", 1, "row"),
                                                                              ("shape_colour", 2, "image")]
    assert result.skipped_rows == 2


def test_on_bad_row_error_stops(demo_model, demo_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for name in ("shape_colour", "pair_colour", "text_arith"):
        ann = data / "annotations" / f"{name}.jsonl"
        ann.write_text("{broken\n" + ann.read_text())
    with pytest.raises(TrainingError, match=r"(shape_colour|pair_colour|text_arith):1: -: not valid JSON"):
        run_train(run_config(demo_model, data / "meta.json", tmp_path / "run", "data.on_bad_row=error",
                             "train.max_steps=25"))  # an epoch: 99 rows, 3 of them broken


def test_a_new_run_does_not_mix_with_another_runs_checkpoints(demo_model, demo_data, tmp_path):
    """--resume and save_total_limit take the newest checkpoint by step, whichever run wrote it: a run that does
    not resume refuses a folder holding another run's checkpoints, and starts anew the logs of an attempt that
    saved nothing."""
    meta = demo_data / "meta.json"
    run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=2"))
    with pytest.raises(TrainingError, match=r"run already holds another run \(checkpoint-2, final\): continue it "
                                            r"with --resume, or set train.output_dir to a new folder$"):
        run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=2"))
    assert run_train(run_config(demo_model, meta, tmp_path / "run", "train.max_steps=3"), resume=True).steps == 3

    attempt = tmp_path / "attempt"  # an earlier attempt that logged a step and a bad row, and saved nothing
    attempt.mkdir()
    (attempt / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (attempt / "rejected_rows.jsonl").write_text('{"dataset": "x", "line": 1}\n')
    run_train(run_config(demo_model, meta, attempt, "train.max_steps=2"))
    steps = [json.loads(x)["step"] for x in (attempt / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (attempt / "rejected_rows.jsonl").read_text() == ""


def test_resume_logs_each_step_and_bad_row_once(demo_model, demo_data, tmp_path):
    """A run killed after logging steps past its last checkpoint: the resumed run logs those steps (and their bad
    rows) again, so the logs are cut back to where the checkpoint was taken."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    ann = data / "annotations" / "shape_colour.jsonl"
    ann.write_text("\n".join(["{broken", *ann.read_text().splitlines()[1:]]) + "\n")
    meta = data / "meta.json"
    straight = tmp_path / "straight"
    run_train(run_config(demo_model, meta, straight, "train.max_steps=24", "train.save_steps=8"))
    killed = tmp_path / "killed"
    run_train(run_config(demo_model, meta, killed, "train.max_steps=24", "train.save_steps=8"))
    for name in ("checkpoint-24", "final"):  # as if killed after logging step 24, before saving it
        shutil.rmtree(killed / name)
    state = json.loads((killed / "checkpoint-16" / "trainer_state.json").read_text())
    assert 0 < state["log_bytes"]["metrics.jsonl"] < (killed / "metrics.jsonl").stat().st_size
    run_train(run_config(demo_model, meta, killed, "train.max_steps=24", "train.save_steps=8"), resume=True)

    def logged(run):
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"], m["skipped_rows"]) for m in metrics], (run / "rejected_rows.jsonl").read_text()

    assert logged(killed) == logged(straight)
    assert [m[0] for m in logged(killed)[0]] == list(range(1, 25))
    assert logged(killed)[1].count('"line": 1,') == 1


def test_lora_reference_is_the_model_with_adapters_off(demo_model, demo_data, tmp_path):
    from mpo.train.recipe import reference_scores

    run = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "model.lora.r=4",
                           "model.lora.target_modules=[q_proj,v_proj]"))
    assert run.reference is None
    batch, _ = next(iter(run.loader))
    policy = run.scorer(batch)
    ref = reference_scores(run, batch)
    # LoRA's B matrices start at zero: before any step the adapted model equals the base model
    torch.testing.assert_close(policy.chosen_logps, ref.chosen_logps)
    trainable = sum(p.numel() for p in run.scorer.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in run.scorer.parameters()) // 5
    adapted = [n for n, _ in run.scorer.named_parameters() if "lora_" in n]
    assert adapted and all("language_model" in n for n in adapted)  # never the vision tower's q_proj/v_proj


def test_lora_with_drop_path_is_refused(demo_model, demo_data, tmp_path):
    """With LoRA the reference is the policy with its adapters off: drop path (the 8B+ presets) made it random
    (rewards already non-zero at step 1)."""
    with pytest.raises(TrainingError, match=r"model.lora.r=4 with model.drop_path_rate=0.1: the LoRA reference is "
                                            r"the model with its adapters off.*set model.drop_path_rate=0$"):
        setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "model.lora.r=4",
                         "model.drop_path_rate=0.1"))


def test_global_batch_size_derives_accumulation(demo_model, demo_data, tmp_path):
    run = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "train.global_batch_size=8"))
    assert run.cfg.train.gradient_accumulation_steps == 2
    with pytest.raises(TrainingError, match="global_batch_size=6 is not a multiple"):
        setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run2", "train.global_batch_size=6"))


def test_freeze_flags(demo_model, demo_data, tmp_path):
    run = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "model.freeze_backbone=true",
                           "model.freeze_mlp=true"))
    model = run.scorer.model
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_required_meta(demo_model, tmp_path):
    cfg = run_config(demo_model, "", tmp_path / "run")
    with pytest.raises(ConfigError, match="data.meta_path: required"):
        run_train(cfg)


def test_frozen_tower_with_trained_projector_is_shared_too(demo_model, demo_data, tmp_path):
    """Tower frozen, projector trained (policy and reference projectors differ after step 1): the tower runs once
    per micro-batch, each model runs its own projector on its output, and the run equals the unshared one."""
    frozen = ("model.freeze_backbone=true", "train.learning_rate=1e-3", "train.lr_scheduler=constant",
              "train.warmup_steps=0", "train.warmup_ratio=0")
    run_a = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "a", *frozen))
    assert run_a.share_vision == "tower"
    calls = []
    run_a.scorer.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    run_a.reference.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    train(run_a)
    run_b = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "b", *frozen))
    run_b.share_vision = ""
    train(run_b)
    assert 1 <= len(calls) <= 3  # one tower pass per micro-batch (3 steps of 4 pairs), not two
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)
    projector = "multi_modal_projector"
    pa = {n: p for n, p in run_a.scorer.model.named_parameters() if projector in n}
    pb = dict(run_b.scorer.model.named_parameters())
    assert pa and all(torch.allclose(p, pb[n], atol=1e-6) for n, p in pa.items())
    ref_projector = next(p for n, p in run_a.reference.model.named_parameters() if projector in n)
    assert not torch.allclose(next(iter(pa.values())), ref_projector)  # the projectors really differ


def test_qwen2_5_vl_frozen_tower_with_trained_merger_is_shared(demo_data, tmp_path):
    """Qwen2.5-VL, tower frozen and merger (its projector) trained: the vision blocks run once per micro-batch for
    both models, each model's merger runs on their output, and the run equals the unshared one."""
    from mpo.data.demo import demo_corpus
    from mpo.models.tiny import build_tiny

    model = build_tiny(tmp_path / "qwen", "qwen2_5_vl", corpus=demo_corpus(demo_data))
    frozen = ("model.freeze_backbone=true",)
    run_a = setup(run_config(model, demo_data / "meta.json", tmp_path / "a", *frozen))
    assert run_a.share_vision == "tower"
    calls = []
    for m in (run_a.scorer.model, run_a.reference.model):
        m.model.visual.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    train(run_a)
    run_b = setup(run_config(model, demo_data / "meta.json", tmp_path / "b", *frozen))
    run_b.share_vision = ""
    train(run_b)
    assert 1 <= len(calls) <= 3  # one pass of the blocks per micro-batch (3 steps of 4 pairs), not two
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)
    merger_a = {n: p for n, p in run_a.scorer.model.named_parameters() if "visual.merger" in n}
    merger_b = dict(run_b.scorer.model.named_parameters())
    assert merger_a and all(torch.allclose(p, merger_b[n], atol=1e-6) for n, p in merger_a.items())
    ref_merger = dict(run_a.reference.model.named_parameters())
    assert any(not torch.allclose(p, ref_merger[n]) for n, p in merger_a.items())  # the mergers really differ


def test_frozen_vision_is_computed_once_for_policy_and_reference(demo_model, demo_data, tmp_path):
    """With vision tower and projector frozen, policy and reference share one vision pass per pair: same run."""
    frozen = ("model.freeze_backbone=true", "model.freeze_mlp=true")
    run_a = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "a", *frozen))
    assert run_a.share_vision
    calls = []
    vision = run_a.scorer.model.model.vision_tower
    vision.register_forward_hook(lambda *a: calls.append(1))
    train(run_a)
    run_b = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "b", *frozen))
    run_b.share_vision = False
    train(run_b)
    steps_with_images = 3  # every demo micro-batch of 4 pairs here holds images
    assert 1 <= len(calls) <= steps_with_images  # one pass per micro-batch, not two
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


def test_loader_workers_train_like_in_process_loading(demo_model, demo_data, tmp_path):
    """data.num_workers=2 (worker processes decode; the presets use 8) gives the run that in-process loading gives:
    the same batches in the same order, so the same losses and weights."""
    from safetensors.torch import load_file

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        run_train(run_config(demo_model, demo_data / "meta.json", out, "train.max_steps=4", f"data.num_workers={workers}"))
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[workers] = losses, load_file(next((out / "final").glob("*.safetensors")))
    assert runs[2][0] == runs[0][0]
    assert all(torch.equal(runs[2][1][k], v) for k, v in runs[0][1].items())


def test_ipo_trains_with_each_answers_token_count(demo_model, demo_data, tmp_path):
    """ipo averages each answer's log-ratio by its token count: the loop passes them (it could never train)."""
    run = setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "loss.loss_types=[ipo,sft]",
                           "loss.loss_weights=[1.0,1.0]", "train.max_steps=2"))
    batch, _ = next(iter(run.loader))
    chosen, rejected = batch.answer_lengths()
    by_segment = torch.bincount(batch.segment_ids)
    assert chosen.tolist() == by_segment[0::2].tolist() and rejected.tolist() == by_segment[1::2].tolist()
    assert chosen.min() > 0 and chosen.shape == (batch.num_pairs,)
    result = train(run)
    assert result.steps == 2 and "loss/ipo" in result.last_metrics


def test_a_lora_runs_final_model_is_merged_and_loads_by_path(demo_model, demo_data, tmp_path):
    """final/ of a LoRA run held the adapter alone (no config.json): mpo eval and transformers could not load it.
    It is now the base with the adapter merged in, scoring what base + adapter scores; the adapter is kept in
    final/adapter."""
    from peft import PeftModel

    from mpo.models import load_model
    from mpo.train.forward import PairScorer

    cfg = run_config(demo_model, demo_data / "meta.json", tmp_path / "run", "model.lora.r=4", "train.max_steps=2",
                     "train.learning_rate=1e-2")
    run_train(cfg)
    final = tmp_path / "run" / "final"
    merged = load_model(final).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(load_model(demo_model), final / "adapter").eval()
    batch, _ = next(iter(setup(run_config(demo_model, demo_data / "meta.json", tmp_path / "probe")).loader))
    with torch.no_grad():
        a, b, base = PairScorer(merged)(batch), PairScorer(adapted)(batch), PairScorer(load_model(demo_model))(batch)
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps, atol=1e-4, rtol=1e-5)
    assert (a.chosen_logps - base.chosen_logps).abs().max() > 1e-3  # the adapter did change the model


def test_resume_with_other_adapters_or_frozen_parts_is_refused_and_keeps_the_runs_config(demo_model, demo_data,
                                                                                         tmp_path):
    """--resume with another LoRA alpha was accepted (other losses), with other target modules the saved adapters
    were dropped silently, another rank or a full run resumed as LoRA ended in a traceback; every refused resume
    first rewrote RUN/config.yaml, which mpo eval then read. Now: one line naming the key, config.yaml untouched."""
    meta, run = demo_data / "meta.json", tmp_path / "run"
    lora = ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]", "train.save_steps=1"]
    run_train(run_config(demo_model, meta, run, "train.max_steps=1", *lora))
    before = (run / "config.yaml").read_text()
    for change, named in [("model.lora.alpha=64", "model.lora"), ("model.lora.target_modules=[q_proj]", "model.lora"),
                          ("model.lora.r=0", "model.lora"), ("model.freeze_llm=true", "model.freeze_llm")]:
        with pytest.raises(TrainingError, match=rf"^--resume: .*checkpoint-1 was trained with other model settings "
                                                rf"\({named}: .*\): its weights and optimizer state do not fit"):
            run_train(run_config(demo_model, meta, run, "train.max_steps=2", *lora, change), resume=True)
        assert (run / "config.yaml").read_text() == before, change
    assert run_train(run_config(demo_model, meta, run, "train.max_steps=2", *lora), resume=True).steps == 2


def test_a_lora_adapter_names_its_base_by_an_absolute_path(demo_model, demo_data, tmp_path, monkeypatch):
    """model.path given relative: the adapters in final/adapter and checkpoint-N/model named the base relative
    too, so PEFT and transformers loading them from any other folder went to the Hub and failed."""
    monkeypatch.chdir(Path(demo_model).parent)
    run_train(run_config(Path(demo_model).name, demo_data / "meta.json", tmp_path / "run", "model.lora.r=4",
                         "train.max_steps=1", "train.save_steps=1"))
    for folder in (tmp_path / "run" / "final" / "adapter", tmp_path / "run" / "checkpoint-1" / "model"):
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == str(Path(demo_model).resolve()), folder
