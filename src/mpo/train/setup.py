"""Building the policy and the reference: freezing, LoRA, dropout, gradient checkpointing.

The seed's freeze flags map to HF module names that InternVL-HF and Qwen-VL share in spirit but not in spelling:

| part | InternVL-HF | Qwen2.5-VL | text-only |
|---|---|---|---|
| vision (``freeze_backbone``) | ``model.vision_tower`` | ``model.visual`` minus ``merger`` | - |
| projector (``freeze_mlp``) | ``model.multi_modal_projector`` | ``model.visual.merger`` | - |
| language model (``freeze_llm``) | ``model.language_model`` + ``lm_head`` | same | ``model`` + ``lm_head`` |

Unlike the seed, a frozen vision tower is put in eval mode (the seed leaves it in train mode, so its stochastic
depth keeps firing), and the reference model always runs in eval mode with no gradients.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from accelerate import Accelerator
from torch import nn

from mpo.data.errors import RowError
from mpo.data.rejects import RejectedRowLog, handle_bad_row
from mpo.train import checkpoint as ckpt
from mpo.train.config import ModelConfig, RunConfig
from mpo.train.data import EncodedPairs
from mpo.train.forward import PairScorer

__all__ = ["ModelParts", "model_parts", "apply_freezing", "disable_dropout", "add_lora", "make_reference",
           "count_parameters", "apply_vision_drop_path", "freeze_train_mode", "set_seed", "param_ndim",
           "deepspeed_config", "keep_used_weight_conversions", "ScoreTensors", "Zero3PairScorer",
           "load_reference", "deepspeed_reference", "gathered_vision", "local_paths_absolute", "start_afresh",
           "require_usable_rows", "claim_folder", "release_folder", "refuse_replacing_given_config"]

log = logging.getLogger(__name__)


@dataclass
class ModelParts:
    vision: list[nn.Module]
    projector: list[nn.Module]
    language: list[nn.Module]


def model_parts(model: nn.Module) -> ModelParts:
    """Locate vision tower, projector and language model of an HF VLM or causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "model", inner)
    head = [inner.get_output_embeddings()] if inner.get_output_embeddings() is not None else []
    if hasattr(backbone, "vision_tower"):  # InternVL, LLaVA-style
        return ModelParts([backbone.vision_tower], [backbone.multi_modal_projector],
                          [backbone.language_model, *head])
    if hasattr(backbone, "visual"):  # Qwen2-VL / Qwen2.5-VL
        visual = backbone.visual
        vision = [m for name, m in visual.named_children() if name != "merger"]
        return ModelParts(vision, [visual.merger], [backbone.language_model, *head])
    return ModelParts([], [], [backbone, *head])


def apply_freezing(model: nn.Module, cfg: ModelConfig) -> None:
    parts = model_parts(model)
    for flag, modules in (("freeze_backbone", parts.vision), ("freeze_mlp", parts.projector),
                          ("freeze_llm", parts.language)):
        if not getattr(cfg, flag):
            continue
        if not modules:
            raise ValueError(f"model.{flag}: this model has no such part ({type(model).__name__})")
        for module in modules:
            module.requires_grad_(False)


def freeze_train_mode(model: nn.Module, cfg: ModelConfig) -> None:
    """After ``model.train()``: keep frozen vision parts in eval mode (deterministic features)."""
    if cfg.freeze_backbone:
        for module in model_parts(model).vision:
            module.eval()


def apply_vision_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth in the vision tower, rates rising linearly from 0 to ``rate`` over its layers (timm rule).

    transformers' InternVL port has no DropPath, yet the seed's 8B+ presets train with 0.1–0.4. Each vision
    layer's residual update ``f(x) = layer(x) - x`` is dropped per sample with its rate and rescaled by
    ``1/(1-p)`` when kept. timm drops the attention and MLP branches of a block independently; dropping the
    block's whole update is the same expected value with a coarser mask (documented difference). Only in train
    mode: the reference (eval mode) and evaluation see the deterministic tower. Returns the number of layers hooked.
    """
    if rate <= 0:
        return 0
    parts = model_parts(model).vision
    layers = []
    for part in parts:
        for name in ("encoder.layer", "blocks"):
            mod = part
            for attr in name.split("."):
                mod = getattr(mod, attr, None)
            if isinstance(mod, nn.ModuleList):
                layers.extend(mod)
    if not layers:
        raise ValueError(f"model.drop_path_rate={rate}: no vision layers found in {type(model).__name__}")
    for k, layer in enumerate(layers):
        p = rate * k / max(len(layers) - 1, 1)
        if p > 0:
            layer.register_forward_hook(_drop_path_hook(p))
    return len(layers)


def _drop_path_hook(p: float):
    def hook(module: nn.Module, args: tuple, output):
        if not module.training:
            return output
        x = args[0]
        out = output[0] if isinstance(output, tuple) else output
        shape = (out.shape[0],) + (1,) * (out.dim() - 1)
        keep = torch.empty(shape, device=out.device, dtype=out.dtype).bernoulli_(1 - p) / (1 - p)
        dropped = x + (out - x) * keep
        return (dropped, *output[1:]) if isinstance(output, tuple) else dropped
    return hook


def disable_dropout(model: nn.Module) -> None:
    """Zero every nn.Dropout (as TRL does): preference log-probs must not depend on dropout masks."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def add_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap the language model's linear layers with PEFT LoRA adapters (alpha defaults to 2·r like InternVL)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = cfg.lora
    # q_proj/v_proj/... also name the vision tower's layers (InternViT, Qwen-VL's ViT): adapters go into the
    # language model only, as the help text promises.
    names = dict(model.named_modules())
    parts = model_parts(model)
    excluded = {name for name, mod in names.items() for part in (*parts.vision, *parts.projector)
                if mod is part}
    exclude = [n for n in names if any(n == e or n.startswith(e + ".") for e in excluded)]
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules, exclude_modules=exclude or None, bias="none")
    # PEFT freezes everything but the adapters: LoRA trains adapters only, as TRL's and ms-swift's recipes do.
    peft_model = get_peft_model(model, peft_cfg)
    if Path(cfg.path).exists():  # the saved adapter names its base: absolute, or it loads from this folder only
        for adapter in peft_model.peft_config.values():
            adapter.base_model_name_or_path = str(Path(cfg.path).resolve())
    return peft_model


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of the policy for the in-loop reference (not used with LoRA or a reference cache)."""
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes also when ZeRO-3 partitioned the weights at load)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, total


def keep_used_weight_conversions(model: nn.Module) -> None:
    """Forget the checkpoint-key renamings that did not apply when the model was loaded.

    ``save_pretrained`` reverses the renamings recorded at load time. transformers' ordinary loader records only
    those that matched a key; its ZeRO-3 loader (``integrations/deepspeed.py``, 5.24) records all, legacy ones
    included, and the reverse of an unused one (``^language_model.model.model`` → ``model.language_model``) adds a
    ``model.`` to every language-model key of the saved InternVL. Filtering by ``was_used()`` restores the names
    a plain run writes (tested: a ZeRO-3 run's export has the same keys and values as the plain run's).
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def param_ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter's full shape: ZeRO-3 leaves a 0-element 1-D tensor on each rank after
    partitioning, so ``p.dim()`` would put every matrix into the no-decay group."""
    return len(getattr(p, "ds_shape", p.shape))


# Keys that DeepSpeed's JSON may leave "auto" (accelerate fills them only inside a Trainer): mpo fills them from
# its own config, and refuses a number that disagrees with it (name → the train.* key it comes from).
_DS_FROM_CONFIG = {"train_micro_batch_size_per_gpu": "per_device_batch_size",
                   "gradient_accumulation_steps": "gradient_accumulation_steps",
                   "train_batch_size": "per_device_batch_size × gradient_accumulation_steps × processes",
                   "gradient_clipping": "max_grad_norm"}


def deepspeed_config(path: str | Path, *, per_device_batch_size: int, accumulation: int, world_size: int,
                     max_grad_norm: float, model_dtype: str) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` with its "auto" values filled from the mpo run config.

    Batch sizes, accumulation and clipping come from ``train.*``; DeepSpeed clips (``gradient_clipping``) and scales
    the loss by 1/accumulation itself. ``bf16.enabled: "auto"`` becomes true for ``model.dtype=bfloat16`` (DeepSpeed
    then keeps fp32 master weights and optimizer state) and is otherwise left to accelerate's mixed precision
    (``ACCELERATE_MIXED_PRECISION``). Raises ``ValueError`` naming the key that disagrees with the run config.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"train.deepspeed={path}: no such file (configs/deepspeed/ has zero2.json, zero3.json, "
                         "zero3_offload.json)")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"train.deepspeed={path}: not valid JSON ({exc})") from None
    ours = {"train_micro_batch_size_per_gpu": per_device_batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": per_device_batch_size * accumulation * world_size, "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        found = ds.get(key, "auto")
        if found == "auto":
            ds[key] = value
        elif float(found) != float(value):
            raise ValueError(f"train.deepspeed={path}: {key}={found}, but the run config gives {value} (train."
                             f"{_DS_FROM_CONFIG[key]}); set it to \"auto\" in the JSON or change the run config")
    if model_dtype == "bfloat16" and ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = True
    return ds


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed: the scorer and the reference under ZeRO


class ScoreTensors(NamedTuple):
    """:class:`~mpo.train.forward.PairScores` as a NamedTuple: chosen_logps, rejected_logps (B,), chosen_nll ()."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor


class Zero3PairScorer(PairScorer):
    """PairScorer for ZeRO-3, where each weight is gathered only around the modules that use it.

    ``PairScorer.forward`` multiplies by the output-embedding weight directly (chunked log-softmax), outside
    ``lm_head``'s own forward, so DeepSpeed must gather that weight for this module: it is registered as this
    module's external parameter. DeepSpeed gathers it again before the backward only through hooks on tensors it
    finds in the outputs, and it does not look inside a dataclass, so the scores come back as a NamedTuple (the
    same field names). Without both, backward fails on the released weight ("size of tensor a (0)") whenever
    lm_head is partitioned, i.e. for every untied model above ``stage3_param_persistence_threshold``.
    """

    def __init__(self, model: nn.Module, *, vision_first: bool = False):
        super().__init__(model, vision_first=vision_first)
        import deepspeed

        deepspeed.zero.register_external_parameter(self, model.get_output_embeddings().weight)

    def forward(self, batch, image_features=None) -> ScoreTensors:  # type: ignore[override]
        s = super().forward(batch, image_features)
        return ScoreTensors(s.chosen_logps, s.rejected_logps, s.chosen_nll)


def load_reference(cfg: ModelConfig, policy: nn.Module, zero_stage: int) -> nn.Module:
    """The frozen reference: a deep copy of the loaded policy, or under ZeRO-3 a second load of the same weights.

    Under ZeRO-3 transformers loads the model already partitioned (``deepspeed.zero.Init``): each rank holds
    1/world of every weight, and a deep copy would copy partitions that no DeepSpeed engine manages. The second
    load is partitioned the same way and becomes its own ZeRO-3 engine (:func:`deepspeed_reference`), so the
    reference is sharded like the policy instead of a full replica per process.
    """
    if zero_stage < 3:
        return make_reference(policy)
    from mpo.models import load_model

    ref = load_model(cfg.path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                     attn_implementation=cfg.attn_implementation)
    keep_used_weight_conversions(ref)
    disable_dropout(ref)
    ref.requires_grad_(False)
    return ref.eval()


def deepspeed_reference(reference: PairScorer, ds_config: dict[str, Any], zero_stage: int) -> nn.Module:
    """The in-loop reference of a DeepSpeed run (``ds_config``: the prepared engine's filled config).

    ZeRO-3: wrapped in a DeepSpeed engine without optimizer, whose forward gathers each layer's weights when the
    layer runs and frees them after. ZeRO-0/1/2: DeepSpeed computes the policy with its bf16/fp16 copy of the
    weights (buffers such as RoPE's inv_freq stay fp32); the reference copy's parameters get the same dtype, or
    the rewards would start at rounding noise instead of 0.
    """
    if zero_stage == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=reference, config={k: v for k, v in ds_config.items()
                                                                   if k not in ("optimizer", "scheduler")})
        engine.eval()
        return engine
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled") is True:
            for p in reference.parameters():
                p.data = p.data.to(dtype)
    return reference


def gathered_vision(model: nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 the shared vision pass runs outside the engine's forward, where a direct parameter read sees
    an empty partition: gather the (frozen) vision tower and projector for it, all at once. A no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    parts = model_parts(model)
    params = [p for m in (*parts.vision, *parts.projector) for p in m.parameters()]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ----------------------------------------------------------------------------------------------------------------
# the run folder and the data, before training


def local_paths_absolute(config: dict) -> dict:
    """The config as written to ``config.yaml``: paths that exist here made absolute, so that ``mpo eval RUN`` finds
    the base model from any working directory (a hub id is left as it is). The run itself keeps the paths as
    given: the reference cache's fingerprint compares them as text."""
    for section, key in (("model", "path"), ("data", "meta_path"), ("train", "ref_cache"), ("train", "deepspeed")):
        value = config[section][key]
        if value and Path(value).exists():
            config[section][key] = str(Path(value).resolve())
    return config


def start_afresh(out: Path, accelerator: Accelerator, resume: bool) -> None:
    """A run that does not resume starts in a folder without another run's checkpoints or final model (its
    checkpoints would mix with this run's: ``--resume`` and ``save_total_limit`` pick the newest by step number,
    whichever run wrote it). Logs of an earlier attempt that saved nothing are started anew, not appended to."""
    from mpo.train.accelerator import TrainingError  # accelerator imports this module

    earlier = ckpt.saved_runs(out)
    if earlier:
        how = "it has no complete checkpoint to resume from" if resume else "continue it with --resume"
        raise TrainingError(f"{out} already holds another run ({', '.join(earlier[:3])}"
                            f"{', ...' if len(earlier) > 3 else ''}): {how}, or set train.output_dir to a new folder")
    if accelerator.is_main_process:
        for path in ckpt.restart_logs(out):
            log.warning("%s: started anew (the earlier attempt in this folder saved no checkpoint)", path)
    accelerator.wait_for_everyone()


def require_usable_rows(dataset: EncodedPairs, cfg: RunConfig, rejects: RejectedRowLog) -> None:
    """Fail before training when no row of the mixture can be used (scans only until the first good row). The bad
    rows it meets on the way are reported by training when it reaches them (once), or here when none is usable."""
    from mpo.train.accelerator import TrainingError  # accelerator imports this module

    if len(dataset) == 0:
        raise TrainingError(f"{cfg.data.meta_path}: the meta file yields no rows (every repeat_time is 0 or every "
                            "annotation file is empty)")
    for i in range(len(dataset)):
        if not isinstance(dataset[i], RowError):
            return
    for i in range(len(dataset)):
        handle_bad_row(dataset[i], cfg.data.on_bad_row, rejects)
    raise TrainingError(f"{cfg.data.meta_path}: none of the {len(dataset)} rows is usable; the reasons are in "
                        f"{rejects.path} (check them with: mpo data check {cfg.data.meta_path} --model {cfg.model.path})")


# ----------------------------------------------------------------------------------------------------------------
# the output folder: one writer at a time, and never the user's own config file

LOCK_FILE = ".mpo.lock"
_HELD: dict[str, Any] = {}  # folder → open lock file of this process (a resume in the same process reuses it)


def claim_folder(folder: Path, what: str) -> None:
    """Create ``folder`` and hold an exclusive lock on it until :func:`release_folder` or the process ends: two
    runs writing one folder replace each other's checkpoints, final model and cache parts. ``what`` names the
    setting in the messages (``train.output_dir``).

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so forked DataLoader workers
    do not hold it on after a kill of the main process, and this process may claim the folder again."""
    import fcntl

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder}: is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        return
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until released)
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN / EACCES: another process holds it
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(f"{what} {folder}: another mpo process ({owner}) is writing to it; wait for it to end or "
                         "choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD[key] = handle


def release_folder(folder: Path) -> None:
    handle = _HELD.pop(str(folder.resolve()), None)
    if handle is not None:
        handle.close()  # closing drops the lock


def refuse_replacing_given_config(out: Path, config_path: str | Path | None) -> None:
    """``out/config.yaml`` is the run's resolved config, rewritten at every start: refuse when it is the very file
    the run was started from and was written by hand (its comments would go, the overrides would become its
    values). One that mpo wrote (``yaml.safe_dump`` text, as ``mpo train RUN/config.yaml --resume`` reads it) is
    rewritten as usual."""
    if config_path is None:
        return
    target = out / "config.yaml"
    if not target.is_file() or Path(config_path).resolve() != target.resolve():
        return
    text = target.read_text(encoding="utf-8")
    try:
        written_by_mpo = text == yaml.safe_dump(yaml.safe_load(text), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        written_by_mpo = False
    if not written_by_mpo:
        raise ValueError(f"{config_path}: this config file is the run folder's config.yaml, where mpo writes the "
                         "run's resolved config (your comments would go, the overrides would become its values); "
                         "copy it out of train.output_dir and start from the copy")
