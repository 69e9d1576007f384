"""Shared fixtures. Every test runs offline on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except Exception:
        has_vllm = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs the vllm package (pip install 'mpo[vllm]')"))


# Tiny random-weight checkpoints, built once per session (~1 s each after the first import) and loaded by
# path like real ones. Treat them as read-only: many tests share them.
@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory):
    from mpo.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "internvl", "internvl")


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tmp_path_factory):
    from mpo.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    from mpo.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")
