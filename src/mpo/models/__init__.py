"""Models: load any Hugging Face VLM or causal LM by path, and build tiny random-weight checkpoints."""

from mpo.models.load import (
    ModelLoadError,
    is_vision_model,
    load_model,
    load_processor,
    model_family,
    model_info,
    read_model_config,
)
from mpo.models.tiny import ARCHS, build_tiny, default_corpus, read_corpus

__all__ = [
    "ARCHS",
    "ModelLoadError",
    "build_tiny",
    "default_corpus",
    "is_vision_model",
    "load_model",
    "load_processor",
    "model_family",
    "model_info",
    "read_corpus",
    "read_model_config",
]
