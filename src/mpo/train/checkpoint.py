"""Checkpoints that a crash cannot tear, and that restore a run exactly.

A checkpoint is a folder ``checkpoint-<step>`` holding the model (``save_pretrained``: safetensors; only the
adapter with LoRA), ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain containers only, loaded back with
``torch.load(weights_only=True)``: no pickle of arbitrary objects), ``rng.pt`` (torch, CUDA, Python and NumPy RNG
states as tensors/lists), and ``trainer_state.json`` (step, data position, the BCO shift δ, metrics). It is
written into ``.tmp-checkpoint-<step>`` and renamed into place only once complete, so an interrupted save leaves
the previous checkpoint untouched and never a half-written one that resume would pick.

``optimizer.pt`` holds the full optimizer state keyed by parameter name (torch's ``get_optimizer_state_dict`` with
``full_state_dict``): under FSDP2 each rank's shards are gathered to rank 0 (``optimizer.state_dict()`` would hold
rank 0's shard only), and on resume rank 0 reads the file and broadcasts, each rank keeping its own shard. Keyed by
name, not by position, the same file resumes under FSDP2, DDP or one process, with any number of processes.

Under DeepSpeed (any ZeRO stage) ``optimizer.pt`` is replaced by ``deepspeed/``: DeepSpeed's own checkpoint, one
optimizer-state file per rank (ZeRO partitions the fp32 master weights and Adam moments), written by every rank
into the same temporary folder. ``model/`` still holds the full weights (gathered on rank 0 under ZeRO-3), so a
checkpoint loads with ``from_pretrained`` whatever engine wrote it; resume restores weights and optimizer from
``deepspeed/`` and needs the same number of processes. DeepSpeed's files are pickles (``torch.load`` with
``weights_only=False`` inside DeepSpeed): resume only from checkpoints you wrote.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType

from mpo.fsio import atomic_write_json, replace_dir
from mpo.train.data import DataPosition
from mpo.train.metrics import METRICS_FILE

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mpo.data.rejects import RejectedRowLog

__all__ = ["save_checkpoint", "start_checkpoint", "save_deepspeed_state", "load_deepspeed_state",
           "full_optimizer_state", "full_weights", "retie", "load_full_weights", "latest_checkpoint",
           "load_training_state", "rng_state", "set_rng_state", "prune_checkpoints"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_DS_DIR, _DS_TAG = "deepspeed", "state"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": list(py_state[1]),
        "python_version": py_state[0],
        "python_gauss": [] if py_state[2] is None else [py_state[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    gauss = state["python_gauss"][0] if state["python_gauss"] else None
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"]), gauss))
    npd = state["numpy"]
    np.random.set_state(("MT19937", npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"], npd["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _multi_process() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer state of ``model``'s parameters, keyed by parameter name, with full (unsharded) tensors on the
    CPU; ``None`` on ranks other than 0. Collective: every rank calls it (FSDP2 gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    multi = _multi_process()
    state = get_optimizer_state_dict(model, _plain(optimizer), options=_options(cpu_offload=multi))
    return state if not multi or torch.distributed.get_rank() == 0 else None


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of a sharded (FSDP2) ``model`` on rank 0's CPU, tied names re-tied (:func:`retie`); ``None``
    on other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=_multi_process()))
    return retie(model, state) if state else None


def retie(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the names of one shared parameter (lm_head = embed_tokens) pointing at one tensor again.

    A gather returns a separate copy per name; ``save_pretrained`` drops a tied alias only when both names share
    storage, so without this a sharded run's checkpoint would hold a key a plain run's has not."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        main = first.setdefault(id(p), name)
        if main != name and main in state and name in state:
            state[name] = state[main]
    return state


def load_full_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Load full weights into ``model``, sharded (FSDP2) or not. With several processes only rank 0 passes the
    weights (others ``None``) and they are broadcast, so a large model is read from disk once per node, not per
    process. Collective under several processes."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    multi = _multi_process()
    set_model_state_dict(model, state_dict or {}, options=_options(broadcast_from_rank0=multi))


def _load_optimizer_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    multi = _multi_process()
    state: dict[str, Any] = {}
    if not multi or torch.distributed.get_rank() == 0:
        state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        keys = list(state.get("state", {}))
        if keys and not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{path / 'optimizer.pt'} holds the optimizer state by parameter position (written "
                             "by an older mpo); resume that run with the mpo that started it")
    set_optimizer_state_dict(model, _plain(optimizer), state, options=_options(broadcast_from_rank0=multi))


def _plain(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (whose ``step`` would skip steps between accumulation
    boundaries, and torch's loader steps it once to create the state it then fills)."""
    return getattr(optimizer, "optimizer", optimizer)


def _tmp(output_dir: Path, step: int) -> Path:
    return output_dir / f".tmp-checkpoint-{step}"


def start_checkpoint(output_dir: Path, step: int) -> Path:
    """Create an empty ``.tmp-checkpoint-<step>`` (removing one left by a kill); rank 0, before other ranks write."""
    tmp = _tmp(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_deepspeed_state(output_dir: Path, step: int, engine: Any) -> None:
    """Every rank: DeepSpeed's checkpoint (its optimizer partition, under ZeRO-3 its weight partition) into the
    folder that :func:`start_checkpoint` made."""
    engine.save_checkpoint(str(_tmp(output_dir, step) / _DS_DIR), tag=_DS_TAG, save_latest=False)


def load_deepspeed_state(path: Path, engine: Any, world_size: int) -> None:
    """Every rank: weights and optimizer state of ``engine`` from checkpoint ``path`` (same number of processes)."""
    if not (path / _DS_DIR / _DS_TAG).is_dir():
        raise ValueError(f"{path} was written without DeepSpeed (no {_DS_DIR}/ folder); resume it with "
                         "train.deepspeed= (empty), or start this DeepSpeed run in a new train.output_dir")
    written = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("world_size")
    if written is not None and written != world_size:  # DeepSpeed itself fails with a tensor size mismatch
        raise ValueError(f"{path} was written by {written} DeepSpeed processes and this run has {world_size}: ZeRO "
                         f"partitions the optimizer state per process, so resume with {written} processes")
    load_path, _ = engine.load_checkpoint(str(path / _DS_DIR), tag=_DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"{path / _DS_DIR}: DeepSpeed could not load this checkpoint (see its log above; ZeRO "
                         "resumes with the number of processes that wrote it)")


def save_checkpoint(output_dir: Path, step: int, *, model: torch.nn.Module, optimizer_state: dict[str, Any] | None,
                    scheduler: Any, trainer_state: dict[str, Any], config_text: str,
                    rng: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                    started: bool = False, processor: Any = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (rank 0); returns its path.

    ``optimizer_state``: :func:`full_optimizer_state`; ``None`` with ``started=True``: DeepSpeed already wrote the
    optimizer state into the folder (:func:`save_deepspeed_state`). ``state_dict``: the full weights when
    ``model``'s own are sharded (gathered by the caller). ``processor``: saved beside the weights, so that
    ``checkpoint-<step>/model`` loads by path (``mpo eval``, ``mpo models info``) like ``final/``.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = _tmp(output_dir, step) if started else start_checkpoint(output_dir, step)
    if optimizer_state is None and not (tmp / _DS_DIR).is_dir():
        raise ValueError(f"{tmp}: no optimizer state (neither an optimizer state nor a {_DS_DIR}/ folder)")
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(tmp / "model")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
    atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
    replace_dir(tmp, final)
    return final


def _complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and ((path / "optimizer.pt").is_file()
                                                        or (path / _DS_DIR / _DS_TAG).is_dir())


def is_checkpoint(path: Path) -> bool:
    """``path`` is a ``checkpoint-<step>`` folder (complete or not)."""
    return bool(_NAME.match(path.name)) and path.is_dir()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder, or None."""
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and _complete(p)]
    return max(found)[1] if found else None


def load_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from ``path``; returns ``trainer_state.json``. ``optimizer=None``:
    DeepSpeed restored it (:func:`load_deepspeed_state`). Collective under several processes (rank 0 reads the
    optimizer state and broadcasts it)."""
    if optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise ValueError(f"{path} was written by DeepSpeed (no optimizer.pt, a {_DS_DIR}/ folder); resume it "
                             "with the same train.deepspeed and number of processes")
        _load_optimizer_state(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps everything)."""
    if keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# the run folder's logs: appended to as the run goes; a checkpoint records how far (trainer_state "log_bytes")

REJECTED_ROWS = "rejected_rows.jsonl"
LOGS = (METRICS_FILE, REJECTED_ROWS)


def saved_runs(output_dir: Path) -> list[str]:
    """Names of the ``checkpoint-*`` folders and ``final`` a run has left in ``output_dir``."""
    return sorted(p.name for p in output_dir.iterdir() if is_checkpoint(p) or (p.name == "final" and p.is_dir()))


def log_sizes(output_dir: Path) -> dict[str, int]:
    return {name: (output_dir / name).stat().st_size if (output_dir / name).is_file() else 0 for name in LOGS}


def cut_logs(output_dir: Path, sizes: dict[str, int]) -> None:
    """Cut each log back to its size in ``sizes`` (a checkpoint's ``log_sizes``); longer logs only."""
    for name, size in sizes.items():
        if (output_dir / name).is_file() and (output_dir / name).stat().st_size > size:
            with open(output_dir / name, "r+b") as fh:
                fh.truncate(size)


def restart_logs(output_dir: Path) -> list[Path]:
    """Empty the non-empty logs of ``output_dir``; returns them."""
    emptied = [output_dir / name for name in LOGS if (output_dir / name).is_file() and (output_dir / name).stat().st_size]
    for path in emptied:
        path.write_bytes(b"")
    return emptied


# ----------------------------------------------------------------------------------------------------------------
# resuming a run


_SAME_MODEL = ("lora", "freeze_backbone", "freeze_mlp", "freeze_llm")  # not the path: a moved base folder is fine


def require_same_model(path: Path, model: dict[str, Any]) -> None:
    """The checkpoint's weights fit this run's model: the same LoRA adapters (rank, alpha, target modules:
    another set loaded partly, or the saved ones were dropped without a word) and frozen parts (the optimizer state
    holds the trainable ones). ``model``: this run's ``model`` section, local paths absolute (as saved)."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    saved = (yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}).get("model", {})
    changed = [f"model.{key}: {saved.get(key)!r} in the checkpoint, {model.get(key)!r} now" for key in _SAME_MODEL
               if key in saved and saved.get(key) != model.get(key)]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other model settings ({'; '.join(changed)}): its "
                         "weights and optimizer state do not fit this run; resume with the checkpoint's settings, "
                         "or start a new run")


def require_same_order(path: Path, global_batch: int, pairs_by_dataset: dict[str, int],
                       system_prompt: str | None) -> None:
    """The saved data position counts steps of the checkpoint's global batch through an epoch order drawn for the
    checkpoint's data: with another global batch, or datasets that gained or lost rows, it points at other pairs
    (some trained twice in the epoch, some never). The prompts keep their system message (``system_prompt``, the
    resolved text or None; checkpoints from before it was recorded had none)."""
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    saved_system = state.get("system_prompt")
    if saved_system != system_prompt:
        how = "data.system_prompt=none" if saved_system is None else f"data.system_prompt={saved_system!r}"
        raise ValueError(f"--resume: {path} was trained with the system message {saved_system!r} and this run "
                         f"renders {system_prompt!r}: the rest of the run would see other prompts; resume with "
                         f"{how}")
    saved = state.get("global_batch")
    if saved is not None and saved != global_batch:
        raise ValueError(f"--resume: {path} was written with {saved} pairs per optimizer step (per-device batch × "
                            f"accumulation × processes) and this run has {global_batch}: its data position would "
                            f"point at other pairs; resume with train.global_batch_size={saved}")
    before = state.get("pairs_by_dataset")
    if before is not None and before != pairs_by_dataset:
        changes = [f"{name} {before.get(name, 0)} → {pairs_by_dataset.get(name, 0)}"
                   for name in dict.fromkeys([*before, *pairs_by_dataset])
                   if before.get(name, 0) != pairs_by_dataset.get(name, 0)]
        raise ValueError(f"--resume: the data changed since {path} was written (pairs per epoch: "
                         f"{', '.join(changes[:4])}{', ...' if len(changes) > 4 else ''}): the saved position would "
                         "point at other pairs; resume with the data of the checkpoint, or start a new run")


def restore_run(path: Path, accelerator: Accelerator, scorer, optimizer, scheduler, delta,
                rejects: RejectedRowLog, window=None) -> tuple[int, DataPosition]:
    """Load a run's checkpoint ``path`` into the prepared model, optimizer, scheduler, δ and the open log
    ``window`` (:class:`~mpo.train.metrics.LogWindow`); cut its logs back to the checkpoint; returns (step, data
    position). Collective under several processes."""
    model = accelerator.unwrap_model(scorer).model
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # weights (the fp32 master partitions under ZeRO) and optimizer state from DeepSpeed's own per-rank files
        load_deepspeed_state(path, scorer, accelerator.num_processes)
        optimizer = None
    elif hasattr(model, "get_base_model"):  # LoRA: only adapter weights were saved
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(path / "model" / "adapter_model.safetensors"))
    else:
        # through from_pretrained, so that transformers' checkpoint key mapping applies both ways; read by rank 0
        # alone and broadcast (into each rank's shard under FSDP2)
        saved = None
        if accelerator.is_main_process:
            saved = type(model).from_pretrained(path / "model", dtype=next(model.parameters()).dtype).state_dict()
        load_full_weights(model, saved)
        del saved
    trainer_state = load_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler)
    delta.load_state_dict(trainer_state["delta"])
    if accelerator.is_main_process:  # steps and rows after the checkpoint come again: log them once, not twice
        cut_logs(path.parent, trainer_state.get("log_bytes", {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the count goes on, not from 0; it is all ranks' (summed when reported)
        rejects.counts.update(trainer_state.get("skipped_rows_by_kind", {}))
        if window is not None:
            window.load(trainer_state.get("log_window"))
    pos = trainer_state["position"]
    return trainer_state["step"], DataPosition(pos["epoch"], pos["step_in_epoch"])
