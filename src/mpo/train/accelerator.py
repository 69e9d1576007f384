"""The run's :class:`~accelerate.Accelerator`: plain (DDP under a launcher), or DeepSpeed from ``train.deepspeed``.

Also where the one error type of a run lives (:class:`TrainingError`), since building the accelerator is the first
thing that can refuse a configuration.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from mpo.data.errors import ImageError, RowError, TooLongError
from mpo.train.config import RunConfig
from mpo.train.setup import deepspeed_config

__all__ = ["TrainingError", "counts_on_all_ranks", "end_distributed", "make_accelerator", "accelerator_for", "zero_stage_of", "mean_over_ranks",
           "pairs_on_all_ranks", "mean_over_used_pairs"]

log = logging.getLogger("mpo.train")


class TrainingError(RuntimeError):
    """The run cannot go on (bad data everywhere, a non-finite loss, ...); the message says what to do."""


def make_accelerator() -> Accelerator:
    """Accelerate picks NCCL on GPUs; without a GPU it must be told, or ranks under torchrun run alone (gloo)."""
    return Accelerator(cpu=not torch.cuda.is_available())


def accelerator_for(cfg: RunConfig) -> Accelerator:
    if not cfg.train.deepspeed:
        accelerator = make_accelerator()
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
            # accelerate 1.15 turns FSDP on only for GPU-like devices and silently runs DDP otherwise
            log.warning("accelerate launch asked for FSDP, but accelerate runs FSDP on GPUs only: this run is "
                        "%s (plain data parallel, every process holds the whole model)", accelerator.distributed_type.value)
        return accelerator
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        raise TrainingError(f"train.deepspeed={cfg.train.deepspeed}: DeepSpeed is not installed "
                            "(pip install 'mpo[deepspeed]'), or leave train.deepspeed empty") from None
    # The JSON's "auto" values are filled here (accelerate fills them only inside a Trainer), so the accumulation
    # is needed before the Accelerator exists: torchrun and accelerate launch give the world size in WORLD_SIZE.
    tc = cfg.train
    if "LOCAL_RANK" not in os.environ:  # accelerate starts DeepSpeed's process group only under a launcher
        raise TrainingError(f"train.deepspeed={tc.deepspeed}: start the run with a launcher, also for one process: "
                            "torchrun --nproc_per_node N -m mpo.cli train ... (or accelerate launch)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _derive_accumulation(cfg, world)
    try:
        ds = deepspeed_config(tc.deepspeed, per_device_batch_size=tc.per_device_batch_size,
                              accumulation=tc.gradient_accumulation_steps, world_size=world,
                              max_grad_norm=tc.max_grad_norm, model_dtype=cfg.model.dtype)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    # Accelerate's DeepSpeed path starts the process group with the backend of the device it finds; without a GPU
    # it finds none and counts one process. Naming gloo makes it start DeepSpeed's CPU group (tested on 2 CPUs).
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), kwargs_handlers=handlers)
    if accelerator.num_processes != world:
        raise TrainingError(f"train.deepspeed: {accelerator.num_processes} processes but WORLD_SIZE={world}; start "
                            "the run with torchrun or accelerate launch")
    return accelerator


def zero_stage_of(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run; -1 without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return -1
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def _derive_accumulation(cfg: RunConfig, world_size: int) -> None:
    tc = cfg.train
    if tc.global_batch_size <= 0:
        return
    per_step = tc.per_device_batch_size * world_size
    if tc.global_batch_size % per_step:
        raise TrainingError(f"train.global_batch_size={tc.global_batch_size} is not a multiple of "
                            f"per_device_batch_size × processes = {per_step}")
    derived = tc.global_batch_size // per_step
    if tc.gradient_accumulation_steps not in (1, derived):  # both given: the accumulation would be ignored
        raise TrainingError(f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps} disagrees with "
                            f"train.global_batch_size={tc.global_batch_size}, which gives {derived} for "
                            f"{tc.per_device_batch_size} pairs per device on {world_size} processes: set "
                            "train.global_batch_size=0 to use the accumulation, or drop it")
    tc.gradient_accumulation_steps = derived

def mean_over_ranks(accelerator: Accelerator):
    """The δ reducer of :class:`~mpo.losses.RunningMean` for several processes (None for one)."""
    if accelerator.num_processes == 1:
        return None

    def reduce(x: float | None) -> float | None:
        """Mean over the ranks that had pairs (``None``: this rank had none); ``None`` when no rank had any."""
        t = torch.tensor([x or 0.0, float(x is not None)], device=accelerator.device, dtype=torch.float64)
        total, ranks = accelerator.reduce(t, reduction="sum").tolist()
        return total / ranks if ranks else None

    return reduce


def pairs_on_all_ranks(acc: Accelerator, n_pairs: int) -> int:
    """The pairs all ranks trained on in this step (collective under several processes)."""
    if acc.num_processes == 1:
        return n_pairs
    return int(acc.reduce(torch.tensor([n_pairs], device=acc.device), reduction="sum").item())


def end_distributed() -> None:
    """Wait for every rank, then destroy the process group, before the interpreter exits. Left to exit-time
    destruction, a finished rank of a 2-process ZeRO-3 run on CPU was once killed by ``terminate called without an
    active exception`` (SIGABRT) right after the final export, failing the launch. Call on success only: after an
    error the other ranks may never reach the barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def counts_on_all_ranks(acc: Accelerator, counts: Counter[str]) -> Counter[str]:
    """``counts`` (skipped rows by kind) summed over all ranks (collective under several processes): each rank
    counts the bad rows of its own micro-batches, and the metric and the checkpoint report the run's."""
    if acc.num_processes == 1:
        return Counter(counts)
    kinds = tuple(e.kind for e in (RowError, ImageError, TooLongError))  # one order on every rank
    local = torch.tensor([counts.get(k, 0) for k in kinds], device=acc.device, dtype=torch.int64)
    return Counter({k: int(v) for k, v in zip(kinds, acc.reduce(local, reduction="sum").tolist()) if v})


def mean_over_used_pairs(acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, n_pairs: int,
                         per_rank: int) -> None:
    """Make the accumulated gradients the mean over the pairs this step used on all ranks (collective).

    Micro-batches backpropagate 1 / (``per_rank`` × processes) per pair, so rows dropped as bad would shrink the
    step (the seed replaced them by random rows, and its steps always averaged a full batch): the gradients are
    scaled by full / used. With no pair on any rank the weight-0 stand-ins left zero gradients, which AdamW would
    still step (its moments decay): such a step updates nothing, as in one process, which has no gradients then.
    """
    used = pairs_on_all_ranks(acc, n_pairs)
    full = per_rank * acc.num_processes
    if used == 0:
        optimizer.zero_grad(set_to_none=True)
    elif used != full:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(full / used)
