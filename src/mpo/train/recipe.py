"""``mpo train``: one readable MPO loop on 🤗 Accelerate.

Why a loop and not a ``transformers.Trainer`` subclass: MPO needs per-micro-step state that the Trainer hides
(the BCO shift δ is updated between the forward and the loss, all-reduced across ranks, and checkpointed), a data
position that resumes in O(1), bad rows that are logged rather than crash a worker, and a forward that scores
only completion tokens. A Trainer subclass would override most of ``training_step``, ``_save_checkpoint`` and the
data loader; a ~150-line loop on Accelerate (which still gives DDP, DeepSpeed and FSDP through
``accelerate launch``) reads top to bottom instead.

    setup()  → model, reference, data, optimizer, schedule (and the resumed state)
    train()  → for each optimizer step: accumulate micro-batches (policy forward, reference forward, δ, loss,
               backward) → clip → step → log → checkpoint
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from transformers import get_scheduler

from mpo.config import ConfigError, to_dict
from mpo.data.encode import PairEncoder
from mpo.data.errors import DataError
from mpo.data.meta import read_meta
from mpo.data.mixture import PreferenceMixture
from mpo.data.rejects import RejectedRowLog, handle_bad_row
from mpo.data.system import resolve_system_prompt
from mpo.fsio import atomic_write_text
from mpo.losses import RunningMean, mpo_loss_with_rewards, rewards_mean
from mpo.models import load_model, load_processor
from mpo.train import checkpoint as ckpt
from mpo.train.accelerator import (
    TrainingError,
    _derive_accumulation,
    accelerator_for,
    counts_on_all_ranks,
    mean_over_ranks,
    mean_over_used_pairs,
    zero_stage_of,
)
from mpo.train.attention import refuse_sliding_window
from mpo.train.config import RunConfig
from mpo.train.data import (
    Collator,
    DataPosition,
    EncodedPairs,
    ResumableOrder,
    first_usable,
    prefetch,
    vision_filler,
)
from mpo.train.forward import PairScorer, PairScores, backbone_of, replayable_tower
from mpo.train.metrics import LogWindow, MetricsLogger
from mpo.train.refcache import CachedReference, RefCacheError, fingerprint
from mpo.train.setup import (
    Zero3PairScorer,
    add_lora,
    apply_freezing,
    apply_vision_drop_path,
    claim_folder,
    count_parameters,
    deepspeed_reference,
    disable_dropout,
    freeze_train_mode,
    gathered_vision,
    keep_used_weight_conversions,
    load_reference,
    local_paths_absolute,
    param_ndim,
    refuse_replacing_given_config,
    release_folder,
    require_usable_rows,
    set_seed,
    start_afresh,
)

__all__ = ["TrainingError", "TrainResult", "run_train"]

log = logging.getLogger("mpo.train")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    skipped_rows: int = 0


@dataclass
class Run:
    """Everything ``setup`` builds; ``train`` only reads it (and steps optimizer/scheduler/δ)."""

    cfg: RunConfig
    accelerator: Accelerator
    scorer: torch.nn.Module  # DDP/DeepSpeed-wrapped PairScorer
    reference: torch.nn.Module | None  # PairScorer (a DeepSpeed inference engine around one under ZeRO-3)
    cached_reference: CachedReference | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    order: ResumableOrder
    total_steps: int
    delta: RunningMean
    rejects: RejectedRowLog
    metrics: MetricsLogger
    start_step: int = 0
    config_text: str = ""
    share_vision: str = ""  # "features" (tower + projector frozen), "tower" (tower frozen), "": none
    processor: Any = None  # saved with every checkpoint and final/
    window: LogWindow = field(default_factory=LogWindow)  # the steps since the last log line (in checkpoints)


# ----------------------------------------------------------------------------------------------------------------
# setup


def setup(cfg: RunConfig, *, resume: bool = False, config_path: str | Path | None = None) -> Run:
    """``config_path``: the file ``cfg`` was read from, if any (it must not be the run's own config.yaml)."""
    cfg.require_paths()
    accelerator = accelerator_for(cfg)
    _derive_accumulation(cfg, accelerator.num_processes)
    zero_stage = zero_stage_of(accelerator)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        claim_folder(out, "train.output_dir")
    accelerator.wait_for_everyone()
    config_text = yaml.safe_dump(local_paths_absolute(to_dict(cfg)), sort_keys=False, allow_unicode=True)
    refuse_replacing_given_config(out, config_path)  # before anything in the folder changes
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is None:
        start_afresh(out, accelerator, resume)
    else:  # the weights to load must be the checkpoint's kind: the same adapters and frozen parts
        ckpt.require_same_model(latest, yaml.safe_load(config_text)["model"])
    set_seed(cfg.train.seed)

    processor = load_processor(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype,
                       attn_implementation=cfg.model.attn_implementation)
    keep_used_weight_conversions(model)  # ZeRO-3 loads record every renaming; export must reverse only the used
    disable_dropout(model)
    apply_freezing(model, cfg.model)
    tc = cfg.train
    if tc.pair_layout == "shared":  # now, not at the first forward
        refuse_sliding_window(backbone_of(model))
    # several processes: every micro-batch runs the vision modules, first (PairScorer.vision_first, Collator)
    multi = accelerator.num_processes > 1 and hasattr(backbone_of(model), "get_image_features")
    scorer_type = functools.partial(Zero3PairScorer if zero_stage == 3 else PairScorer, vision_first=multi)
    reference = (None if cfg.model.lora.r > 0 or tc.ref_cache
                 else scorer_type(load_reference(cfg.model, model, zero_stage)))
    apply_vision_drop_path(model, cfg.model.drop_path_rate)  # after the copy: the reference stays deterministic
    if reference is not None and zero_stage < 3:
        reference.to(accelerator.device)
    if cfg.model.lora.r > 0:
        if cfg.model.drop_path_rate > 0:  # the 8B+ presets set 0.1 or 0.4
            raise TrainingError(f"model.lora.r={cfg.model.lora.r} with model.drop_path_rate="
                                f"{cfg.model.drop_path_rate}: the LoRA reference is the model with its adapters "
                                "off, and drop path would make its scores random; set model.drop_path_rate=0")
        model = add_lora(model, cfg.model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.dtype == "bfloat16" and accelerator.distributed_type.value not in ("DEEPSPEED", "FSDP"):
        log.warning("model.dtype=bfloat16 without DeepSpeed/FSDP: AdamW updates smaller than bf16's resolution "
                    "are lost (at lr 2e-7, nearly all); use model.dtype=float32 with ACCELERATE_MIXED_PRECISION=bf16, "
                    "or DeepSpeed (docs/launch.md#precision)")
    trainable, total = count_parameters(model)
    if not trainable:
        raise TrainingError("nothing to train: model.freeze_backbone, freeze_mlp and freeze_llm freeze every "
                            "parameter (or model.lora.r > 0 targets no module)")
    log.info("model %s: %.2f M parameters, %.2f M trainable", cfg.model.path, total / 1e6, trainable / 1e6)

    specs = read_meta(cfg.data.meta_path)
    system = resolve_system_prompt(processor, cfg.data.system_prompt)
    cached = CachedReference(tc.ref_cache, fingerprint(cfg, specs, processor, system)) if tc.ref_cache else None
    mixture = PreferenceMixture(specs, seed=cfg.data.seed, max_dynamic_patch=cfg.data.max_dynamic_patch,
                                max_image_pixels=cfg.data.max_image_pixels)
    log.info("data: %d pairs per epoch (%s)", len(mixture),
             ", ".join(f"{name} {n}" for name, n in mixture.dataset_sizes.items()))
    encoder = PairEncoder(processor, max_length=cfg.data.max_length, system_prompt=system)
    log.info("system message of rows without one: %s", "none" if encoder.system_prompt is None
             else repr(encoder.system_prompt))
    dataset = EncodedPairs(mixture, encoder, augment_seed=cfg.data.seed)
    rejects = RejectedRowLog(out / ckpt.REJECTED_ROWS)
    if latest is None:  # a resumed run checked its data when it started
        require_usable_rows(dataset, cfg, rejects)

    order = ResumableOrder(len(dataset), per_device=tc.per_device_batch_size, accumulation=tc.gradient_accumulation_steps,
                           world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.data.seed)
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_train_epochs * order.steps_per_epoch))
    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if param_ndim(p) >= 2]
    no_decay = [p for p in params if param_ndim(p) < 2]  # biases and norms, as HF Trainer does
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if zero_stage >= 0:  # DeepSpeed drops empty groups (LoRA has no 1-D ones); the schedule must see the same list
        groups = [g for g in groups if g["params"]]
    # fused: one kernel over all tensors instead of a Python loop per tensor (HF Trainer's default optimizer too);
    # DeepSpeed steps its own flat partitions, so it gets the plain one
    optimizer = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  eps=tc.adam_epsilon, fused=zero_stage < 0 and bool(params))
    scorer, optimizer = accelerator.prepare(scorer_type(model), optimizer)
    # After prepare, on the prepared optimizer: with an offloaded optimizer DeepSpeed replaces AdamW by its own
    # CPU Adam, and a schedule built on the AdamW would set learning rates nobody uses
    name = "constant_with_warmup" if tc.lr_scheduler == "constant" else tc.lr_scheduler  # HF's "constant" has none
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if reference is not None and zero_stage >= 0:
        reference = deepspeed_reference(reference, accelerator.deepspeed_config, zero_stage)

    delta, window = RunningMean(all_reduce=mean_over_ranks(accelerator)), LogWindow()
    start_step, position = 0, DataPosition()
    if resume and latest is None:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", out)
    if latest is not None:
        ckpt.require_same_order(latest, order.global_batch, mixture.dataset_sizes, encoder.system_prompt)
        try:
            start_step, position = ckpt.restore_run(latest, accelerator, scorer, optimizer, scheduler, delta, rejects,
                                                    window)
        except (ValueError, RuntimeError, OSError) as exc:  # another engine, or weights of another shape
            raise TrainingError(f"--resume: {latest}: {exc}") from None
        log.info("resumed from %s (step %d, epoch %d)", latest, start_step, position.epoch)
    if accelerator.is_main_process:  # after the resume checks: a refused --resume leaves the run's record alone
        atomic_write_text(out / "config.yaml", config_text)
    order.start = position
    filler = vision_filler(dataset.encoder) if multi else None
    collator = Collator(_pad_id(processor), tc.pair_layout, pack_length=tc.pack_length or None,
                        attn_implementation=cfg.model.attn_implementation, dtype=next(model.parameters()).dtype,
                        vision_filler=filler)
    # its own generator: starting an iterator draws the workers' base seed, and from the global stream that draw
    # came after a resume's restored RNG state but before a fresh run's first step, so drop-path masks differed
    loader = DataLoader(dataset, batch_sampler=order, collate_fn=collator, num_workers=cfg.data.num_workers,
                        persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.data.seed))
    metrics = MetricsLogger(out, tc.report_to, enabled=accelerator.is_main_process)
    # A frozen, deterministic vision tower + projector gives the policy and the reference copy identical image
    # features: compute them once per pair for both (one vision pass per pair instead of TRL's four). With only
    # the tower frozen, the tower's output is shared and each model runs its own projector on it.
    share_vision = ""
    if reference is not None and cfg.model.freeze_backbone and cfg.model.drop_path_rate == 0:
        backbone = backbone_of(model)
        if cfg.model.freeze_mlp and hasattr(backbone, "get_image_features"):
            share_vision = "features"
        elif replayable_tower(backbone) and zero_stage != 3:
            share_vision = "tower"  # ZeRO-3 would have to gather the tower outside the engine's forward
    return Run(cfg, accelerator, scorer, reference, cached, optimizer, scheduler, loader, order, total_steps, delta,
               rejects, metrics, start_step, config_text, share_vision, processor, window)


def _pad_id(processor) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


# ----------------------------------------------------------------------------------------------------------------
# train


def reference_scores(run: Run, batch, image_features=None) -> PairScores:
    """Reference log-probs: the cache, the frozen copy, or the policy with its LoRA adapters switched off."""
    if run.cached_reference is not None:
        chosen, rejected = run.cached_reference.lookup(batch.sources, run.accelerator.device)
        return PairScores(chosen, rejected, torch.zeros((), device=chosen.device))
    with torch.no_grad():
        if run.reference is not None:
            return run.reference(batch, image_features)
        # DeepSpeed: through the engine's forward, which gathers ZeRO-3 partitions; DDP: the bare module, as the
        # DDP wrapper needs no no-grad forward
        policy = run.scorer if zero_stage_of(run.accelerator) >= 0 else run.accelerator.unwrap_model(run.scorer)
        with run.accelerator.unwrap_model(run.scorer).model.disable_adapter():
            return policy(batch)


def train(run: Run) -> TrainResult:
    batches = prefetch(run.loader, run.cfg.data.prefetch_batches)  # the next micro-batches decode meanwhile
    try:
        return _train_steps(run, batches)
    finally:  # also on an error: a prefetch thread still running torch ops at exit aborts the interpreter
        getattr(batches, "close", lambda: None)()


def _train_steps(run: Run, batches) -> TrainResult:
    cfg, acc, tc = run.cfg, run.accelerator, run.cfg.train
    accum = tc.gradient_accumulation_steps
    # Several processes (DDP all-reduce, ZeRO gathers, the δ reduction) or DeepSpeed (engine.step at the
    # accumulation boundary) need every rank to run every micro-batch: one whose rows were all bad runs a usable
    # pair with weight 0 instead of being skipped (a skip hung the other ranks in their collectives).
    lockstep = acc.num_processes > 1 or zero_stage_of(acc) >= 0
    spare = None  # this rank's last usable micro-batch: the weight-0 stand-in
    step, last, window = run.start_step, {}, run.window
    run.scorer.train()
    freeze_train_mode(acc.unwrap_model(run.scorer).model, cfg.model)
    t_start = time.perf_counter()
    while step < run.total_steps:
        t0, sums, n_pairs, n_tokens = time.perf_counter(), {}, 0, 0
        # the rate this step uses, as HF logs it; read here because DeepSpeed's engine steps the schedule inside
        # the last backward, and after scheduler.step() it is the next step's
        lr = run.scheduler.get_last_lr()[0]
        for micro in range(accum):
            batch, errors = next(batches)
            for err in errors:
                handle_bad_row(err, cfg.data.on_bad_row, run.rejects)
            weight = 1.0
            if batch is None:  # every pair of this micro-batch was bad; it was logged
                if not lockstep:
                    continue
                if spare is None:  # the rank's first micro-batch: any usable pair of the data
                    spare = run.loader.collate_fn([first_usable(run.loader.dataset)])[0]
                batch, weight = spare, 0.0
            spare = batch
            batch = batch.to(acc.device)
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(run.scorer)
            with sync:
                feats = None
                if run.share_vision and ("pixel_values" in batch.model_inputs or batch.vision_filler is not None):
                    with torch.no_grad(), gathered_vision(acc.unwrap_model(run.scorer).model, zero_stage_of(acc)):
                        bare = acc.unwrap_model(run.scorer)
                        feats = bare.image_features(batch) if run.share_vision == "features" else \
                            bare.tower_outputs(batch)
                policy = run.scorer(batch, feats)
                ref = reference_scores(run, batch, feats)
                beta = cfg.loss.beta
                chosen_r = beta * (policy.chosen_logps - ref.chosen_logps).detach()
                rejected_r = beta * (policy.rejected_logps - ref.rejected_logps).detach()
                batch_reward = rewards_mean(chosen_r, rejected_r)
                if not math.isfinite(batch_reward) or not torch.isfinite(policy.chosen_nll):
                    _nonfinite(step + 1, "the loss is nan" if math.isnan(batch_reward) else "the loss is not finite",
                               batch, tc.output_dir)
                run.delta.update(batch_reward if weight else None)  # δ includes the current batch (InternVL)
                out = mpo_loss_with_rewards(
                    policy.chosen_logps, policy.rejected_logps, ref.chosen_logps, ref.rejected_logps,
                    policy.chosen_nll, beta=beta, loss_types=cfg.loss.loss_types, loss_weights=cfg.loss.loss_weights,
                    delta=run.delta.value, **_lengths(batch, cfg.loss.loss_types))
                if not torch.isfinite(out.loss):
                    _nonfinite(step + 1, f"the loss is {out.loss.item()}", batch, tc.output_dir)
                # per pair 1 / (per-device batch × accumulation × processes): a micro-batch that lost rows adds
                # less, and the step is brought back to the mean over its usable pairs below
                share = batch.num_pairs / tc.per_device_batch_size
                _backward(run, out.loss * weight * share, last_micro=micro == accum - 1)
            for k, v in out.metrics.items():  # a stand-in adds 0 but its keys: the ranks reduce equal lists
                sums[k] = sums.get(k, 0.0) + v * batch.num_pairs * weight
            n_pairs += int(batch.num_pairs * weight)
            n_tokens += int(batch.num_tokens * weight)
        if zero_stage_of(acc) < 0:  # DeepSpeed stepped inside its engine at the boundary (docs/launch.md)
            mean_over_used_pairs(acc, run.scorer, run.optimizer, n_pairs, tc.per_device_batch_size * accum)
        grad_norm = acc.clip_grad_norm_(run.scorer.parameters(), tc.max_grad_norm) if tc.max_grad_norm > 0 else None
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(sums, n_pairs, n_tokens, time.perf_counter() - t0)
        if step % tc.logging_steps == 0 or step == run.total_steps:  # the window's mean over all ranks' pairs
            last = window.close(acc)
            last.update({"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr,
                         "skipped_rows": counts_on_all_ranks(acc, run.rejects.counts).total(),
                         "delta": run.delta.value, "epoch": _epoch(run, step)})
            run.metrics.log(step, last)
        if (tc.save_steps and step % tc.save_steps == 0) or step == run.total_steps:
            save(run, step)
    skipped = counts_on_all_ranks(acc, run.rejects.counts).total()
    return TrainResult(Path(tc.output_dir), step, time.perf_counter() - t_start, last, skipped)


def _lengths(batch, loss_types: list[str]) -> dict[str, torch.Tensor]:
    """The answers' token counts, for the loss types that average by them (``ipo``)."""
    if "ipo" not in loss_types:
        return {}
    chosen, rejected = batch.answer_lengths()
    return {"chosen_lengths": chosen, "rejected_lengths": rejected}


def _backward(run: Run, loss: torch.Tensor, *, last_micro: bool) -> None:
    """Backward of one micro-batch's mean loss; gradients of the optimizer step are the mean over its micro-batches.

    DeepSpeed divides by its ``gradient_accumulation_steps`` (the same number) itself, reduces gradients across
    ranks and runs clip + optimizer step + zero_grad inside ``engine.step()`` at the accumulation boundary; accelerate
    marks that boundary only inside ``accumulate()``, which this loop does not use, so it is marked here.
    """
    if zero_stage_of(run.accelerator) >= 0:
        engine = run.scorer
        engine.set_gradient_accumulation_boundary(last_micro)
        engine.backward(loss)
        if last_micro:
            engine.step()
    else:
        run.accelerator.backward(loss / run.cfg.train.gradient_accumulation_steps)


def _nonfinite(step: int, what: str, batch, output_dir: str) -> None:
    raise TrainingError(f"step {step}: {what} (pairs from {batch.sources[:4]}); stopped without saving, the last "
                        f"good checkpoint in {output_dir} is intact (lower train.learning_rate, check the data)")


def _epoch(run: Run, step: int) -> float:
    start = run.order.start
    return start.epoch + (start.step_in_epoch + step - run.start_step) / run.order.steps_per_epoch


def _position(run: Run, step: int) -> DataPosition:
    absolute = run.order.start.epoch * run.order.steps_per_epoch + run.order.start.step_in_epoch
    absolute += step - run.start_step
    return DataPosition(absolute // run.order.steps_per_epoch, absolute % run.order.steps_per_epoch)


def _model_state(run: Run) -> dict[str, torch.Tensor] | None:
    """The full model weights for export when the weights are sharded, gathered on rank 0 (ZeRO-3: its 16-bit
    gather, i.e. the weights the engine computes with). Collective: every rank calls it. ``None`` when every rank
    holds the full weights (plain, DDP, ZeRO-0/1/2): ``save_pretrained`` then reads the unwrapped model itself."""
    acc = run.accelerator
    model = acc.unwrap_model(run.scorer).model
    if acc.distributed_type == DistributedType.FSDP:
        return ckpt.full_weights(model)
    if zero_stage_of(acc) != 3:
        return None
    state = acc.get_state_dict(run.scorer)  # PairScorer keys: "model.<HF key>"; empty on ranks > 0
    if not acc.is_main_process:
        return None
    return ckpt.retie(model, {k.removeprefix("model."): v for k, v in state.items()})


def save(run: Run, step: int) -> None:
    acc = run.accelerator
    acc.wait_for_everyone()
    out = Path(run.cfg.train.output_dir)
    weights = _model_state(run)
    deepspeed = zero_stage_of(acc) >= 0
    if deepspeed:  # every rank writes its optimizer (and, under ZeRO-3, weight) partition into the same folder
        if acc.is_main_process:
            ckpt.start_checkpoint(out, step)
        acc.wait_for_everyone()
        ckpt.save_deepspeed_state(out, step, run.scorer)
        acc.wait_for_everyone()
    model = acc.unwrap_model(run.scorer).model
    optimizer_state = None if deepspeed else ckpt.full_optimizer_state(model, run.optimizer)  # collective (FSDP2)
    skipped = counts_on_all_ranks(acc, run.rejects.counts)  # collective: every rank's bad rows
    window = run.window.state(acc)  # collective
    if acc.is_main_process:
        pos = _position(run, step)
        state = {"position": {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch},
                 "delta": run.delta.state_dict(), "total_steps": run.total_steps,
                 "skipped_rows": skipped.total(), "skipped_rows_by_kind": dict(skipped),
                 "world_size": acc.num_processes, "global_batch": run.order.global_batch,
                 "pairs_by_dataset": run.loader.dataset.mixture.dataset_sizes,
                 "system_prompt": run.loader.dataset.encoder.system_prompt,
                 "log_bytes": ckpt.log_sizes(out), "log_window": window}
        ckpt.save_checkpoint(out, step, model=model, optimizer_state=optimizer_state, scheduler=run.scheduler,
                             trainer_state=state, config_text=run.config_text, state_dict=weights,
                             started=deepspeed, processor=run.processor)
        ckpt.prune_checkpoints(out, run.cfg.train.save_total_limit)
    acc.wait_for_everyone()


def run_train(cfg: RunConfig, *, resume: bool = False, config_path: str | Path | None = None) -> TrainResult:
    """Set up and train; writes checkpoints and the final model under ``cfg.train.output_dir``."""
    try:
        try:
            run = setup(cfg, resume=resume, config_path=config_path)
        except ConfigError:
            raise
        except (DataError, RefCacheError, ValueError) as exc:  # the model, data or settings cannot make this run
            raise TrainingError(str(exc)) from exc
        try:
            result = train(run)
        except DataError as exc:  # on_bad_row: error
            raise TrainingError(f"{exc} (data.on_bad_row=error stops at the first bad row)") from None
        finally:
            run.rejects.close()
            run.metrics.close()
        export_final(run)
        return result
    finally:
        release_folder(Path(cfg.train.output_dir))


def export_final(run: Run) -> None:
    """``output_dir/final``: the trained model + processor, loadable by path (LoRA: merged, adapter in
    ``final/adapter``; under ZeRO-3 or FSDP2 the adapter alone)."""
    acc = run.accelerator
    weights = _model_state(run)  # on every rank: gathering ZeRO-3 partitions is collective
    if not acc.is_main_process:
        return
    out = Path(run.cfg.train.output_dir) / "final"
    model = acc.unwrap_model(run.scorer).model
    if hasattr(model, "merge_and_unload") and weights is None:
        # LoRA: the adapter alone (PEFT's format) in final/adapter, and final/ the base with the adapter merged in,
        # so that final/ loads by path like a full fine-tune (mpo eval, transformers, vLLM). The run ends here.
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, state_dict=weights)
    run.processor.save_pretrained(out)
