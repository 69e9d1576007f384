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

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from mpo.train.config import ModelConfig

__all__ = ["ModelParts", "model_parts", "apply_freezing", "disable_dropout", "add_lora", "make_reference",
           "count_parameters", "apply_vision_drop_path", "freeze_train_mode", "set_seed"]

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
    return get_peft_model(model, peft_cfg)


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of the policy for the in-loop reference (not used with LoRA or a reference cache)."""
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
