"""Tiny random-weight models that load by path exactly like real checkpoints.

``build_tiny(out_dir, arch)`` writes, with ``save_pretrained``:

- a random-weight model of the real class (``InternVLForConditionalGeneration``,
  ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2ForCausalLM``);
- a byte-level BPE tokenizer trained on the spot (a built-in generic corpus plus ``corpus``),
  with a ChatML chat template that places images the way the family's real template does;
- for the VLMs, the stock transformers processor (``InternVLProcessor`` with ``GotOcr2ImageProcessor``
  and ``InternVLVideoProcessor``; ``Qwen2_5_VLProcessor`` with ``Qwen2VLImageProcessor`` and
  ``Qwen2VLVideoProcessor``), so ``AutoProcessor.from_pretrained(out_dir)`` restores it.

Geometry of the tiny InternVL at the defaults (S=64, P=8): one tile is 64x64 pixels, 8x8 = 64 ViT patches,
pixel shuffle 0.5 → 16 ``<IMG_CONTEXT>`` tokens per tile; a 64x192 image with ``max_patches=6`` is
3 tiles + 1 thumbnail → ``pixel_values`` (4, 3, 64, 64) and 64 image tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from mpo.data.system import INTERNVL_SYSTEM_PROMPT
from mpo.fsio import replaceable_dir, staged_dir

__all__ = ["ARCHS", "TINY_MARKER", "build_tiny", "default_corpus", "read_corpus"]

# written into every tiny model folder: the only folders build_tiny may replace
TINY_MARKER = "mpo_tiny.json"

ARCHS = ("internvl", "qwen2_5_vl", "qwen2")

# The seed (InternVL) normalises tiles with the ImageNet statistics (seed_training.md 3.5).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")
_SHAPES = ("square", "circle", "triangle", "cube", "ball", "star", "box", "line", "disk", "ring")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACES = ("left", "right", "top", "bottom", "middle", "center", "corner", "edge")

_INTERNVL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
                      "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<think>", "</think>")
_QWEN_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
_QWEN_TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


_GENERIC_TEXT = [
    "We look at the picture and answer each question about what we can see in it.",
    "First, find the objects; then count them, compare their sizes and name their colours.",
    "This is a small model for tests, so its answers are random until it has been trained.",
    "A good answer is short, correct and follows from the image, not from a guess.",
    "If the question asks for a number, write the number; if it asks for a word, write the word.",
    "The chart has a title, two axes and a legend that explains each bar and line.",
    "Read the text in the image carefully before you choose one of the options A, B, C or D.",
    "People, animals, cars, trees, houses, books, tables and chairs are common things in photos.",
    "The sum of the angles of a triangle is 180 degrees, and a square has four equal sides.",
    "Which option is right? Explain your reasoning, then give the final answer on the last line.",
]


def default_corpus() -> list[str]:
    """Generic English with colour words, shapes, digits and number words (deterministic, ~1.4k lines).

    Every colour word occurs 50 times after a space (shapes and number words more), so the BPE merges
    each into one token (``" red"`` → ``Ġred``): two answers that differ only in a colour word then
    have equal token length and differ in exactly one token.
    """
    lines: list[str] = []
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines += [f"The {shape} is {colour}.", f"A {colour} {shape} is in the image.",
                  f"What colour is the {shape}? The {shape} is {colour}.",
                  f"The answer is {colour}.", f"I see a {colour} {shape} on the {_PLACES[len(lines) % 8]}."]
    for i, (word, shape) in enumerate(itertools.product(_NUMBERS, _SHAPES)):
        lines += [f"There are {word} {shape}s.", f"How many {shape}s are there? {i % 10}",
                  f"The answer is {i % 10}.", f"{i} + {i % 7} = {i + i % 7}", f"Count: {word}, digit {i % 10}."]
    lines += ["Question: describe the image.", "Answer: yes", "Answer: no", "Let me think step by step.",
              "The image shows a picture with several objects.", "Please answer the question.",
              "Final answer:", "Because the shape has three sides, it is a triangle."] * 20
    lines += _GENERIC_TEXT * 10
    return lines


def read_corpus(paths: list[str | Path]) -> list[str]:
    """Corpus lines from ``.txt`` files (one non-empty line each) or ``.jsonl`` files (every string field).

    Raises ``ValueError("FILE:LINE: invalid JSON: ...")`` for a broken JSONL line.
    """
    lines: list[str] = []
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            lines += [line for line in text.splitlines() if line.strip()]
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: invalid JSON: {err.msg}") from None
            lines += list(_strings(row))
    return lines


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _chatml_template(image_markup: str, video_markup: str, default_system: str | None) -> str:
    """A ChatML Jinja template; ``{"type": "image"}`` content renders as ``image_markup``.

    Content may be a string or a list of ``{"type": "text"|"image"|"video"}`` items, as processors expect.
    """
    system = ""
    if default_system:
        system = ("{%- if messages[0]['role'] != 'system' -%}"
                  "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif -%}")
    return (system + "{%- for message in messages -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for item in message['content'] -%}"
            "{%- if item['type'] == 'image' -%}{{ '" + image_markup + "' }}"
            "{%- elif item['type'] == 'video' -%}{{ '" + video_markup + "' }}"
            "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{ '<|im_end|>\\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


# InternVL-HF templates write an image as <IMG_CONTEXT> plus a newline; the processor expands the
# <IMG_CONTEXT> into <img> + <IMG_CONTEXT> x (image_seq_length x tiles) + </img>.
INTERNVL_TEMPLATE = _chatml_template("<IMG_CONTEXT>\\n", "<video>\\n", None)
QWEN2_5_VL_TEMPLATE = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                       "<|vision_start|><|video_pad|><|vision_end|>", "You are a helpful assistant.")
QWEN2_TEMPLATE = _chatml_template("", "", "You are a helpful assistant.")


def _train_tokenizer(corpus: list[str], vocab_size: int, specials: tuple[str, ...], template: str,
                     extra_special_tokens: dict[str, str]):
    """Byte-level BPE trained on ``corpus``, wrapped as ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # The Qwen2 pipeline (NFC, split, byte-level). AutoTokenizer rebuilds exactly this pipeline for a qwen2
    # config (Qwen2Tokenizer keeps only vocab and merges from tokenizer.json), so the tokenizer reloads
    # identically whichever class restores it.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=template,
                                   extra_special_tokens=extra_special_tokens)


def _text_config_kwargs(tok, text_hidden: int, text_layers: int) -> dict[str, Any]:
    heads = 4
    if text_hidden % (2 * heads):
        raise ValueError(f"text_hidden must be a multiple of {2 * heads}, got {text_hidden}")
    return dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)


def _build_internvl(tok_corpus: list[str], out: Path, a: dict[str, Any]) -> None:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    size, patch = a["image_size"], a["patch_size"]
    if size % patch or (size // patch) % 2:
        raise ValueError(f"image_size / patch_size must be an even integer (pixel shuffle 0.5), got {size}/{patch}")
    # the identity line that mpo adds as InternVL's system message (mpo.data.system): a real InternVL tokenizer
    # reads it in ~35 tokens, and without it in the corpus the tiny one would spend ~180 bytes on every prompt
    tok = _train_tokenizer(tok_corpus + [INTERNVL_SYSTEM_PROMPT] * 20, a["vocab_size"], _INTERNVL_SPECIALS,
                           INTERNVL_TEMPLATE,
                           {"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    seq_len = (size // patch) ** 2 // 4  # pixel shuffle with ratio 0.5 merges 2x2 patches into one token
    vision = InternVLVisionConfig(hidden_size=a["vision_hidden"], num_hidden_layers=a["vision_layers"],
                                  num_attention_heads=4, intermediate_size=4 * a["vision_hidden"],
                                  image_size=size, patch_size=patch)
    text = Qwen2Config(**_text_config_kwargs(tok, a["text_hidden"], a["text_layers"]))
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=seq_len, downsample_ratio=0.5, tie_word_embeddings=True)
    image_processor = GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=True,
                                            min_patches=1, max_patches=a["max_patches"],
                                            image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
    video_processor = InternVLVideoProcessor(size={"height": size, "width": size},
                                             image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                  image_seq_length=seq_len, chat_template=INTERNVL_TEMPLATE)
    torch.manual_seed(a["seed"])
    model = InternVLForConditionalGeneration(config)
    _save(model, processor, tok, out)


def _build_qwen2_5_vl(tok_corpus: list[str], out: Path, a: dict[str, Any]) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    size, patch, merge = a["image_size"], a["patch_size"], 2
    tok = _train_tokenizer(tok_corpus, a["vocab_size"], _QWEN_VL_SPECIALS, QWEN2_5_VL_TEMPLATE,
                           {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    text = _text_config_kwargs(tok, a["text_hidden"], a["text_layers"])
    half = a["text_hidden"] // 4 // 2  # rotary half-dim per head; split over (t, h, w) like 16/24/24 of 64
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]}
    vision = dict(depth=a["vision_layers"], hidden_size=a["vision_hidden"], intermediate_size=4 * a["vision_hidden"],
                  num_heads=4, out_hidden_size=a["text_hidden"], patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2, window_size=2 * merge * patch, fullatt_block_indexes=[a["vision_layers"] - 1])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # One merged token covers (patch*merge)^2 pixels; max_pixels = S^2 caps an image at (S/(2P))^2 tokens.
    pixels = dict(min_pixels=(patch * merge) ** 2, max_pixels=size * size, patch_size=patch, merge_size=merge,
                  temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_5_VL_TEMPLATE)
    torch.manual_seed(a["seed"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    _save(model, processor, tok, out)


def _build_qwen2(tok_corpus: list[str], out: Path, a: dict[str, Any]) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer(tok_corpus, a["vocab_size"], _QWEN_TEXT_SPECIALS, QWEN2_TEMPLATE, {})
    torch.manual_seed(a["seed"])
    model = Qwen2ForCausalLM(Qwen2Config(**_text_config_kwargs(tok, a["text_hidden"], a["text_layers"])))
    _save(model, tok, tok, out)


def _save(model, processor, tok, out: Path) -> None:
    # generate() must stop at the end-of-turn token, as a real chat checkpoint does.
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    from transformers.utils import logging as hf_logging

    # A progress bar for one ~3 MB shard is noise on stderr; restore the caller's setting afterwards.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)


_BUILDERS = {"internvl": _build_internvl, "qwen2_5_vl": _build_qwen2_5_vl, "qwen2": _build_qwen2}


def build_tiny(out_dir: str | Path, arch: str = "internvl", *, corpus: list[str] | None = None,
               vocab_size: int = 2048, image_size: int = 64, patch_size: int = 8, text_hidden: int = 128,
               text_layers: int = 2, vision_hidden: int = 64, vision_layers: int = 2, max_patches: int = 12,
               seed: int = 0) -> Path:
    """Write a tiny random-weight ``arch`` model with its tokenizer/processor to ``out_dir``; return the path.

    Deterministic for a given ``seed`` and corpus (same weights, same ``tokenizer.json``). The folder is
    written next to ``out_dir`` first and moved into place, so a crash never leaves half a model. An
    existing ``out_dir`` is replaced only if it is empty or was written by this function (it holds
    ``mpo_tiny.json``, which records the arguments): a real checkpoint or a trained run is never replaced. A
    symbolic link is followed (its target is replaced, the link stays); a file or the current folder is refused
    before anything is built (:func:`mpo.fsio.replaceable_dir`).
    ``image_size``/``patch_size`` set one tile (InternVL) or the largest image (Qwen2.5-VL: at most
    ``image_size**2`` pixels, ``patch_size`` ViT patches merged 2x2).
    """
    if arch not in _BUILDERS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    out = Path(out_dir)
    real = replaceable_dir(out)  # before the build: a file or the current folder is refused in no time
    if real.exists() and any(real.iterdir()) and not (real / TINY_MARKER).is_file():
        what = ("holds a model without the mark of `mpo models tiny` (a checkpoint, a run's final/, or a tiny "
                "model built before mpo marked them)" if (real / "config.json").exists()
                else "exists and is not a model folder")
        raise FileExistsError(f"{out}: {what} (no {TINY_MARKER}); refusing to replace it: delete it yourself or "
                              "choose another folder")
    args = dict(vocab_size=vocab_size, image_size=image_size, patch_size=patch_size, text_hidden=text_hidden,
                text_layers=text_layers, vision_hidden=vision_hidden, vision_layers=vision_layers,
                max_patches=max_patches, seed=seed)
    with staged_dir(real) as tmp:
        _BUILDERS[arch](default_corpus() + list(corpus or []), tmp, args)
        (tmp / TINY_MARKER).write_text(json.dumps({"arch": arch, **args, "extra_corpus_lines": len(corpus or [])},
                                                  indent=1) + "\n")
    return out
