"""VLLMSampler on tiny checkpoints. Runs only where vLLM imports and a GPU is present (skipped elsewhere).

Not run in this repository's CI: vLLM cannot be installed beside our torch/transformers pins (docs/generate.md).
"""

from __future__ import annotations

import pytest
from PIL import Image

from mpo.generate.samplers import SampleRequest, SamplingParams, VLLMSampler

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]


def _continue(seeds):
    return SampleRequest([{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "The square is"}]}], (), True,
                         tuple(seeds))


def test_text_model_n_samples_share_a_request_and_repeat_with_the_seed(tiny_qwen2_dir):
    sampler = VLLMSampler(tiny_qwen2_dir, gpu_memory_utilization=0.3)
    params = SamplingParams(max_new_tokens=5)
    first = sampler.sample([_continue([11, 12, 13]), _continue([21, 22, 23])], 3, params)
    again = sampler.sample([_continue([11, 12, 13])], 3, params)
    assert [len(group) for group in first] == [3, 3]
    assert all(s.finish_reason in ("stop", "length") and 1 <= s.num_tokens <= 5 for g in first for s in g)
    assert [s.text for s in again[0]] == [s.text for s in first[0]]


def test_vision_model_takes_pil_images(tiny_qwen25vl_dir):
    sampler = VLLMSampler(tiny_qwen25vl_dir, max_images_per_prompt=2, gpu_memory_utilization=0.3)
    req = SampleRequest([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "Same colour?"}]}],
                        (Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (56, 56), (0, 0, 255))), False,
                        (5, 6))
    out = sampler.sample([req], 2, SamplingParams(max_new_tokens=4))
    assert len(out) == 1 and len(out[0]) == 2
    assert sampler.mm_processor_kwargs(2) is None  # Qwen-VL sizes images itself
