"""Sampling backends behind one narrow interface: ``sample(requests, n, params) -> n samples per request``.

* ``HFSampler``: transformers ``generate`` on one device, batched with left padding, ``num_return_sequences=n``.
  transformers 5.x encodes each image once and shares the features among the ``n`` rows; the prompt itself is
  prefilled once per row.
* ``VLLMSampler``: vLLM's ``LLM.chat`` with ``SamplingParams(n=n)``, so the ``n`` samples of a request share one
  prefill and one image encoding; ``tensor_parallel_size`` = ``--tp``; the tile cap goes in as
  ``mm_processor_kwargs``. vLLM is imported only when this class is built (``pip install 'mpo[vllm]'``).

Determinism. Every request carries one seed per wanted sample. ``HFSampler`` draws each row's tokens from its own
``torch.Generator`` seeded with that sample's seed (``SeededSampling``), so a sample depends only on its prompt and
its seed: the same sample comes back whatever the batch size, the batch mates, the world size or a resume, up to
floating-point differences between batch shapes (padding changes the logits in the last bits; on a GPU, kernels
may differ too), which can flip a draw that sits on a probability boundary. ``VLLMSampler`` passes the request's
first seed as ``SamplingParams.seed``; vLLM derives all ``n`` samples from it, so a rerun with the same ``n``,
vLLM version and hardware repeats them, but a resumed item that needs fewer samples gets different ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from mpo.data.encode import PairEncoder
from mpo.data.system import resolve_system_prompt

__all__ = [
    "HFSampler",
    "Sample",
    "SampleRequest",
    "Sampler",
    "SamplingParams",
    "SeededSampling",
    "VLLMSampler",
    "build_sampler",
    "sample_from_logits",
    "tiling_kwargs",
]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by all requests of a run (the seed's defaults: T=0.7, top-k 50, top-p 1)."""

    temperature: float = 0.7
    top_k: int = 50
    """0 keeps every token."""
    top_p: float = 1.0
    max_new_tokens: int = 4096

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (sampling; the seed asserts this too), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class SampleRequest:
    """One prompt: chat ``messages`` whose ``{"type": "image"}`` items take ``images`` in order.

    ``continue_final_message``: the last message is an assistant turn to be continued (DropoutNTP's prefix),
    rendered without its end-of-turn marker; otherwise a generation prompt opens a new assistant turn.
    ``seeds``: one per wanted sample; ``len(seeds)`` must equal the ``n`` given to ``Sampler.sample``.
    """

    messages: list[dict[str, Any]]
    images: tuple[Image.Image, ...] = ()
    continue_final_message: bool = False
    seeds: tuple[int, ...] = field(default=(0,))


@dataclass(frozen=True)
class Sample:
    """One generated continuation. ``finish_reason``: ``"stop"`` (end of turn) or ``"length"`` (hit the cap)."""

    text: str
    finish_reason: str
    num_tokens: int


class Sampler(Protocol):
    """What the generators need from a backend."""

    def sample(self, requests: Sequence[SampleRequest], n: int, params: SamplingParams) -> list[list[Sample]]:
        """``n`` samples for each request, in request order."""
        ...


def tiling_kwargs(family: str, *, dynamic: bool, max_num: int, n_images: int) -> dict[str, Any]:
    """Processor kwargs that cap the tiles of one prompt's images (InternVL-HF only).

    ``--dynamic`` tiles each image into at most ``max(1, max_num // n_images)`` tiles plus a thumbnail
    (InternVL's multi-image rule); without it every image is one tile. Other families size images their own way
    (Qwen-VL: ``min_pixels``/``max_pixels`` of the processor), so nothing is passed.
    """
    if family != "internvl":
        return {}
    if not dynamic:
        return {"crop_to_patches": False, "max_patches": 1}
    return {"crop_to_patches": True, "max_patches": max(1, max_num // max(1, n_images))}


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling with the given uniforms in [0, 1).

    Args:
        logits: (R, V) next-token logits.
        uniforms: (R,) one uniform draw per row.
    Returns:
        (R,) token ids. Temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass
        reaches ``top_p``; the token that crosses it is kept), then renormalise.

    Example: probabilities (0.5, 0.3, 0.2), top_p 0.6 keeps (0.5, 0.3) -> (0.625, 0.375); u = 0.6 gives token 0,
    u = 0.7 gives token 1.
    """
    scaled = logits.float() / params.temperature
    vocab = scaled.shape[-1]
    k = vocab if params.top_k == 0 else min(params.top_k, vocab)
    values, order = scaled.topk(k, dim=-1) if k < vocab else scaled.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    if params.top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]
    # right=True: the first position whose cdf exceeds the target, which never has zero probability.
    pos = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=k - 1)
    return order.gather(1, pos).squeeze(1)


class SeededSampling:
    """A transformers logits processor that samples each row from its own seeded uniform stream.

    It returns scores that are 0 at the drawn token and -inf elsewhere, so transformers' own sampling step
    (run with temperature 1, no top-k/top-p) can only pick that token. Row ``r`` uses ``uniforms[r, t]`` at
    generated position ``t``.
    """

    def __init__(self, seeds: Sequence[int], params: SamplingParams, prompt_len: int, device: torch.device):
        streams = [torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds]
        self.uniforms = torch.stack(streams).to(device)
        self.params = params
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        tokens = sample_from_logits(scores, self.uniforms[:, step], self.params)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


class HFSampler:
    """transformers backend: one model on one device (``mpo.models.load_model``/``load_processor``)."""

    def __init__(self, model_path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 dynamic: bool = True, max_num: int = 6, trust_remote_code: bool = False, system_prompt: str = "auto"):
        from mpo.models import load_model, load_processor, model_family

        self.family = model_family(model_path)
        self.processor = load_processor(model_path, trust_remote_code=trust_remote_code)
        self.system_prompt = resolve_system_prompt(self.processor, system_prompt)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # a row's newline after <image> is dropped where the template writes one (InternVL), as training does
        self.image_newline = self.family != "text" and PairEncoder(self.processor).image_newline
        self.tokenizer.padding_side = "left"  # generation appends on the right; every row must end at its prompt
        self.model = load_model(model_path, trust_remote_code=trust_remote_code, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.dynamic, self.max_num = dynamic, max_num
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)

    def sample(self, requests: Sequence[SampleRequest], n: int, params: SamplingParams) -> list[list[Sample]]:
        """Group requests by tile budget (one processor call per group), generate, decode."""
        _check_seeds(requests, n)
        results: list[list[Sample] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            key = tuple(sorted(tiling_kwargs(self.family, dynamic=self.dynamic, max_num=self.max_num,
                                             n_images=len(req.images)).items()))
            groups.setdefault(key, []).append(i)
        for key, idxs in groups.items():
            outputs = self._generate([requests[i] for i in idxs], n, params, dict(key))
            for i, samples in zip(idxs, outputs, strict=True):
                results[i] = samples
        return [r for r in results if r is not None]

    def _render(self, req: SampleRequest) -> str:
        flags = {"continue_final_message": True} if req.continue_final_message else {"add_generation_prompt": True}
        messages = fit_image_newlines(with_system(req.messages, self.system_prompt), self.image_newline)
        if self.family == "text":  # a tokenizer's template may expect plain-string content
            messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
        return self.processor.apply_chat_template(messages, tokenize=False, **flags)

    @torch.inference_mode()
    def _generate(self, requests: list[SampleRequest], n: int, params: SamplingParams,
                  image_kwargs: dict[str, Any]) -> list[list[Sample]]:
        from transformers import GenerationConfig, LogitsProcessorList

        texts = [self._render(r) for r in requests]
        images = [img for r in requests for img in r.images]
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        if images:
            kwargs.update(images=images, **image_kwargs)
        enc = self.processor(text=texts, **kwargs).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        seeds = [s for r in requests for s in r.seeds]  # row order of num_return_sequences: request-major
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                  max_new_tokens=params.max_new_tokens, num_return_sequences=n,
                                  eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
        processors = LogitsProcessorList([SeededSampling(seeds, params, prompt_len, self.device)])
        out = self.model.generate(**enc, generation_config=config, logits_processor=processors)
        rows = [self._decode(row) for row in out[:, prompt_len:].tolist()]
        return [rows[i * n:(i + 1) * n] for i in range(len(requests))]

    def _decode(self, tokens: list[int]) -> Sample:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Sample(text, "length" if stop is None else "stop", len(tokens) if stop is None else stop + 1)


class VLLMSampler:
    """vLLM backend (written against vLLM's documented ``LLM``/``LLM.chat``/``SamplingParams`` API).

    Images go in as ``{"type": "image_pil"}`` chat parts; ``LLM.chat`` renders the model's own chat template with
    the model's own image placeholder and hands the images to the engine as ``multi_modal_data``. Tile cap:
    ``max_dynamic_patch``/``dynamic_image_size`` for remote-code InternVL (``internvl_chat``), the HF processor's
    ``max_patches``/``crop_to_patches`` for InternVL-HF, nothing for other families.
    """

    def __init__(self, model_path: str | Path, *, tp: int = 1, dtype: str = "auto", dynamic: bool = True,
                 max_num: int = 6, max_images_per_prompt: int = 1, trust_remote_code: bool = False,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, system_prompt: str = "auto"):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"--backend vllm needs vLLM: pip install 'mpo[vllm]' ({err})") from None
        from mpo.models import read_model_config

        self._vllm = vllm
        self.model_type = str(read_model_config(model_path).get("model_type", ""))
        self.dynamic, self.max_num = dynamic, max_num
        engine: dict[str, Any] = {"tensor_parallel_size": tp, "dtype": dtype, "trust_remote_code": trust_remote_code,
                                  "gpu_memory_utilization": gpu_memory_utilization,
                                  "limit_mm_per_prompt": {"image": max(1, max_images_per_prompt)}}
        if max_model_len is not None:
            engine["max_model_len"] = max_model_len
        self.llm = vllm.LLM(model=str(model_path), **engine)
        # the tokenizer's chat template is the one LLM.chat renders
        self.system_prompt = resolve_system_prompt(self.llm.get_tokenizer(), system_prompt,
                                                   internvl=self.model_type in ("internvl", "internvl_chat"))

    def mm_processor_kwargs(self, n_images: int) -> dict[str, Any] | None:
        """The per-request tile cap in the form this model's vLLM processor reads."""
        budget = max(1, self.max_num // max(1, n_images)) if self.dynamic else 1
        if self.model_type == "internvl_chat":
            return {"max_dynamic_patch": budget, "dynamic_image_size": self.dynamic}
        if self.model_type == "internvl":
            return {"max_patches": budget, "crop_to_patches": self.dynamic}
        return None

    def sample(self, requests: Sequence[SampleRequest], n: int, params: SamplingParams) -> list[list[Sample]]:
        """One ``LLM.chat`` call per (continue flag, image count) group; ``n`` samples share each prefill."""
        _check_seeds(requests, n)
        results: list[list[Sample] | None] = [None] * len(requests)
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault((req.continue_final_message, len(req.images)), []).append(i)
        for (cont, n_images), idxs in groups.items():
            sps = [self._vllm.SamplingParams(n=n, temperature=params.temperature, top_k=params.top_k or -1,
                                             top_p=params.top_p, max_tokens=params.max_new_tokens,
                                             seed=requests[i].seeds[0]) for i in idxs]
            internvl = self.model_type in ("internvl", "internvl_chat")
            outs = self.llm.chat([_vllm_messages(requests[i], self.system_prompt, internvl) for i in idxs], sps,
                                 use_tqdm=False,
                                 add_generation_prompt=not cont, continue_final_message=cont,
                                 mm_processor_kwargs=self.mm_processor_kwargs(n_images))
            for i, out in zip(idxs, outs, strict=True):
                results[i] = [Sample(o.text, str(o.finish_reason), len(o.token_ids)) for o in out.outputs]
        return [r for r in results if r is not None]


def build_sampler(backend: str, model_path: str | Path, *, dtype: str, device: str, tp: int, dynamic: bool,
                  max_num: int, max_images_per_prompt: int = 1, trust_remote_code: bool = False,
                  system_prompt: str = "auto") -> Sampler:
    """``HFSampler`` for ``--backend hf``, ``VLLMSampler`` for ``--backend vllm``."""
    if backend == "hf":
        if tp != 1:
            raise ValueError(f"--tp {tp}: tensor parallelism needs --backend vllm (hf runs one model per process)")
        return HFSampler(model_path, dtype=dtype, device=device, dynamic=dynamic, max_num=max_num,
                         trust_remote_code=trust_remote_code, system_prompt=system_prompt)
    if backend == "vllm":
        return VLLMSampler(model_path, tp=tp, dtype=dtype, dynamic=dynamic,
                           max_num=max_num, max_images_per_prompt=max_images_per_prompt,
                           trust_remote_code=trust_remote_code, system_prompt=system_prompt)
    raise ValueError(f"--backend must be hf or vllm, got {backend!r}")


def _check_seeds(requests: Sequence[SampleRequest], n: int) -> None:
    for i, req in enumerate(requests):
        if len(req.seeds) != n:
            raise ValueError(f"request {i} carries {len(req.seeds)} seeds for n={n} samples")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if any(item.get("type") == "image" for item in content):
        raise ValueError("this checkpoint is a text-only model: it cannot take an image")
    return "".join(item.get("text", "") for item in content)


def with_row_system(row: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` led by the prompt row's own ``system_prompt`` when it has one: training renders the pair made
    from the row with it, so its samples must be drawn under it too (it also replaces ``--system-prompt``)."""
    system = row.get("system_prompt")
    if not isinstance(system, str):
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """``messages`` led by a system turn with ``system``, unless it is None or the request brings its own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]


def fit_image_newlines(messages: list[dict[str, Any]], template_newline: bool) -> list[dict[str, Any]]:
    """``messages`` with ONE leading newline cut from each text item that follows an image item, when the chat
    template writes a newline after an image itself (InternVL's ``-HF`` templates): ``<image>\\nQ`` then renders
    with one newline, as :class:`mpo.data.encode.PairEncoder` renders the pair for training. Unchanged otherwise."""
    if not template_newline:
        return messages
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{**c, "text": c["text"][1:]}
                       if k and c.get("type") == "text" and content[k - 1].get("type") == "image"
                       and c["text"].startswith("\n") else c for k, c in enumerate(content)]
        out.append({**m, "content": content})
    return out


def _vllm_messages(req: SampleRequest, system: str | None = None, internvl: bool = True) -> list[dict[str, Any]]:
    """``req`` as ``LLM.chat`` takes it. The engine renders the model's own template, which is not probed here: an
    InternVL template writes a newline after each image (the row's is dropped), Qwen-VL's writes none."""
    images = iter(req.images)
    messages = []
    for m in fit_image_newlines(with_system(req.messages, system), internvl):
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image_pil", "image_pil": next(images)} if c.get("type") == "image" else c
                       for c in content]
        messages.append({"role": m["role"], "content": content})
    return messages
