"""Load a checkpoint by path or Hub id: the model, and its processor (VLM) or tokenizer (text-only LM).

Image-text-to-text models (InternVL ``-HF`` checkpoints, Qwen2.5-VL, ...) load with
``AutoModelForImageTextToText`` + ``AutoProcessor``; every other model with ``AutoModelForCausalLM`` +
``AutoTokenizer``. ``trust_remote_code`` is off unless the caller passes it: a checkpoint that ships its own
Python code runs that code on load. Every failure is a ``ModelLoadError`` that names the path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelLoadError", "is_vision_model", "load_model", "load_processor", "model_family", "model_info",
           "read_model_config"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_INTERNVL_CONVERTER = "src/transformers/models/internvl/convert_internvl_weights_to_hf.py"


class ModelLoadError(ValueError):
    """A model path that does not exist, is not a model, or cannot be loaded as asked."""


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a local folder or a (cached / reachable) Hub id, without running any code.

    Raises ``ModelLoadError`` when the path is neither a model folder nor a Hub model.
    """
    local = Path(path)
    if local.is_dir():
        cfg_file = local / "config.json"
        if not cfg_file.is_file() and (local / "adapter_config.json").is_file():
            raise ModelLoadError(f"{path}: a LoRA adapter (adapter_config.json, no config.json), not a whole model: "
                                 "give the run's final/ (adapter merged into the base) or merge it with peft first")
        if not cfg_file.is_file():
            raise ModelLoadError(f"{path}: not a model folder: no config.json "
                                 "(expected a checkpoint written by save_pretrained)")
        try:
            return json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{cfg_file}:{err.lineno}: invalid JSON: {err.msg}") from None
    if local.exists():
        raise ModelLoadError(f"{path}: not a model folder (it is a file)")
    if not _HUB_ID.match(str(path)):
        raise ModelLoadError(f"{path}: no such model folder")
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: no such folder, and not loadable as a Hugging Face Hub model "
                             f"(offline, not cached, or no such repository): {err}") from None
    return config


def _model_type(config_or_path: Any) -> tuple[str, dict[str, Any] | Any]:
    if isinstance(config_or_path, dict):
        return str(config_or_path.get("model_type", "")), config_or_path
    if isinstance(config_or_path, (str, Path)):
        config = read_model_config(config_or_path)
        return str(config.get("model_type", "")), config
    return str(getattr(config_or_path, "model_type", "")), config_or_path


def is_vision_model(config: Any) -> bool:
    """True for an image-text-to-text model: a config (object or dict) with a ``vision_config``, or a
    ``model_type`` that transformers maps only to ``AutoModelForImageTextToText``. Accepts a path too."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type, cfg = _model_type(config)
    vision = cfg.get("vision_config") if isinstance(cfg, dict) else getattr(cfg, "vision_config", None)
    if vision:
        return True
    return (model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_family(config_or_path: Any) -> str:
    """``"internvl"``, ``"qwen2_5_vl"``, ``"qwen2_vl"``, ``"text"`` (any text-only LM), or the raw
    ``model_type`` of another VLM (e.g. ``"internvl_chat"`` for the remote-code InternVL)."""
    model_type, cfg = _model_type(config_or_path)
    if model_type in ("internvl", "qwen2_5_vl", "qwen2_vl"):
        return model_type
    return model_type if is_vision_model(cfg) else "text"


def _check_loadable(path: str | Path, trust_remote_code: bool) -> dict[str, Any]:
    """Reject, with advice, checkpoints that would need (or cannot use) the checkpoint's own code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = read_model_config(path)
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise ModelLoadError(_internvl_chat_message(path, trust_remote_code))
    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(
                f"{path}: model_type {model_type!r} is defined by Python code shipped with the checkpoint "
                "(config.json auto_map); pass trust_remote_code=True (--trust-remote-code) only if you trust it")
        if not config.get("auto_map"):
            raise ModelLoadError(f"{path}: config.json: model_type: {model_type!r} is not a model type "
                                 "known to the installed transformers")
    return config


def _internvl_chat_message(path: str | Path, trust_remote_code: bool) -> str:
    name = Path(str(path).rstrip("/")).name
    base = re.sub(r"-(Instruct|Pretrained|MPO|Flash)$", "", name)
    suffix = "-HF" if base.startswith("InternVL3_5") else "-hf"
    why = ("needs trust_remote_code, and mpo does not train it anyway" if not trust_remote_code
           else "is not supported even with trust_remote_code")
    return (f"{path}: this is a remote-code InternVL checkpoint (config.json model_type 'internvl_chat' with "
            f"auto_map); its InternVLChatModel class {why}. Use the matching transformers-native -HF "
            f"repository instead (e.g. OpenGVLab/{base}{suffix}), or convert this checkpoint with transformers' "
            f"own InternVL conversion script ({_INTERNVL_CONVERTER}).")


def load_processor(path: str | Path, *, trust_remote_code: bool = False):
    """``AutoProcessor`` for a VLM, ``AutoTokenizer`` for a text-only LM (the "processor" of text data)."""
    from transformers import AutoProcessor, AutoTokenizer

    config = _check_loadable(path, trust_remote_code)
    cls = AutoProcessor if is_vision_model(config) else AutoTokenizer
    try:
        return cls.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}: cannot load the {cls.__name__[4:].lower()}: {err}") from err


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(path: str | Path, *, trust_remote_code: bool = False, dtype: str | torch.dtype = "float32",
               attn_implementation: str = "sdpa"):
    """``AutoModelForImageTextToText`` for a VLM, ``AutoModelForCausalLM`` otherwise, in ``dtype``.

    ``dtype`` is ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``. Raises ``ModelLoadError``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch_dtype = _torch_dtype(dtype)
    config = _check_loadable(path, trust_remote_code)
    cls = AutoModelForImageTextToText if is_vision_model(config) else AutoModelForCausalLM
    try:
        return cls.from_pretrained(str(path), dtype=torch_dtype, attn_implementation=attn_implementation,
                                   trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ModelLoadError(f"{path}: cannot load as {cls.__name__}: {err}") from err


def model_info(path: str | Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Family, parameter count (from the config, on the meta device: no weights read), image tokens per
    tile (InternVL; ``None`` where the count depends on the image) and whether a chat template is present."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    raw = _check_loadable(path, trust_remote_code)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    vision = is_vision_model(raw)
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    processor = load_processor(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    return {
        "path": str(path),
        "family": model_family(raw),
        "model_type": raw.get("model_type"),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_tokens_per_tile": getattr(processor, "image_seq_length", None) if vision else None,
        "chat_template": bool(getattr(processor, "chat_template", None) or tokenizer.chat_template),
    }
