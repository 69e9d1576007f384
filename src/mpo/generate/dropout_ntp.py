"""``mpo generate dropout-ntp``: a rejected answer written without the image (MPO paper, DropoutNTP).

For a row (``question``, ``chosen``, optional ``image``): keep the first ``--start-ratio`` of ``chosen`` and let the
same model continue it **without the image**: the question becomes a text-only user turn (image markers removed)
and the kept prefix the start of the assistant turn, rendered open (``continue_final_message``) so that the model
writes on from it. ``rejected = prefix + continuation``: its ending is ungrounded, likely hallucinated text.

Truncation keeps an exact prefix *string* of ``chosen`` (``truncate_chosen``), so ``rejected.startswith(prefix)``
and ``chosen.startswith(prefix)`` always hold. Units are whitespace-separated words, and each CJK character
(Chinese, Japanese kana, CJK punctuation) is a unit of its own; ``floor(units * start_ratio)`` units are kept and
the prefix ends right after the last kept unit. (The seed split on single spaces only, so Chinese text kept an
empty prefix, and it stripped the trailing newline.)

A continuation for which ``rejected`` equals ``chosen`` (after stripping) teaches nothing: it is dropped and counted
(``dropped.reproduces_chosen`` in the summary). Record per kept sample::

    {...every input field..., "rejected": prefix + continuation, "item_id", "sample_idx", "seed",
     "finish_reason", "num_tokens"}

Output: ``<out-dir>/<model_name>/<prompt basename>``. Images are never decoded (only checked to exist, since the
pair is useless for training without them); ``--dynamic``/``--max-num`` are accepted for the seed's command line,
have no effect, and are not part of the output's settings, so a rerun may change them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mpo.config import field
from mpo.generate.items import PromptItem, model_name, read_prompts
from mpo.generate.prompts import drop_image_markers
from mpo.generate.samplers import Sample, Sampler, SampleRequest, with_row_system
from mpo.generate.sharding import MARKER, GenerateConfig, GenerationJob, OutputLayout, RunResult, run_job

__all__ = ["GENERATED_FIELDS", "DropoutNTPConfig", "dropout_output_path", "run_dropout_ntp", "truncate_chosen"]

GENERATED_FIELDS = ("rejected", "item_id", "sample_idx", "seed", "finish_reason", "num_tokens")
"""What a record adds to its prompt row (``make_line``); the merge takes the rest from the current row."""

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f"
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


@dataclass
class DropoutNTPConfig(GenerateConfig):
    """Flags of ``mpo generate dropout-ntp`` (the seed's defaults: 1 sample, 2048 new tokens, ratio 0.5)."""

    num_return_sequences: int = field(default=1, ge=1, help="rejected answers per chosen answer")
    max_new_tokens: int = field(default=2048, ge=1)
    start_ratio: float = field(default=0.5, ge=0, lt=1, help="share of chosen's words kept as the prefix")

    def __post_init__(self) -> None:
        if not 0 <= self.start_ratio < 1:
            raise ValueError(f"--start-ratio must be in [0, 1), got {self.start_ratio}")

    def settings(self) -> dict[str, Any]:
        """The shared settings without the tiling flags: no image is ever sent, so they cannot change a sample,
        and a rerun that changes them must not be refused. (Outputs started when they were recorded still
        resume: ``check_settings`` compares only the keys recorded now.)"""
        return {k: v for k, v in super().settings().items() if k not in ("dynamic", "max_num")}


def truncate_chosen(chosen: str, ratio: float) -> str:
    """The first ``floor(units * ratio)`` units of ``chosen``, as an exact prefix string (module docstring).

    Examples: ``("The cat sat on the mat.", 0.5)`` -> ``"The cat sat"``; ``("猫坐在垫子上。", 0.5)`` -> ``"猫坐在"``
    (7 units: 6 characters and the full stop); ``("Step 1\\nStep 2", 0.5)`` -> ``"Step 1"``.
    """
    units = list(_UNIT.finditer(chosen))
    keep = math.floor(len(units) * ratio + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996 in floating point
    return chosen[: units[keep - 1].end()] if keep else ""


def dropout_output_path(cfg: DropoutNTPConfig) -> Path:
    """``<out-dir>/<model_name>/<prompt basename>`` (no tile folder, as in the seed)."""
    return Path(cfg.out_dir) / model_name(cfg.checkpoint) / Path(cfg.prompt_path).name


def _text_only_question(row: dict[str, Any], n_images: int) -> str:
    text = drop_image_markers(row["question"])
    if not text:
        raise ValueError("has no text once the image markers are removed")
    return text


def run_dropout_ntp(cfg: DropoutNTPConfig, sampler: Sampler | None = None, *, env: dict[str, str] | None = None,
                    ) -> RunResult:
    """Continue this rank's truncated answers without their images and merge when complete."""
    cfg.check_paths()
    layout = OutputLayout(dropout_output_path(cfg))
    cfg.check_output(layout)
    if sampler is None:  # the sampler will be built from cfg: refuse flags it cannot be built from, now
        cfg.check_backend()
    ratio = cfg.start_ratio
    prompts = read_prompts(cfg.prompt_path, required=("question", "chosen"), prepare=_text_only_question,
                           id_fields=("question", "chosen"), image_root=cfg.image_root,
                           allow_outside_root=cfg.allow_outside_root, sample_max_num=cfg.sample_max_num)

    def make_request(item: PromptItem, images: list[Image.Image], seeds: tuple[int, ...]) -> SampleRequest:
        messages = [{"role": "user", "content": [{"type": "text", "text": item.prompt}]},
                    {"role": "assistant", "content": [{"type": "text", "text": truncate_chosen(item.row["chosen"],
                                                                                             ratio)}]}]
        return SampleRequest(with_row_system(item.row, messages), (), True, seeds)

    def make_line(item: PromptItem, idx: int, seed: int, sample: Sample) -> dict[str, Any]:
        chosen = item.row["chosen"]
        rejected = truncate_chosen(chosen, ratio) + sample.text
        if rejected.strip() == chosen.strip():
            return {MARKER: "dropped", "item_id": item.item_id, "sample_idx": idx, "seed": seed,
                    "reason": "reproduces_chosen"}
        return {**item.row, "rejected": rejected, "item_id": item.item_id, "sample_idx": idx, "seed": seed,
                "finish_reason": sample.finish_reason, "num_tokens": sample.num_tokens}

    job = GenerationJob(
        name="dropout-ntp", prompts=prompts, n=cfg.num_return_sequences, layout=layout,
        params=cfg.sampling_params(), seed=cfg.seed,
        settings={"generator": "dropout-ntp", "start_ratio": ratio, **cfg.settings()},
        make_request=make_request, make_line=make_line, load_images=lambda item: [],
        generated_fields=GENERATED_FIELDS)
    factory = (lambda: sampler) if sampler is not None else cfg.sampler_factory(prompts)
    return run_job(job, factory, batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress,
                   env=env)
