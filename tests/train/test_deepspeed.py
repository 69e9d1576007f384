"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (torchrun, gloo) train like one plain process with the same
global batch; a ZeRO-3 run saves, resumes, and exports the same safetensors as the plain run.

Loss sigmoid + sft (no δ, whose running mean differs between 1 and 2 processes by design). Tolerance 1e-5 on every
weight, as for DDP (tests/train/test_distributed.py), while 4 steps at lr 1e-3 move the weights by about 4e-3.
The residue is summation order (DeepSpeed reduces gradients in buckets and partitions), which Adam amplifies where
a gradient is as small as its ε: with the default ε 1e-8 ZeRO-3 measured 1.6e-5 on one vision weight; with ε 1e-6
(all runs here) ZeRO-2 measured 1.2e-7 and ZeRO-3 4.8e-7.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import BAD, COMMON, DEMO, _env, _free_port, _max_diff, _train, _weights, _with_bad_rows

from mpo.config import load_config
from mpo.train.config import RunConfig
from mpo.train.recipe import TrainingError, run_train
from mpo.train.setup import deepspeed_config

pytest.importorskip("deepspeed")

ZERO2 = str(Path(DEMO).parent / "deepspeed" / "zero2.json")
ZERO3 = str(Path(DEMO).parent / "deepspeed" / "zero3.json")
NO_DELTA = ["loss.loss_types=[sigmoid,sft]", "loss.loss_weights=[0.8,1.0]", "train.adam_epsilon=1e-6"]
# Vision tower and projector frozen: under ZeRO-3 the shared vision pass then runs outside the engine's forward
# (gathered explicitly) and the frozen parameters are partitioned but not optimised; weight decay > 0 checks that
# partitioned matrices still land in the decay group.
FROZEN_VISION = ["model.freeze_backbone=true", "model.freeze_mlp=true", "train.weight_decay=0.1"]


def _untied(demo_model, tmp_path) -> Path:
    """The demo model with its own lm_head (the tiny builder ties it to the embeddings; InternVL3.5 checkpoints
    have a separate one, which PairScorer reads outside lm_head's forward: the case ZeRO-3 must gather for)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "untied"
    shutil.copytree(demo_model, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(out / "model.safetensors")
    embed = weights["language_model.model.embed_tokens.weight"]
    noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1))
    weights["lm_head.weight"] = embed + 0.02 * noise
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _partitioning_zero3(tmp_path) -> str:
    """The preset with every parameter partitioned: its persistence threshold (1e7 elements) is above the tiny
    model's largest weight (93,312), which would leave all of them whole on every rank."""
    cfg = json.loads(open(ZERO3, encoding="utf-8").read())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_all.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_auto_values_come_from_the_run_config_and_a_conflict_names_the_key(tmp_path):
    ds = deepspeed_config(ZERO3, per_device_batch_size=2, accumulation=4, world_size=8, max_grad_norm=0.5,
                          model_dtype="bfloat16")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"], ds["bf16"]["enabled"]) == (2, 4, 64, 0.5, True)
    assert deepspeed_config(ZERO2, per_device_batch_size=1, accumulation=1, world_size=1, max_grad_norm=1.0,
                            model_dtype="float32")["bf16"]["enabled"] == "auto"  # left to accelerate's precision
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**json.loads(open(ZERO2, encoding="utf-8").read()), "gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=8, but the run config gives 4 "
                                         r"\(train.gradient_accumulation_steps\)"):
        deepspeed_config(fixed, per_device_batch_size=2, accumulation=4, world_size=1, max_grad_norm=1.0,
                         model_dtype="float32")


def test_deepspeed_without_a_launcher_says_how_to_start(demo_model, demo_data, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = load_config(RunConfig, DEMO, [f"model.path={demo_model}", f"data.meta_path={demo_data / 'meta.json'}",
                                        f"train.output_dir={tmp_path}", f"train.deepspeed={ZERO2}"])
    with pytest.raises(TrainingError, match="torchrun --nproc_per_node N -m mpo.cli train"):
        run_train(cfg)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_two_processes_equal_one_plain_process(demo_model, demo_data, tmp_path):
    meta = demo_data / "meta.json"
    steps = ["train.max_steps=4", "train.save_steps=2"]
    _train(2, demo_model, meta, tmp_path / "zero2", *NO_DELTA, *steps, f"train.deepspeed={ZERO2}")
    _train(1, demo_model, meta, tmp_path / "plain", *NO_DELTA, *steps, "train.gradient_accumulation_steps=2")
    for folder in ("checkpoint-2/model", "final"):
        ds, plain = _weights(tmp_path / "zero2" / folder), _weights(tmp_path / "plain" / folder)
        assert sorted(ds) == sorted(plain)  # same names: tied lm_head dropped, HF checkpoint keys
        assert _max_diff(ds, plain) < 1e-5
    # DeepSpeed's per-rank optimizer partitions replace optimizer.pt; the checkpoint is written once
    ckpt = tmp_path / "zero2" / "checkpoint-4"
    assert not (ckpt / "optimizer.pt").exists()
    assert sorted(p.name for p in (ckpt / "deepspeed" / "state").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    rows = [json.loads(x) for x in (tmp_path / "zero2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_with_micro_batches_of_bad_rows_equals_one_plain_process(demo_model, demo_data, tmp_path):
    """Broken rows, one pair per micro-batch: a micro-batch without a usable pair runs a usable one with weight 0
    (ranks keep step; engine.step() still comes at the accumulation boundary, where a skipped last micro-batch once
    carried its step's gradients into the next). One process with ZeRO-2 and accumulation 2 equals the plain
    process, which skips such micro-batches. (Not a step without any usable pair: DeepSpeed's Adam steps on its
    zero gradients, docs/launch.md.)"""
    meta = _with_bad_rows(demo_data, tmp_path, BAD[:3])
    args = [*NO_DELTA, "train.per_device_batch_size=1", "train.gradient_accumulation_steps=2", "train.max_steps=12",
            "train.save_steps=0"]
    _train(1, demo_model, meta, tmp_path / "zero2", *args, f"train.deepspeed={ZERO2}", launcher=True)
    _train(1, demo_model, meta, tmp_path / "plain", *args)
    assert _max_diff(_weights(tmp_path / "zero2" / "final"), _weights(tmp_path / "plain" / "final")) < 1e-5
    assert len((tmp_path / "zero2" / "rejected_rows.jsonl").read_text().splitlines()) == 3


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_partitioned_resumes_and_exports_the_plain_weights(demo_model, demo_data, tmp_path):
    """ZeRO-3 with every weight partitioned (policy and the in-loop reference, each its own engine; an untied
    lm_head): 2 steps, save, resume to 4 steps; the gathered exports at steps 2 and 4 equal the plain run's.
    Resuming with another number of processes is refused with the reason."""
    meta, zero3 = demo_data / "meta.json", _partitioning_zero3(tmp_path)
    demo_model = _untied(demo_model, tmp_path)
    run = tmp_path / "zero3"
    _train(2, demo_model, meta, run, *NO_DELTA, *FROZEN_VISION, "train.max_steps=2", "train.save_steps=2",
           f"train.deepspeed={zero3}")
    _train(2, demo_model, meta, run, *NO_DELTA, *FROZEN_VISION, "train.max_steps=4", "train.save_steps=2",
           f"train.deepspeed={zero3}", resume=True)
    _train(1, demo_model, meta, tmp_path / "plain", *NO_DELTA, *FROZEN_VISION, "train.max_steps=4",
           "train.save_steps=2", "train.gradient_accumulation_steps=2")
    for folder in ("checkpoint-2/model", "final"):
        ds, plain = _weights(run / folder), _weights(tmp_path / "plain" / folder)
        assert sorted(ds) == sorted(plain)
        assert _max_diff(ds, plain) < 1e-5
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 2

    # one process (torchrun: DeepSpeed needs a launcher even then) cannot take over two processes' partitions
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           "-m", "mpo.cli", "train", DEMO, f"model.path={demo_model}", f"data.meta_path={meta}",
           f"train.output_dir={run}", *COMMON, *NO_DELTA, *FROZEN_VISION, "train.max_steps=6",
           "train.gradient_accumulation_steps=2", f"train.deepspeed={zero3}", "--resume"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "was written by 2 DeepSpeed processes and this run has 1" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_rank_without_images_keeps_step_with_a_rank_with_images(demo_model, demo_data, tmp_path):
    """One pair per process, the vision tower trained, every weight partitioned: the demo's text-only rows give
    micro-steps where one rank has an image and the other none. Before the vision filler went through the
    backbone like real features, ZeRO-3 hung at step 5 (one rank gathering a vision layer for backward while the
    other reduce-scattered its gradients). Now 8 steps equal one plain process with accumulation 2."""
    meta, zero3 = demo_data / "meta.json", _partitioning_zero3(tmp_path)
    one_pair = ["train.per_device_batch_size=1", "train.max_steps=8", "train.save_steps=0"]
    _train(2, demo_model, meta, tmp_path / "zero3", *NO_DELTA, *one_pair, f"train.deepspeed={zero3}")
    _train(1, demo_model, meta, tmp_path / "plain", *NO_DELTA, *one_pair, "train.gradient_accumulation_steps=2")
    assert _max_diff(_weights(tmp_path / "zero3" / "final"), _weights(tmp_path / "plain" / "final")) < 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_bf16_reference_scores_in_the_policy_dtype(demo_model, demo_data, tmp_path, monkeypatch):
    """Under bf16 DeepSpeed computes the policy with bf16 weights; the in-loop reference copy (not a DeepSpeed
    engine below ZeRO-3) is cast the same way, so at step 1, before any update, every reward is exactly 0 (with an
    fp32 reference the margins were ±1e-5 of rounding)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _train(2, demo_model, demo_data / "meta.json", tmp_path / "bf16", "train.max_steps=1",
           f"train.deepspeed={ZERO2}")
    first = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["loss/sigmoid"] == pytest.approx(0.6931472, abs=1e-6)  # -log σ(0)
