"""Sharded, resumable generation: part files per rank, no collective calls, an atomic merge at the end.

Layout, for a final output ``<dir>/<name>`` (``name`` = the prompt file's basename)::

    <dir>/<name>                                      merged output, written atomically once complete
    <dir>/parts/<name>.rank<R>-of-<W>.jsonl           what rank R of W appended (one JSON line per sample)
    <dir>/parts/<name>.settings.json                  the sampling settings the output was started with
    <dir>/reports/<stem>.rejected_prompts.jsonl       bad prompt rows (FILE:LINE: FIELD: message)
    <dir>/reports/<stem>.summary.json                 counts: items, samples, dropped, finish reasons

(Reports sit in a subfolder: several prompt files share one output folder, and postprocess reads its ``*.jsonl``.)
Every rank, independently (no collective calls):

1. reads *all* part files of the output, whatever world size wrote them: a sample ``(item_id, sample_idx)`` found
   anywhere is done; a torn last line (a kill during a write) is ignored, and cut off the rank's own file;
2. generates only the missing samples of its contiguous shard of the items, appending whole lines to its own
   part file with flush + fsync per batch: a kill loses at most the batch in flight and duplicates nothing;
3. re-reads all part files when done and, if every item is complete, writes the merged output (temp + rename).
   Each rank flushes before it looks, so the last rank to finish always sees everything; two finishing together
   write the same bytes. A rerun with everything done only merges. (On a filesystem without close-to-open
   consistency a rank may miss a peer's last lines: a rerun merges.)

Part lines are the final records, plus two kinds of markers. ``{"_mpo": "dropped", "item_id", "sample_idx",
"reason", ...}`` (a sample the generator threw away, e.g. a DropoutNTP continuation that reproduces the chosen
answer) tells a restart not to redo it. ``{"_mpo": "item_error", "item_id", "error", "kind", "attempt", "images"}``
settles a row that could not be sampled (an image that exists but cannot be decoded, or a row the model's
processor refused), so the merge can go on without it. A rerun tries it again once its image files changed, since
it may have been repaired (``PartState.retries``; a retried image is decoded before any model is built), and the
outcome of the latest attempt is what the report says. Every rank decides what is settled by the rule that picks
each rank's work (``PartState.settled``), so no rank merges while another still retries a row. Markers never
reach the merged output. A merged record is the item's prompt row as it is now plus the stored sample's
``GenerationJob.generated_fields``, so a corrected ``answer`` reaches the output without resampling.

Part files, their layout and the settings check live in ``mpo.generate.parts`` (re-exported here).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mpo.config import field as field_
from mpo.data.errors import RowError
from mpo.fsio import atomic_write_json, atomic_write_jsonl
from mpo.generate.items import PromptFile, PromptItem, image_stamp, model_name, sample_seed
from mpo.generate.outpaths import check_outputs
from mpo.generate.parts import (
    MARKER,
    REFUSED,
    OutputLayout,
    PartFileError,
    PartState,
    PartWriter,
    ResumeError,
    check_settings,
    item_error_marker,
    output_started,
    record_settings,
    scan_parts,
)
from mpo.generate.samplers import Sample, Sampler, SampleRequest, SamplingParams, build_sampler

__all__ = [
    "MARKER",
    "GenerateConfig",
    "GenerationJob",
    "local_device",
    "OutputLayout",
    "PartFileError",
    "PartState",
    "PartWriter",
    "ResumeError",
    "RunResult",
    "rank_and_world",
    "run_job",
    "scan_parts",
    "shard_range",
]

log = logging.getLogger("mpo.generate")


def rank_and_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun (``RANK``/``WORLD_SIZE``), else SLURM (``SLURM_PROCID``/``SLURM_NTASKS``),
    else ``(0, 1)``. With ``--tp > 1`` start one process per engine (per TP group), not one per GPU."""
    env = os.environ if env is None else env
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in env:
            try:
                rank, world = int(env[rank_var]), int(env.get(world_var, ""))
            except ValueError:
                raise ValueError(f"{rank_var}={env.get(rank_var)!r}, {world_var}={env.get(world_var)!r}: "
                                 "both must be integers") from None
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} is not in [0, {world_var}={world})")
            return rank, world
    return 0, 1


def local_device(backend: str, requested: str, tp: int, cuda_count: int,
                 env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """``(device, CUDA_VISIBLE_DEVICES to set or None)`` for this process.

    The local rank comes from ``LOCAL_RANK`` (torchrun) or ``SLURM_LOCALID``. ``hf``: ``--device auto`` is
    ``cuda:<local rank mod GPUs>`` (``cuda`` without a local rank; ``cpu`` without GPUs). ``vllm``: one engine spans
    ``tp`` GPUs, so local rank r gets GPUs ``r*tp .. r*tp+tp-1`` unless ``CUDA_VISIBLE_DEVICES`` is already set
    (as ``srun --gpus-per-task`` does). Example: vllm, tp 2, LOCAL_RANK 1 -> ``"2,3"``.
    """
    env = os.environ if env is None else env
    raw = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    local = int(raw) if raw is not None and raw.isdigit() else None
    if backend == "vllm":
        if local is None or "CUDA_VISIBLE_DEVICES" in env:
            return requested, None
        return requested, ",".join(str(local * tp + k) for k in range(tp))
    if requested != "auto":
        return requested, None
    if cuda_count == 0:
        return "cpu", None
    return (f"cuda:{local % cuda_count}" if local is not None else "cuda"), None


def shard_range(n_items: int, rank: int, world: int) -> range:
    """Contiguous shard of rank ``rank``: sizes differ by at most one (10 items, 4 ranks -> 3, 3, 2, 2)."""
    base, extra = divmod(n_items, world)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class GenerateConfig:
    """Flags shared by ``mpo generate correctness`` and ``mpo generate dropout-ntp`` (seed names and defaults)."""

    checkpoint: str = field_(default="", help="model folder or Hub id (offline: a local folder)")
    prompt_path: str = field_(default="", help="prompt JSONL")
    out_dir: str = field_(default="sampled_outputs", help="output root")
    backend: Literal["hf", "vllm"] = field_(default="hf", help="sampling backend")
    dtype: str = field_(default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    device: str = field_(default="auto", help="hf backend: auto (cuda if present), cpu, cuda, cuda:1, ...")
    tp: int = field_(default=1, ge=1, help="tensor parallel size (vllm)")
    batch_size: int = field_(default=1, ge=1, help="prompts per sampler call")
    num_workers: int = field_(default=8, ge=0, help="threads decoding the next batch's images")
    num_return_sequences: int = field_(default=32, ge=1, help="samples per prompt")
    top_k: int = field_(default=50, ge=0, help="0 keeps every token")
    top_p: float = field_(default=1.0, gt=0, le=1)
    temperature: float = field_(default=0.7, gt=0)
    max_new_tokens: int = field_(default=4096, ge=1)
    dynamic: bool = field_(default=False, help="tile images (InternVL): up to max_num tiles plus a thumbnail")
    max_num: int = field_(default=6, ge=1, help="tile cap per prompt (divided among its images)")
    sample_max_num: int | None = field_(default=None, ge=1, help="cap the prompts (strided subsample)")
    seed: int = field_(default=0, ge=0, help="run seed; each sample's seed derives from it")
    image_root: str | None = field_(default=None, help="where relative image paths start (default: prompt folder)")
    allow_outside_root: bool = field_(default=False, help="accept absolute image paths and paths outside the root")
    trust_remote_code: bool = field_(default=False, help="run code shipped with the checkpoint")
    system_prompt: str = field_(default="auto", help="auto (InternVL: its identity line), none, or the text")
    progress: bool = field_(default=True, help="show a progress bar")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.max_new_tokens)

    def settings(self) -> dict[str, Any]:
        """What a resumed output must share with the run that started it. ``prompt_path`` (resolved) is part of
        it: two prompt files with one basename map to the same output file, and must not fill it together."""
        ckpt = Path(self.checkpoint)
        return {"prompt_path": str(Path(self.prompt_path).resolve()),
                "checkpoint": str(ckpt.resolve()) if ckpt.exists() else self.checkpoint, "backend": self.backend,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "dynamic": self.dynamic,
                "max_num": self.max_num, "system_prompt": self.system_prompt}

    def sampler_factory(self, prompts: PromptFile) -> Callable[[], Sampler]:
        """Builds the sampler only when there is work, so a rerun that only merges loads no model."""
        max_images = max((len(item.images) for item in prompts.items), default=1)

        def build() -> Sampler:
            import torch

            # vLLM reads CUDA_VISIBLE_DEVICES when it starts CUDA, so no CUDA call may come before it.
            cuda_count = torch.cuda.device_count() if self.backend == "hf" and self.device == "auto" else 0
            device, visible = local_device(self.backend, self.device, self.tp, cuda_count)
            if visible is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
            dtype = self.dtype
            if dtype == "auto" and self.backend == "hf":
                dtype = "bfloat16" if device.startswith("cuda") else "float32"
            return build_sampler(self.backend, self.checkpoint, dtype=dtype, device=device, tp=self.tp,
                                 dynamic=self.dynamic, max_num=self.max_num, max_images_per_prompt=max_images,
                                 trust_remote_code=self.trust_remote_code, system_prompt=self.system_prompt)

        return build

    def check_paths(self) -> None:
        """Fail early, naming the flag, before any model is loaded."""
        if not self.checkpoint:
            raise ValueError("--checkpoint is required")
        if not self.prompt_path:
            raise ValueError("--prompt-path is required")
        if not Path(self.prompt_path).is_file():
            raise ValueError(f"--prompt-path {self.prompt_path}: no such file")
        if not self.system_prompt.strip():
            raise ValueError("--system-prompt is empty: give the text, 'none' (no system turn) or 'auto'")
        if not model_name(self.checkpoint):
            raise ValueError(f"--checkpoint {self.checkpoint}: the filesystem root has no name to name the output "
                             "folder after; move the model into a folder")

    def check_output(self, layout: OutputLayout) -> None:
        """Refuse (``OutputPathError``, one line) an output that would replace the prompt file, or that lies under
        a regular file (``--out-dir afile``), before anything is written or the model is loaded."""
        check_outputs(layout.files(), {Path(self.prompt_path): "--prompt-path"}, "--out-dir", self.out_dir)

    def check_backend(self) -> None:
        """Fail before anything is written when the sampler could never be built from these flags: the seed's
        README command (``--tp 8`` on the default ``hf`` backend) used to fail only after the output folder
        and its settings existed."""
        if self.backend == "hf" and self.tp != 1:
            raise ValueError(f"--tp {self.tp}: tensor parallelism needs --backend vllm (hf runs one model per "
                             "process; start one process per GPU instead)")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("--backend vllm needs vLLM, which is not installed: pip install 'mpo[vllm]'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")
        if not math.isfinite(self.temperature):
            raise ValueError(f"--temperature {self.temperature}: expected a finite number > 0")

    def check_checkpoint(self) -> None:
        """Fail early when ``--checkpoint`` is no model folder (nor a cached Hub model); raises ``ModelLoadError``.
        Cheap: reads ``config.json`` and loads no weights. The CLI calls it; ``run_*`` do not, so that a rerun
        that only merges works without the model."""
        from mpo.models import ModelLoadError, read_model_config

        try:
            read_model_config(self.checkpoint)
        except ModelLoadError as err:
            raise ModelLoadError(f"--checkpoint: {err}") from None



@dataclass
class GenerationJob:
    """One generator (correctness or DropoutNTP) applied to one prompt file; see ``run_job``.

    ``make_request(item, images, seeds)`` builds the sampler request of an item's missing samples;
    ``make_line(item, sample_idx, seed, sample)`` turns one sample into a part line (a record, or a
    ``{"_mpo": "dropped", ...}`` marker): the prompt row's fields, then ``generated_fields``.
    ``settings``: what must not change when an output is resumed.

    ``generated_fields`` are what the merge keeps of a stored record; every other field comes from the prompt
    row as it is *now*. The item id hashes only what the request is made of (the images, the question, the
    row's own ``system_prompt`` when it has one; ``chosen`` for DropoutNTP), so a corrected ``answer`` or
    ``meta`` keeps its samples and the merged output carries the correction, while an edited system prompt makes
    another item, sampled anew (``mpo.generate.items.item_id``).
    """

    name: str
    prompts: PromptFile
    n: int
    layout: OutputLayout
    params: SamplingParams
    seed: int
    settings: dict[str, Any]
    make_request: Callable[[PromptItem, list[Image.Image], tuple[int, ...]], SampleRequest]
    make_line: Callable[[PromptItem, int, int, Sample], dict[str, Any]]
    load_images: Callable[[PromptItem], list[Image.Image]]
    generated_fields: tuple[str, ...]


@dataclass
class RunResult:
    """What one process did. ``output`` is the merged file if this process wrote (or found) it complete."""

    rank: int
    world: int
    output: Path | None
    generated: int
    seconds: float
    summary: dict[str, Any] | None


def run_job(job: GenerationJob, make_sampler: Callable[[], Sampler], *, batch_size: int = 8,
            num_workers: int = 2, progress: bool = True, env: Mapping[str, str] | None = None) -> RunResult:
    """Generate this rank's missing samples, then merge if the whole output is complete (module docstring)."""
    start = time.perf_counter()
    rank, world = rank_and_world(env)
    check_settings(job.layout, job.settings, started=output_started(job.layout))
    if rank == 0 and job.prompts.rejected:  # reported at once; the merge rewrites it with decode failures added
        for err in job.prompts.rejected:
            log.warning("skipped prompt row %s", err)
        atomic_write_jsonl(job.layout.rejected_prompts, [e.to_dict() for e in job.prompts.rejected])
    own = job.layout.part(rank, world)
    state = scan_parts(job.layout, repair=own if own.exists() else None)
    mine = [job.prompts.items[i] for i in shard_range(len(job.prompts.items), rank, world)]
    todo = [(item, state.missing(item.item_id, job.n)) for item in mine if not _settled(job, state, item)]
    todo = _decode_again(job, state, todo, own)
    generated = 0
    if todo:
        sampler = make_sampler()
        record_settings(job.layout, job.settings)  # the model loaded: the samples that follow are these settings'
        bar = _progress(job.name, rank, world, len(mine), len(mine) - len(todo), progress)
        with PartWriter(own) as writer:
            batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
            for batch, loaded in _with_images(batches, job.load_images, num_workers):
                lines = _run_batch(job, sampler, batch, loaded, state)
                writer.append(lines)
                generated += sum(1 for line in lines if MARKER not in line)
                bar.update(len(batch))
        bar.close()
    state = scan_parts(job.layout)
    summary = None
    if all(_settled(job, state, item) for item in job.prompts.items):  # the rule that picked every rank's work
        summary = _merge(job, state)
    else:
        log.info("rank %d/%d done; the output is merged by the last rank to finish (or by a rerun)", rank, world)
    return RunResult(rank, world, job.layout.final if summary else None, generated,
                     time.perf_counter() - start, summary)


def _settled(job: GenerationJob, state: PartState, item: PromptItem) -> bool:
    """``PartState.settled``; the image files are looked at only for a row whose last attempt failed."""
    return state.settled(item.item_id, job.n, lambda: image_stamp(job.prompts, item))


def _decode_again(job: GenerationJob, state: PartState, todo: list[tuple[PromptItem, list[int]]],
                  own: Path) -> list[tuple[PromptItem, list[int]]]:
    """The rows of ``todo`` whose last attempt ended in an item error are tried again: their images are decoded
    here, before any model is built, so a row that is still broken gets its new marker (the report names the
    current reason) without a model load, and a rerun whose only work is such rows stays a merge."""
    retried = [(item, missing) for item, missing in todo if item.item_id in state.item_errors]
    still_broken: dict[str, dict[str, Any]] = {}
    for item, _ in retried:
        try:
            job.load_images(item)
        except RowError as err:
            still_broken[item.item_id] = _item_error(job, item, err, "decode", state)
    if retried:
        log.info("retrying %d row(s) whose last attempt failed; %d still cannot be read", len(retried),
                 len(still_broken))
    if still_broken:
        with PartWriter(own) as writer:
            writer.append(still_broken.values())
    return [(item, missing) for item, missing in todo if item.item_id not in still_broken]


def _run_batch(job: GenerationJob, sampler: Sampler, batch: list[tuple[PromptItem, list[int]]],
               loaded: list[list[Image.Image] | RowError], state: PartState) -> list[dict[str, Any]]:
    """Sample one batch; items are grouped by how many samples they miss (one sampler call per group)."""
    lines: list[dict[str, Any]] = []
    groups: dict[int, list[tuple[PromptItem, list[int], list[Image.Image]]]] = {}
    for (item, missing), images in zip(batch, loaded, strict=True):
        if isinstance(images, RowError):
            lines.append(_item_error(job, item, images, "decode", state))
            continue
        groups.setdefault(len(missing), []).append((item, missing, images))
    for k, group in groups.items():
        seeds = [[sample_seed(job.seed, item.item_id, i) for i in missing] for item, missing, _ in group]
        requests = [job.make_request(item, images, tuple(s))
                    for (item, _, images), s in zip(group, seeds, strict=True)]
        outputs = _sample_or_refuse(sampler, requests, k, job.params)
        for (item, missing, images), item_seeds, samples in zip(group, seeds, outputs, strict=True):
            if isinstance(samples, ValueError):  # this row alone cannot be sampled: reported like a bad image
                err = RowError(str(job.prompts.path), item.line, "image" if images else "question",
                               f"the model's processor refused it: {samples}")
                lines.append(_item_error(job, item, err, REFUSED, state))
                continue
            lines += [job.make_line(item, i, s, smp)
                      for i, s, smp in zip(missing, item_seeds, samples, strict=True)]
    return lines


def _item_error(job: GenerationJob, item: PromptItem, err: RowError, kind: str, state: PartState) -> dict[str, Any]:
    """The part-file line that settles a row which cannot be sampled (reported in the merge; a rerun tries it again,
    ``PartState.retries``)."""
    log.warning("skipped prompt row %s", err)
    return item_error_marker(item.item_id, err.to_dict(), kind, state.next_attempt(item.item_id),
                             image_stamp(job.prompts, item))


def _sample_or_refuse(sampler: Sampler, requests: list[SampleRequest], n: int,
                      params: SamplingParams) -> list[list[Sample] | ValueError]:
    """One sampler call for the group; if it refuses (``ValueError``: an image Qwen-VL's processor cannot size, an
    image for a text-only model), each request alone, so that only the rows refused are dropped. A sample depends
    on its prompt and seed only, so the others come out as they would have in the group."""
    try:
        return sampler.sample(requests, n, params)
    except ValueError as exc:
        if len(requests) == 1:
            return [exc]
    out: list[list[Sample] | ValueError] = []
    for request in requests:
        try:
            out.append(sampler.sample([request], n, params)[0])
        except ValueError as exc:
            out.append(exc)
    return out


def _with_images(batches: Sequence[list[tuple[PromptItem, list[int]]]], load: Callable[[PromptItem], Any],
                 workers: int) -> Iterator[tuple[list[tuple[PromptItem, list[int]]], list[Any]]]:
    """Yield each batch with its decoded images (or the ``RowError``); decoding of the next batch overlaps
    generation of the current one when ``workers > 0``."""

    def safe(item: PromptItem) -> Any:
        try:
            return load(item)
        except RowError as err:
            return err

    if workers <= 0:
        for batch in batches:
            yield batch, [safe(item) for item, _ in batch]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, [pool.submit(safe, item) for item, _ in batch]))
            if len(pending) > 1:
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]


def _progress(name: str, rank: int, world: int, total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="item", desc=f"{name} rank {rank}/{world}",
                disable=not enabled, dynamic_ncols=True)


def _merge(job: GenerationJob, state: PartState) -> dict[str, Any]:
    """Write the merged output (prompt-file order, then sample index), the rejected prompts and the summary.
    Each record is the item's current prompt row plus the stored sample's ``job.generated_fields``."""
    handles = [open(p, "rb") for p in state.files]
    finish: Counter[str] = Counter()
    wanted = {item.item_id for item in job.prompts.items}

    def records() -> Iterator[dict[str, Any]]:
        for item in job.prompts.items:
            if state.error(item.item_id, job.n) is not None:  # samples missing and its last attempt failed: none
                continue
            for idx in range(job.n):
                where = state.samples.get((item.item_id, idx))
                if where is None:
                    continue
                fh = handles[where[0]]
                fh.seek(where[1])
                stored = json.loads(fh.readline())
                finish[str(stored.get("finish_reason"))] += 1
                yield {**item.row, **{k: stored[k] for k in job.generated_fields if k in stored}}

    try:
        written = atomic_write_jsonl(job.layout.final, records())
    finally:
        for fh in handles:
            fh.close()
    errors = [e for item in job.prompts.items if (e := state.error(item.item_id, job.n)) is not None]
    atomic_write_jsonl(job.layout.rejected_prompts, [e.to_dict() for e in job.prompts.rejected] + errors)
    dropped = Counter(r for (i, _), r in state.dropped.items() if i in wanted)
    summary = {
        "generator": job.name, "prompt_file": str(job.prompts.path), "output": str(job.layout.final),
        "items": len(job.prompts.items) - len(errors), "samples_per_item": job.n, "samples": written,
        "rejected_prompts": len(job.prompts.rejected) + len(errors), "dropped": dict(sorted(dropped.items())),
        "finish_reason": dict(sorted(finish.items())), "torn_lines_ignored": state.torn,
        "duplicates_ignored": state.duplicates,
        "stale_samples": sum(1 for i, _ in state.samples if i not in wanted),
    }
    atomic_write_json(job.layout.summary, summary)
    log.info("merged %d samples of %d items into %s", written, summary["items"], job.layout.final)
    return summary
