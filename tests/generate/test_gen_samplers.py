"""Sampling math (pinned), the seeded logits processor, and HFSampler on the tiny InternVL / Qwen2."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from mpo.data.system import INTERNVL_SYSTEM_PROMPT
from mpo.generate.samplers import (
    HFSampler,
    SampleRequest,
    SamplingParams,
    SeededSampling,
    VLLMSampler,
    _vllm_messages,
    build_sampler,
    sample_from_logits,
    tiling_kwargs,
)


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


@pytest.mark.parametrize("u, token", [(0.4, 0), (0.6, 1), (0.9, 2)])
def test_inverse_cdf_plain(u, token):
    """p = (0.5, 0.3, 0.2): cdf (0.5, 0.8, 1.0); the first cdf above u wins."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    assert sample_from_logits(_logits(0.5, 0.3, 0.2), torch.tensor([u]), params).tolist() == [token]


def test_unsorted_vocab_maps_back_to_token_ids():
    """Same distribution with ids permuted: p(id0)=0.2, p(id1)=0.5, p(id2)=0.3; sorted order is 1, 2, 0."""
    params = SamplingParams(temperature=1.0, top_k=0)
    logits = _logits(0.2, 0.5, 0.3).repeat(3, 1)
    assert sample_from_logits(logits, torch.tensor([0.4, 0.6, 0.9]), params).tolist() == [1, 2, 0]


@pytest.mark.parametrize("params, u, token", [
    (SamplingParams(temperature=1.0, top_k=1), 0.99, 0),                # top-k 1 is greedy
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.6), 0.6, 0),      # keeps (0.5, 0.3): cdf 0.625, 1
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.6), 0.7, 1),
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.6), 0.99, 1),     # token 2 is never drawn
    (SamplingParams(temperature=0.5, top_k=0), 0.65, 0),                # p^2/sum: (0.6579, 0.2368, 0.1053)
    (SamplingParams(temperature=0.5, top_k=0), 0.66, 1),
])
def test_temperature_top_k_top_p(params, u, token):
    assert sample_from_logits(_logits(0.5, 0.3, 0.2), torch.tensor([u]), params).tolist() == [token]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "--temperature must be > 0 (sampling; the seed asserts this too), got 0.0"),
    ({"top_k": -1}, "--top-k must be >= 0 (0 keeps every token), got -1"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1], got 0.0"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1, got 0"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_seeded_sampling_returns_one_hot_scores_from_each_rows_stream():
    """Row r at step t uses uniform t of generator(seed_r): the same seed gives the same token whatever the row."""
    params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=4)
    proc = SeededSampling([7, 8, 7], params, prompt_len=5, device=torch.device("cpu"))
    expected_u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(proc.uniforms[0], expected_u) and torch.equal(proc.uniforms[2], expected_u)
    scores = torch.randn(3, 11)
    scores[2] = scores[0]
    out = proc(torch.zeros(3, 6, dtype=torch.long), scores)  # 6 - 5 = generated step 1
    assert out.shape == (3, 11)
    assert ((out == 0).sum(dim=1) == 1).all() and torch.isinf(out).sum() == 3 * 10
    assert out[0].argmax() == out[2].argmax() == sample_from_logits(scores[:1], expected_u[1:2], params)[0]


def test_tiling_kwargs():
    assert tiling_kwargs("internvl", dynamic=True, max_num=6, n_images=1) == {"crop_to_patches": True,
                                                                            "max_patches": 6}
    assert tiling_kwargs("internvl", dynamic=True, max_num=6, n_images=4) == {"crop_to_patches": True,
                                                                            "max_patches": 1}
    assert tiling_kwargs("internvl", dynamic=False, max_num=6, n_images=1) == {"crop_to_patches": False,
                                                                             "max_patches": 1}
    assert tiling_kwargs("qwen2_5_vl", dynamic=True, max_num=6, n_images=1) == {}


def test_build_sampler_rejects_tp_for_hf_and_unknown_backends(tmp_path):
    with pytest.raises(ValueError, match=r"^--tp 2: tensor parallelism needs --backend vllm"):
        build_sampler("hf", tmp_path, dtype="float32", device="cpu", tp=2, dynamic=False, max_num=1)
    with pytest.raises(ValueError, match=r"^--backend must be hf or vllm, got 'tgi'$"):
        build_sampler("tgi", tmp_path, dtype="float32", device="cpu", tp=1, dynamic=False, max_num=1)


@pytest.fixture(scope="module")
def internvl_sampler(tiny_internvl_dir):
    return HFSampler(tiny_internvl_dir, dynamic=True, max_num=6)


def _image_request(seeds, colour=(255, 0, 0), size=(64, 192)):
    return SampleRequest([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
                         (Image.new("RGB", size, colour),), False, tuple(seeds))


def _continue_request(seeds, prefix="The square is"):
    return SampleRequest([{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": prefix}]}], (), True, tuple(seeds))


def test_hf_sampler_n_samples_and_seed_determinism(internvl_sampler):
    """A sample depends on its prompt and seed only: not on its batch mates, their tile counts, or n."""
    params = SamplingParams(max_new_tokens=6)
    a, b, c = _image_request([1, 2, 3]), _continue_request([4, 5, 6]), _image_request([7, 8, 9], (0, 0, 255), (64, 64))
    together = internvl_sampler.sample([a, b, c], 3, params)
    assert [len(s) for s in together] == [3, 3, 3]
    assert all(s.finish_reason == "length" and s.num_tokens == 6 for group in together for s in group)
    assert len({s.text for group in together for s in group}) == 9
    alone = internvl_sampler.sample([a], 3, params)[0]
    reordered = internvl_sampler.sample([c, a], 3, params)
    one = internvl_sampler.sample([dataclasses.replace(a, seeds=(2,))], 1, params)[0][0]
    assert [s.text for s in alone] == [s.text for s in together[0]] == [s.text for s in reordered[1]]
    assert [s.text for s in reordered[0]] == [s.text for s in together[2]]
    assert one.text == together[0][1].text


def test_hf_sampler_rejects_a_seed_count_that_is_not_n(internvl_sampler):
    with pytest.raises(ValueError, match=r"^request 0 carries 2 seeds for n=3 samples$"):
        internvl_sampler.sample([_image_request([1, 2])], 3, SamplingParams(max_new_tokens=2))


def test_continue_final_message_renders_an_open_assistant_turn(internvl_sampler):
    """After InternVL's system line (``--system-prompt auto``: lmdeploy's template writes it for the seed)."""
    system = f"<|im_start|>system\n{INTERNVL_SYSTEM_PROMPT}<|im_end|>\n"
    text = internvl_sampler._render(_continue_request([1]))
    assert text == system + "<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\nThe square is"
    empty = internvl_sampler._render(_continue_request([1], prefix=""))
    assert empty == system + "<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_none_or_a_requests_own_system_turn(tiny_internvl_dir, internvl_sampler):
    own = _continue_request([1])
    own = dataclasses.replace(own, messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                             *own.messages])
    assert internvl_sampler._render(own).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    bare = HFSampler(tiny_internvl_dir, system_prompt="none")
    assert bare._render(_continue_request([1])).startswith("<|im_start|>user\nDescribe it.")


def test_decode_stops_at_the_first_end_of_turn(internvl_sampler):
    tok = internvl_sampler.tokenizer
    ids = tok.encode(" red square", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = internvl_sampler.pad_id
    stopped = internvl_sampler._decode(ids + [eos, pad, pad])
    assert (stopped.text, stopped.finish_reason, stopped.num_tokens) == (" red square", "stop", len(ids) + 1)
    cut = internvl_sampler._decode(ids)
    assert (cut.text, cut.finish_reason, cut.num_tokens) == (" red square", "length", len(ids))


def test_qwen25vl_mixed_batch_is_deterministic_per_sample(tiny_qwen25vl_dir):
    """Qwen2.5-VL sizes images itself (no tile kwargs); image and text prompts share one batch."""
    sampler = HFSampler(tiny_qwen25vl_dir, dynamic=True, max_num=6)
    params = SamplingParams(max_new_tokens=3)
    image, text = _image_request([1, 2], size=(56, 56)), _continue_request([3, 4])
    together = sampler.sample([image, text], 2, params)
    assert [s.text for s in sampler.sample([image], 2, params)[0]] == [s.text for s in together[0]]
    assert [s.text for s in sampler.sample([text], 2, params)[0]] == [s.text for s in together[1]]


@pytest.mark.parametrize("arch", ["internvl", "qwen25vl"])
def test_a_sampled_prompt_renders_as_training_renders_the_pair(tiny_internvl_dir, tiny_qwen25vl_dir, arch):
    """The correctness pipeline samples ``<image>\\nQ`` prompts and pairs train on them: the sampler's rendering
    equals PairEncoder.prompt_text's. The newline after an image was always dropped in generation, so Qwen2.5-VL,
    whose template writes none, sampled ``<|vision_end|>Q`` and trained on ``<|vision_end|>\\nQ``."""
    from types import SimpleNamespace

    from mpo.data.encode import PairEncoder
    from mpo.generate.prompts import to_content

    path = tiny_internvl_dir if arch == "internvl" else tiny_qwen25vl_dir
    sampler = HFSampler(path, system_prompt="none")
    prompt = "Image-1: <image>\nImage-2: <image>\nWhich is larger?"
    request = SampleRequest([{"role": "user", "content": to_content(prompt)}], (), False, (1,))
    record = SimpleNamespace(dataset="d", line=1, question=prompt, chosen="a", rejected="b", system_prompt=None)
    trained = PairEncoder(sampler.processor, system_prompt=None).prompt_text(record)
    assert sampler._render(request) == trained
    image = "<IMG_CONTEXT>" if arch == "internvl" else "<|vision_end|>"
    assert f"{image}\nWhich is larger?" in trained and "\n\n" not in trained  # one newline, never two


def test_text_only_model_takes_text_and_refuses_images(tiny_qwen2_dir):
    sampler = HFSampler(tiny_qwen2_dir)
    assert sampler._render(_continue_request([1])) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe it.<|im_end|>\n"
        "<|im_start|>assistant\nThe square is")
    out = sampler.sample([_continue_request([1, 2])], 2, SamplingParams(max_new_tokens=3))
    assert [s.num_tokens for s in out[0]] == [3, 3]
    with pytest.raises(ValueError, match=r"^this checkpoint is a text-only model: it cannot take an image$"):
        sampler.sample([_image_request([1])], 1, SamplingParams(max_new_tokens=3))


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_vllm_importable(), reason="checks the message shown when vLLM is absent")
def test_vllm_backend_without_vllm_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"^--backend vllm needs vLLM: pip install 'mpo\[vllm\]'"):
        VLLMSampler(tmp_path)


def test_vllm_request_translation_without_an_engine():
    """What VLLMSampler hands to LLM.chat: PIL images in place of {"type": "image"}, in order, and the tile cap in
    the processor's own words (checked without vLLM; the engine call itself is covered by test_gen_vllm.py)."""
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    req = SampleRequest([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"},
                                                      {"type": "image"}]}], (red, blue), False, (1,))
    assert _vllm_messages(req) == [{"role": "user", "content": [{"type": "image_pil", "image_pil": red},
                                                                {"type": "text", "text": "A"},
                                                                {"type": "image_pil", "image_pil": blue}]}]
    # the row's newline after an image: dropped for InternVL's template, which writes its own; kept for Qwen-VL's
    ask = SampleRequest([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nQ"}]}],
                        (red,), False, (1,))
    assert _vllm_messages(ask, None, True)[0]["content"][1] == {"type": "text", "text": "Q"}
    assert _vllm_messages(ask, None, False)[0]["content"][1] == {"type": "text", "text": "\nQ"}
    sampler = VLLMSampler.__new__(VLLMSampler)
    sampler.dynamic, sampler.max_num = True, 12
    sampler.model_type = "internvl_chat"
    assert sampler.mm_processor_kwargs(2) == {"max_dynamic_patch": 6, "dynamic_image_size": True}
    sampler.model_type = "internvl"
    assert sampler.mm_processor_kwargs(1) == {"max_patches": 12, "crop_to_patches": True}
    sampler.model_type, sampler.dynamic = "qwen2_5_vl", False
    assert sampler.mm_processor_kwargs(1) is None
