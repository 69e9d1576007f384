"""``mpo generate correctness``: N chain-of-thought samples per prompt, for pairing by answer correctness.

Per prompt row (``question``, ``answer``, optional ``image``): the question loses a trailing short-answer
instruction, goes into the ``--prompt-version`` template (default ``en_v2``), its ``<image>`` markers are placed
(``mpo.generate.prompts``), and the model samples ``--num-return-sequences`` responses with the images.
Correctness is not judged here (``mpo postprocess`` does that). One record per sample::

    {...every input field..., "question_orig": <input question>, "question": <wrapped prompt, markers placed>,
     "response": <text>, "prompt_version": "en_v2", "item_id": <sha1>, "sample_idx": 0..N-1,
     "seed": <sample seed>, "finish_reason": "stop" | "length", "num_tokens": <generated tokens>}

Output: ``<out-dir>/<model_name>/max_tiles_<max-num>/<prompt basename>`` (the seed's layout). Unlike the seed,
the template is chosen by the flag only (the seed also switched to Chinese when the path contained ``_zh_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mpo.config import field
from mpo.generate.items import PromptItem, load_item_images, model_name, read_prompts
from mpo.generate.prompts import PROMPT_VERSIONS, place_image_markers, to_content, wrap_question
from mpo.generate.samplers import Sample, Sampler, SampleRequest, with_row_system
from mpo.generate.sharding import GenerateConfig, GenerationJob, OutputLayout, RunResult, run_job

__all__ = ["GENERATED_FIELDS", "CorrectnessConfig", "correctness_output_path", "run_correctness"]

GENERATED_FIELDS = ("question_orig", "question", "response", "prompt_version", "item_id", "sample_idx", "seed",
                    "finish_reason", "num_tokens")
"""What a record adds to its prompt row (``make_line``); the merge takes the rest from the current row."""


@dataclass
class CorrectnessConfig(GenerateConfig):
    """Flags of ``mpo generate correctness``."""

    prompt_version: str = field(default="en_v2", help=f"instruction template: {', '.join(PROMPT_VERSIONS)}")

    def __post_init__(self) -> None:
        if self.prompt_version not in PROMPT_VERSIONS:
            raise ValueError(f"--prompt-version must be one of {', '.join(PROMPT_VERSIONS)}, "
                             f"got {self.prompt_version!r}")


def correctness_output_path(cfg: CorrectnessConfig) -> Path:
    """``<out-dir>/<model_name>/max_tiles_<max-num>/<prompt basename>``."""
    return Path(cfg.out_dir) / model_name(cfg.checkpoint) / f"max_tiles_{cfg.max_num}" / Path(cfg.prompt_path).name


def run_correctness(cfg: CorrectnessConfig, sampler: Sampler | None = None, *, env: dict[str, str] | None = None,
                    ) -> RunResult:
    """Sample this rank's missing responses and merge when complete (``mpo.generate.sharding``).

    ``sampler``: an already built backend (tests, benchmarks); by default it is built from ``cfg`` when needed.
    """
    cfg.check_paths()
    layout = OutputLayout(correctness_output_path(cfg))
    cfg.check_output(layout)
    if sampler is None:  # the sampler will be built from cfg: refuse flags it cannot be built from, now
        cfg.check_backend()
    version = cfg.prompt_version
    prompts = read_prompts(cfg.prompt_path, required=("question", "answer"),
                           prepare=lambda row, n_images: place_image_markers(wrap_question(row["question"], version),
                                                                              n_images),
                           image_root=cfg.image_root, allow_outside_root=cfg.allow_outside_root,
                           sample_max_num=cfg.sample_max_num)

    def make_request(item: PromptItem, images: list[Image.Image], seeds: tuple[int, ...]) -> SampleRequest:
        messages = with_row_system(item.row, [{"role": "user", "content": to_content(item.prompt)}])
        return SampleRequest(messages, tuple(images), False, seeds)

    def make_line(item: PromptItem, idx: int, seed: int, sample: Sample) -> dict[str, Any]:
        return {**item.row, "question_orig": item.row["question"], "question": item.prompt,
                "response": sample.text, "prompt_version": version, "item_id": item.item_id, "sample_idx": idx,
                "seed": seed, "finish_reason": sample.finish_reason, "num_tokens": sample.num_tokens}

    job = GenerationJob(
        name="correctness", prompts=prompts, n=cfg.num_return_sequences,
        layout=layout, params=cfg.sampling_params(), seed=cfg.seed,
        settings={"generator": "correctness", "prompt_version": version, **cfg.settings()},
        make_request=make_request, make_line=make_line, load_images=lambda item: load_item_images(prompts, item),
        generated_fields=GENERATED_FIELDS)
    factory = (lambda: sampler) if sampler is not None else cfg.sampler_factory(prompts)
    return run_job(job, factory, batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress,
                   env=env)
