"""Checkpoints that a crash cannot tear, and that restore a run exactly.

A checkpoint is a folder ``checkpoint-<step>`` holding the model (``save_pretrained``: safetensors; only the
adapter with LoRA), ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain containers only, loaded back with
``torch.load(weights_only=True)``: no pickle of arbitrary objects), ``rng.pt`` (torch, CUDA, Python and NumPy RNG
states as tensors/lists), and ``trainer_state.json`` (step, data position, the BCO shift δ, metrics). It is
written into ``.tmp-checkpoint-<step>`` and renamed into place only once complete, so an interrupted save leaves
the previous checkpoint untouched and never a half-written one that resume would pick.

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
from typing import Any

import numpy as np
import torch

from mpo.fsio import atomic_write_json, replace_dir

__all__ = ["save_checkpoint", "start_checkpoint", "save_deepspeed_state", "load_deepspeed_state",
           "latest_checkpoint", "load_training_state", "rng_state", "set_rng_state", "prune_checkpoints"]

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


def save_checkpoint(output_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, trainer_state: dict[str, Any], config_text: str,
                    rng: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                    started: bool = False) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; returns its path.

    ``state_dict``: the full weights when ``model``'s own are sharded (gathered by the caller); ``optimizer=None``
    with ``started=True``: DeepSpeed already wrote the optimizer state into the folder (:func:`save_deepspeed_state`).
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = _tmp(output_dir, step) if started else start_checkpoint(output_dir, step)
    if optimizer is None and not (tmp / _DS_DIR).is_dir():
        raise ValueError(f"{tmp}: no optimizer state (neither an optimizer nor a {_DS_DIR}/ folder)")
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
    atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
    replace_dir(tmp, final)
    return final


def _complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and ((path / "optimizer.pt").is_file()
                                                        or (path / _DS_DIR / _DS_TAG).is_dir())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder, or None."""
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and _complete(p)]
    return max(found)[1] if found else None


def load_training_state(path: Path, *, optimizer: torch.optim.Optimizer | None, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from ``path``; returns ``trainer_state.json``. ``optimizer=None``:
    DeepSpeed restored it (:func:`load_deepspeed_state`)."""
    if optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise ValueError(f"{path} was written by DeepSpeed (no optimizer.pt, a {_DS_DIR}/ folder); resume it "
                             "with the same train.deepspeed and number of processes")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
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
