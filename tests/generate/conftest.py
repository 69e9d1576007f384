"""Fixtures of the generation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test with one intra-op thread, then restore the setting.

    The tiny models' matrices are too small to gain from a second thread, and on a small shared machine the
    spinning OpenMP threads of several processes slow every decode step down about tenfold (measured: 50 ms per
    step with 2 threads under load, 5 ms with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
