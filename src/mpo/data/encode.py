"""Preference row → prompt ids, chosen ids, rejected ids and image inputs, with the model's own processor.

The prompt is rendered by the model's chat template and expanded by its processor, so it is token for token
what the model sees at inference. Worked example (tiny InternVL, 64x64 tiles, 16 tokens per tile; a 64x192
image with ``max_patches=6`` gives 3 tiles + 1 thumbnail)::

    question "<image>\\nWhat colour is the cube?", chosen "The cube is red.", rejected "The cube is blue."
    prompt   <|im_start|>user\\n<img><IMG_CONTEXT>x64</img>\\nWhat colour is the cube?<|im_end|>\\n<|im_start|>assistant\\n
    chosen   The cube is red.<|im_end|>        rejected  The cube is blue.<|im_end|>
    image_inputs {"pixel_values": (4, 3, 64, 64)}, n_image_tokens 64

The row's newline after ``<image>`` is replaced by the one InternVL's template writes after each image; a template
that writes none (Qwen2.5-VL: ``<|vision_end|>``) keeps the row's (:func:`question_content`). An ``<image>`` inside
a line (``"this <image> shape?"``) still gets the InternVL template's newline (``</img>\\n shape?``) where
InternVL's own scripts write the block in place (``</img> shape?``): chat content items cannot say otherwise.

The completion is ``answer + END`` (END = the template's end-of-turn string, ``<|im_end|>`` for ChatML),
tokenized on its own, so the prompt/completion boundary is exact by construction: no token can merge across
it. The newline the template writes after ``<|im_end|>`` is *not* part of the completion: at inference the
model stops at the end-of-turn token and never produces it. (The seed's new version trained on that newline;
its old version did not.)

Lengths are planned before any pixel is touched (``plan_length``): the image token count comes from the
processor's own size → patch-count helper, so ``plan_length(...) == encode(...).length`` exactly. A pair longer
than ``max_length`` is dropped (``TooLongError``), never truncated through an image or an answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mpo.data.errors import RowError, TooLongError
from mpo.data.records import IMAGE_PLACEHOLDER

__all__ = ["ENCODING_VERSION", "TOKEN_ALIGNED_KEYS", "EncodedPair", "PairEncoder", "processor_tiles",
           "question_content"]

# Raised whenever mpo renders a pair into other tokens, so that a reference cache of the old tokens is refused:
# 2 (2026-11-27): a template that writes nothing after an image (Qwen-VL) keeps the row's newline after <image>.
ENCODING_VERSION = 2

# Processor outputs with one value per prompt token (stored as (P,) like prompt_ids); a collator extends
# them over the completion with 0 ("text"). Qwen2.5-VL needs mm_token_type_ids for its 3D RoPE positions.
TOKEN_ALIGNED_KEYS = frozenset({"mm_token_type_ids", "token_type_ids"})
_SENTINEL = "MPO_END_OF_TURN_PROBE"
_BEFORE_IMAGE, _AFTER_IMAGE = "MPO_BEFORE_IMAGE_PROBE", "MPO_AFTER_IMAGE_PROBE"


class _Record(Protocol):
    dataset: str
    line: int
    question: str
    chosen: str
    rejected: str
    system_prompt: str | None


@dataclass
class EncodedPair:
    """One encoded preference pair.

    prompt_ids: (P,) int64, system/user turns + assistant header, image tokens expanded.
    chosen_ids: (C,) int64, chosen answer tokens + the end-of-turn token. rejected_ids: (R,) likewise.
    image_inputs: every processor output except input_ids/attention_mask: InternVL ``pixel_values``
    (T, 3, S, S) with T tiles over all images; Qwen2.5-VL ``pixel_values`` (N, 3·2·P²) + ``image_grid_thw``
    (n_images, 3); ``mm_token_type_ids`` (P,) when returned (see ``TOKEN_ALIGNED_KEYS``); ``{}`` for text.
    n_image_tokens: prompt positions filled by image features (InternVL: image_seq_length x tiles).
    """

    prompt_ids: torch.Tensor
    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    n_images: int = 0
    n_image_tokens: int = 0
    dataset: str = ""
    line: int = 0
    group: int | None = None
    """Pairs of one question (same prompt and images) encoded together share a group id and the very ``prompt_ids``
    and ``image_inputs`` tensors (:meth:`PairEncoder.encode_answers`), so the reference precompute can score them
    in one span."""

    @property
    def length(self) -> int:
        """P + max(C, R): the longer of the two sequences prompt+chosen and prompt+rejected."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@contextmanager
def _refusal_is_the_rows(record: _Record, images: list) -> Iterator[None]:
    """An exception from the processor while it handles one row's images (Qwen2.5-VL refuses an aspect ratio over
    200; a processor may refuse a size or mode) becomes that row's :class:`RowError`: reported and written aside,
    not a crash of the run."""
    try:
        yield
    except RowError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the processor raises, it is about this row
        field = "image" if images else "question"
        raise RowError(record.dataset, record.line, field,
                       f"the processor refused it: {type(exc).__name__}: {exc}") from exc


def question_content(question: str, *, drop_newline: bool = True) -> list[dict[str, str]]:
    """Split a question on ``<image>`` into chat content items, so the chat template places each image.

    ``drop_newline``: the chat template writes a newline after each image itself (InternVL's ``-HF`` templates
    write ``<IMG_CONTEXT>\\n``), so ONE newline directly after a placeholder is dropped: MMPR-style rows write
    ``<image>\\nQuestion`` and keeping it would double the newline. Pass False for a template that writes none
    (Qwen2.5-VL's ends an image with ``<|vision_end|>``): the row's newline is then kept. ``PairEncoder`` passes
    what it found in its template (:attr:`PairEncoder.image_newline`). Empty text pieces are left out.

    >>> question_content("<image>\\nWhat colour?")
    [{'type': 'image'}, {'type': 'text', 'text': 'What colour?'}]
    >>> question_content("<image>\\nWhat colour?", drop_newline=False)
    [{'type': 'image'}, {'type': 'text', 'text': '\\nWhat colour?'}]
    """
    content: list[dict[str, str]] = []
    for i, piece in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
            if drop_newline and piece.startswith("\n"):
                piece = piece[1:]
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def processor_tiles(processor: Any) -> bool:
    """Whether ``processor`` cuts images into tiles (InternVL's ``crop_to_patches``); Qwen-VL's does not."""
    return hasattr(getattr(processor, "image_processor", None), "crop_to_patches")


class PairEncoder:
    """Encode preference records with a model's processor (VLM) or tokenizer (text-only LM).

    ``max_length`` (tokens, image tokens included) drops longer pairs with ``TooLongError``; None keeps all.

    ``image_newline``: whether the chat template writes a newline after an image (InternVL's ``-HF`` templates:
    ``<IMG_CONTEXT>\\n``; Qwen2.5-VL's: no), read once from a rendered probe; a row's newline right after
    ``<image>`` is dropped only then (:func:`question_content`), so ``<image>\\nQ`` gives one newline either way.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, system_prompt: str | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.multimodal = hasattr(processor, "image_processor")
        self.tokenizer = processor.tokenizer if self.multimodal else processor
        if not (getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            raise ValueError(f"{type(processor).__name__} has no chat template; MPO needs one to render prompts")
        probe = self._render_probe()
        self.end_of_turn = self._find_end_of_turn(probe)
        self.image_newline = self._find_image_newline(probe)
        self.control_tokens = self._find_control_tokens(probe)
        self._tiles = processor_tiles(processor)
        self.image_token_id = getattr(processor, "image_token_id", None) if self.multimodal else None

    def _content(self, text: str) -> Any:
        # Processors' templates iterate over typed items; plain LM templates expect a string.
        return [{"type": "text", "text": text}] if self.multimodal else text

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _render_probe(self) -> str:
        """One user turn (for VLMs: text, an image, text) and one assistant turn whose answer is a sentinel."""
        user = ([{"type": "text", "text": _BEFORE_IMAGE}, {"type": "image"}, {"type": "text", "text": _AFTER_IMAGE}]
                if self.multimodal else "hi")
        return self._render([{"role": "user", "content": user},
                             {"role": "assistant", "content": self._content(_SENTINEL)}], False)

    def _find_end_of_turn(self, probe: str) -> str:
        """The template's end-of-turn string: what it writes after an assistant answer, minus the trailing
        whitespace (ChatML: ``<|im_end|>\n`` → ``<|im_end|>``); the tokenizer's EOS if it writes nothing."""
        end = probe[probe.rindex(_SENTINEL) + len(_SENTINEL):].rstrip() or self.tokenizer.eos_token
        if not end:
            raise ValueError(f"{type(self.processor).__name__}: the chat template writes nothing after an "
                             "assistant answer and the tokenizer has no eos_token: cannot end a completion")
        return end

    def _find_image_newline(self, probe: str) -> bool:
        """Whether the template's rendering of an image item ends with a newline: what it writes between the
        text before and the text after the image (InternVL-HF: ``<IMG_CONTEXT>\\n``; Qwen2.5-VL:
        ``<|vision_start|><|image_pad|><|vision_end|>``). False for a text-only model, and for a template that
        writes the image elsewhere (nothing between the two texts)."""
        if not self.multimodal:
            return False
        start = probe.find(_BEFORE_IMAGE)
        stop = probe.find(_AFTER_IMAGE)
        return 0 <= start < stop and probe[start + len(_BEFORE_IMAGE):stop].endswith("\n")

    def _find_control_tokens(self, probe: str) -> list[str]:
        """Special tokens that row text must not contain: those the template itself writes (turn markers,
        image markup), the processor's image/video placeholders, and BOS/EOS/PAD. Other special tokens
        (InternVL's ``<ref>``/``<box>`` grounding tags, ``<think>``) are legitimate answer text."""
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        found = {t for t in specials if t in probe}
        found |= {getattr(self.processor, name, None) for name in
                  ("image_token", "video_token", "start_image_token", "end_image_token")}
        found |= {self.tokenizer.bos_token, self.tokenizer.eos_token, self.tokenizer.pad_token}
        return sorted((t for t in found if t), key=lambda t: (-len(t), t))

    def prompt_text(self, record: _Record) -> str:
        """The rendered prompt (chat template, ``add_generation_prompt=True``), image placeholders unexpanded."""
        messages: list[dict[str, Any]] = []
        system = record.system_prompt if record.system_prompt is not None else self.system_prompt
        if system is not None:
            messages.append({"role": "system", "content": self._content(system)})
        user = (question_content(record.question, drop_newline=self.image_newline) if self.multimodal
                else record.question)
        messages.append({"role": "user", "content": user})
        return self._render(messages, add_generation_prompt=True)

    def _check_row(self, record: _Record, n_images: int) -> None:
        for name in ("question", "chosen", "rejected", "system_prompt"):
            text = getattr(record, name) or ""
            for special in self.control_tokens:
                if special in text:
                    raise RowError(record.dataset, record.line, name,
                                   f"contains the special token {special!r}, which the model would read as "
                                   "a control token")
        if n_images and not self.multimodal:
            raise RowError(record.dataset, record.line, "image", f"the model is text-only (its processor "
                           f"is a tokenizer) but the row has {n_images} image(s)")
        n_placeholders = record.question.count(IMAGE_PLACEHOLDER)
        if n_placeholders != n_images:
            raise RowError(record.dataset, record.line, "question", f"has {n_placeholders} {IMAGE_PLACEHOLDER} "
                           f"placeholder(s) but {n_images} image(s) were given")

    @property
    def tiles(self) -> bool:
        """The processor cuts images into tiles (InternVL), giving ``pixel_values`` (T, 3, S, S)."""
        return self._tiles

    def _image_kwargs(self, max_patches: int | None) -> dict[str, Any]:
        """Tiling kwargs for processors that tile (InternVL); processors without tiles (Qwen2.5-VL) get none
        and ignore ``max_patches``: their image grid comes from the pixel budget of the processor."""
        if not self._tiles:
            return {}
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        return {"crop_to_patches": True} | ({} if max_patches is None else {"max_patches": max_patches})

    def _add_special_tokens(self, text: str) -> bool:
        # As processor.apply_chat_template(tokenize=True) does: a template that already wrote the BOS
        # must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _completion_ids(self, answer: str) -> torch.Tensor:
        ids = self.tokenizer(answer + self.end_of_turn, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def encode(self, record: _Record, images: list, *, max_patches: int | None = None) -> EncodedPair:
        """Encode one record; ``images`` are the row's images in placeholder order (PIL images).

        ``max_patches`` caps the tiles per image (InternVL; the row's tile budget from the data layer).
        Raises ``RowError`` for an unusable row and ``TooLongError`` when ``length > max_length``.
        """
        images = list(images)
        self._check_row(record, len(images))
        text = self.prompt_text(record)
        add_special = self._add_special_tokens(text)
        if self.multimodal:
            kwargs = self._image_kwargs(max_patches) if images else {}
            with _refusal_is_the_rows(record, images):
                out = self.processor(text=[text], images=images or None, return_tensors="pt",
                                     add_special_tokens=add_special, **kwargs)
        else:
            out = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
        prompt_ids = out.pop("input_ids")[0].to(torch.long)
        out.pop("attention_mask", None)
        image_inputs = {k: (v[0] if k in TOKEN_ALIGNED_KEYS else v) for k, v in out.items()}
        n_image_tokens = int((prompt_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        pair = EncodedPair(prompt_ids=prompt_ids, chosen_ids=self._completion_ids(record.chosen),
                           rejected_ids=self._completion_ids(record.rejected), image_inputs=image_inputs,
                           n_images=len(images), n_image_tokens=n_image_tokens, dataset=record.dataset,
                           line=record.line)
        self._check_length(record, pair, n_image_tokens)
        return pair

    def encode_answers(self, record: _Record, like: EncodedPair) -> EncodedPair:
        """``record`` encoded as ``like``'s sibling: another pair of the same question (dataset, images, question
        and system prompt all equal — the caller's key), so only its answers are tokenized; the prompt and image
        tensors are ``like``'s own (images decoded and tiled once per question), and so is its ``group``.
        Raises ``RowError``/``TooLongError`` as :meth:`encode` does.
        """
        self._check_row(record, like.n_images)
        pair = EncodedPair(prompt_ids=like.prompt_ids, chosen_ids=self._completion_ids(record.chosen),
                           rejected_ids=self._completion_ids(record.rejected), image_inputs=like.image_inputs,
                           n_images=like.n_images, n_image_tokens=like.n_image_tokens, dataset=record.dataset,
                           line=record.line, group=like.group)
        self._check_length(record, pair, like.n_image_tokens)
        return pair

    def plan_length(self, record: _Record, image_sizes: list[tuple[int, int]], *,
                    max_patches: int | None = None) -> int:
        """``encode(...).length`` without pixel processing. ``image_sizes`` are ``(width, height)`` per image,
        in PIL's ``Image.size`` order. Each image placeholder token of the rendered prompt is replaced by
        the processor's ``num_image_tokens`` for that size (InternVL: ``<img>`` + 16·tiles + ``</img>``).

        Does not check ``max_length``: compare the result yourself (the data layer reports, then drops).
        """
        self._check_row(record, len(image_sizes))
        text = self.prompt_text(record)
        n_prompt = len(self.tokenizer(text, add_special_tokens=self._add_special_tokens(text))["input_ids"])
        if image_sizes:
            if not hasattr(self.processor, "_get_num_multimodal_tokens"):
                raise NotImplementedError(f"{type(self.processor).__name__} cannot count image tokens from image "
                                          "sizes (no _get_num_multimodal_tokens); encode the pair to measure it")
            kwargs = self._image_kwargs(max_patches)
            with _refusal_is_the_rows(record, image_sizes):
                mm = self.processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in image_sizes], **kwargs)
            n_prompt += sum(mm.num_image_tokens) - len(image_sizes)
        return n_prompt + max(len(self._completion_ids(record.chosen)), len(self._completion_ids(record.rejected)))

    def _check_length(self, record: _Record, pair: EncodedPair, n_image_tokens: int) -> None:
        if self.max_length is None or pair.length <= self.max_length:
            return
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        # Name the field that pushes the pair over: the prompt itself, or the longer answer.
        name = "question" if p >= self.max_length else ("chosen" if c >= r else "rejected")
        raise TooLongError(record.dataset, record.line, name,
                           f"pair is {pair.length} tokens (prompt {p} incl. {n_image_tokens} image tokens, "
                           f"chosen {c}, rejected {r}), over max_length {self.max_length}; dropped, not truncated")
