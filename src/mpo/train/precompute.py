"""``mpo precompute-ref CONFIG``: the reference model's log-probs of every training pair, once, resumable.

Each process (``torchrun``/``accelerate launch`` ranks, or one) takes every ``world``-th question of the unique
pairs, scores its pairs with the frozen reference (no grad, eval mode, the shared pair layout with all pairs of a
question in one span: images decoded and encoded once, the prompt run once for all distinct answers), and appends
the results to its own part file after every batch. With ``data.num_workers`` > 0 DataLoader worker processes decode,
tile and collate the batches (as for training); otherwise one thread at the lowest OS priority prepares the next
batch while the model runs. Restarting skips every pair already in any part file, so a kill costs at most one batch;
rank 0 merges the parts into ``logps.npz`` and writes ``fingerprint.json`` when every pair is done.

With ``train.deepspeed`` naming a ZeRO-3 config (the 38B and 241B presets) the reference is loaded partitioned and
runs as a ZeRO-3 engine, as the in-loop reference of such a run does: no rank holds the whole model. Its forward
gathers each layer's weights from all ranks, so the ranks run in lock-step: every rank runs as many forwards as the
rank with the most batches (the others repeat a batch and write nothing), and a batch without images carries the
vision filler (:func:`mpo.train.data.vision_filler`) so that every forward runs the same modules.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mpo.data.encode import PairEncoder
from mpo.data.errors import RowError
from mpo.data.meta import read_meta
from mpo.data.mixture import PreferenceMixture
from mpo.data.rejects import RejectedRowLog
from mpo.data.system import resolve_system_prompt
from mpo.fsio import atomic_write_json
from mpo.models import load_model, load_processor
from mpo.train.accelerator import accelerator_for, make_accelerator, zero_stage_of
from mpo.train.attention import refuse_sliding_window
from mpo.train.config import RunConfig
from mpo.train.data import Collator, EncodedPairs, first_usable, prefetch, question_key, vision_filler
from mpo.train.forward import PairScorer, backbone_of
from mpo.train.refcache import PartWriter, RefCacheError, _diff, fingerprint, merge_parts, read_parts
from mpo.train.setup import (
    LOCK_FILE,
    Zero3PairScorer,
    claim_folder,
    deepspeed_reference,
    disable_dropout,
    release_folder,
)

__all__ = ["run_precompute", "cache_dir_of"]

log = logging.getLogger("mpo.refcache")


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.ref_cache) if cfg.train.ref_cache else Path(cfg.train.output_dir) / "ref_cache"


_CACHE_FILES = ("fingerprint.partial.json", "fingerprint.json", "parts", "logps.npz")


def _require_cache_folder(out: Path) -> None:
    """The cache goes into a new or empty folder, or one that holds a cache: never into a run folder or anything
    else (its rejected_rows.jsonl would be emptied, cache files mixed in)."""
    if not out.is_dir():
        return
    if any(p.name != LOCK_FILE for p in out.iterdir()) and not any((out / n).exists() for n in _CACHE_FILES):
        raise RefCacheError(f"train.ref_cache {out}: exists and holds no reference cache; refusing to write into it: "
                            "choose a new folder")


def run_precompute(cfg: RunConfig, *, batch_size: int = 8, progress: bool = True) -> Path:
    """Fill the reference cache for ``cfg``'s data; returns the cache folder."""
    try:
        return _fill_cache(cfg, batch_size, progress)
    finally:
        release_folder(cache_dir_of(cfg))


def _fill_cache(cfg: RunConfig, batch_size: int, progress: bool) -> Path:
    cfg.require_paths()
    # DeepSpeed only under a launcher: `mpo precompute-ref PRESET` in one plain process loads the reference whole,
    # as before (a preset names zero3.json for its training run)
    acc = accelerator_for(cfg) if cfg.train.deepspeed and "LOCAL_RANK" in os.environ else make_accelerator()
    zero3 = zero_stage_of(acc) == 3
    out = cache_dir_of(cfg)
    _require_cache_folder(out)
    if acc.is_main_process:
        claim_folder(out, "train.ref_cache")
    acc.wait_for_everyone()
    processor = load_processor(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    specs = read_meta(cfg.data.meta_path)
    system = resolve_system_prompt(processor, cfg.data.system_prompt)
    fp = fingerprint(cfg, specs, processor, system)
    partial = out / "fingerprint.partial.json"
    if partial.is_file():
        diff = _diff(fp, json.loads(partial.read_text(encoding="utf-8")))
        if diff:
            raise RefCacheError(f"{out} holds a partial cache for another setting ({'; '.join(diff[:3])}); "
                                "remove the folder or set train.ref_cache to a new one")
    elif acc.is_main_process:
        atomic_write_json(partial, fp)
    acc.wait_for_everyone()

    mixture = PreferenceMixture(specs, seed=cfg.data.seed, max_dynamic_patch=cfg.data.max_dynamic_patch,
                                max_image_pixels=cfg.data.max_image_pixels)
    encoder = PairEncoder(processor, max_length=cfg.data.max_length, system_prompt=system)
    dataset = EncodedPairs(mixture, encoder, augment_seed=cfg.data.seed)
    done = {(d, line) for d, line, _, _ in read_parts(out)} if (out / "parts").is_dir() else set()
    seen, todo = set(done), []
    for i in range(len(mixture)):
        key = mixture.source(i)
        if key not in seen:
            seen.add(key)
            todo.append(i)
    # a question's pairs (same prompt and images) go to one rank and one batch: their images are decoded once and
    # their prompt runs once for all their answers (the correctness pipeline writes up to 15 pairs per question)
    questions = _questions(mixture, todo)
    if acc.is_main_process:
        log.info("reference cache %s: %d pairs to score in %d questions (%d pairs already there)", out, len(todo),
                 len(questions), len(done))
    mine = questions[acc.process_index::acc.num_processes]
    rejects_path = out / "rejected_rows.jsonl"
    if acc.is_main_process and rejects_path.is_file():  # its rows were not cached, so they are tried (and logged) again
        rejects_path.write_bytes(b"")
    # Every rank must split the same ``todo``: a rank still reading the parts while another already appends its
    # first results would count those as done, get a shorter list, and stride past pairs that nobody computes (its
    # read_parts could also cut another rank's half-written line as "torn"). Nobody writes before all have read.
    acc.wait_for_everyone()
    model = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype,
                       attn_implementation=cfg.model.attn_implementation)  # partitioned under ZeRO-3
    if not zero3:
        model = model.to(acc.device)
    disable_dropout(model)
    model.eval().requires_grad_(False)
    lockstep = zero3 and acc.num_processes > 1
    filler = None
    if lockstep and hasattr(backbone_of(model), "get_image_features"):
        filler = vision_filler(dataset.encoder)
    scorer = Zero3PairScorer(model, vision_first=filler is not None) if zero3 else PairScorer(model)
    if zero3:  # the engine computes in the weights' own dtype ("auto" precision is otherwise filled by prepare)
        ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
        dtype = next(model.parameters()).dtype
        for key, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if key in ds:
                ds[key]["enabled"] = dtype == half
        scorer = deepspeed_reference(scorer, ds, 3)
    tok = getattr(processor, "tokenizer", processor)
    layout = cfg.train.pair_layout  # naive: models the shared layout cannot run (sliding-window attention)
    if layout == "shared":
        refuse_sliding_window(backbone_of(model))
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0, layout,
                       attn_implementation=cfg.model.attn_implementation, dtype=next(model.parameters()).dtype,
                       vision_filler=filler, group_prompts=layout == "shared")
    plan = _batches(mine, batch_size)
    n_batches = len(plan)
    if lockstep:  # every rank runs as many forwards as the busiest one
        n_batches = int(acc.gather(torch.tensor([n_batches], device=acc.device)).max())
    writer, rejects = PartWriter(out, acc.process_index), RejectedRowLog(rejects_path)
    t0, n = time.perf_counter(), 0
    bar = tqdm(total=sum(map(len, mine)), desc=f"reference log-probs (rank {acc.process_index})", disable=not progress,
               unit="pair")

    planned = _PlannedBatches(dataset, plan, collate)
    if cfg.data.num_workers > 0:  # worker processes decode and tile, as the training loader's do (presets: 8)
        ready = DataLoader(planned, batch_size=None, num_workers=cfg.data.num_workers)
    else:  # the next batch decodes in a (nice 19) thread while the model runs: on the internvl448 benchmark
        # decoding was a quarter of the precompute (11.2 -> 9.6 s with the thread)
        ready = prefetch((planned[b] for b in range(len(planned))), 1)
    source = iter(ready)

    timing = PrecomputeTiming()

    def batches():
        """(pairs of this rank in the step, their row errors, the batch to score or None, whether to write it)."""
        spare = None  # lock-step: a usable batch to score when this rank has none of its own in a step
        for b in range(n_batches):
            with timing.adding_to("waiting_s"):
                n_items, errors, batch = next(source) if b < len(plan) else (0, [], None)
            if batch is not None:
                spare = batch
                yield n_items, errors, batch, True
            elif lockstep:  # no pair, or only bad rows: the other ranks still gather weights for this forward
                spare = spare or collate([first_usable(dataset)])[0]
                yield n_items, errors, spare, False
            else:
                yield n_items, errors, None, False

    try:
        # no_grad under ZeRO-3: its hooks gather weights into the parameters, which inference mode forbids
        with torch.no_grad() if zero3 else torch.inference_mode():
            for n_items, errors, batch, write in batches():
                for err in errors:
                    rejects.write(err)
                if batch is not None:
                    with timing.adding_to("scoring_s"):
                        scores = scorer(batch.to(acc.device))
                        if acc.device.type == "cuda":  # the kernels end here, not in the next batch's wait
                            torch.cuda.synchronize(acc.device)
                    if write:
                        writer.write(batch.sources, scores.chosen_logps, scores.rejected_logps)
                        n += batch.num_pairs
                bar.update(n_items)
    finally:
        getattr(source, "close", lambda: None)()
        bar.close()
        writer.close()
        rejects.close()
    timing.total_s = time.perf_counter() - t0
    log.info("rank %d: %d pairs in %s", acc.process_index, n, timing, extra={"timing": timing})
    acc.wait_for_everyone()
    if acc.is_main_process:
        total = merge_parts(out, fp)
        log.info("reference cache %s: %d pairs", out, total)
    acc.wait_for_everyone()
    return out


@dataclass
class PrecomputeTiming:
    """Where one rank's precompute time went: ``scoring_s`` in the reference forward, ``waiting_s`` blocked on the
    next batch (decoding, tiling and collating that did not hide behind the forward), the rest writing and
    bookkeeping. A large ``waiting_s`` says the data side sets the pace: raise ``data.num_workers``."""

    total_s: float = 0.0
    scoring_s: float = 0.0
    waiting_s: float = 0.0

    @contextmanager
    def adding_to(self, field: str):
        """Add the wall time of the ``with`` block to ``field`` (``"scoring_s"`` or ``"waiting_s"``)."""
        t = time.perf_counter()
        yield
        setattr(self, field, getattr(self, field) + time.perf_counter() - t)

    def __str__(self) -> str:
        text = f"{self.total_s:.1f} s: reference forward {self.scoring_s:.1f} s, waiting for batches {self.waiting_s:.1f} s"
        if self.waiting_s > 0.25 * self.total_s:
            text += " (the data side sets the pace: raise data.num_workers if there are spare cores)"
        return text


class _PlannedBatches(Dataset):
    """Batch ``b`` of the plan (whole questions), encoded and collated: (its pairs, their row errors, the
    :class:`~mpo.train.batch.PairBatch` or None when every pair was bad). A map-style dataset, so that DataLoader
    workers can build batches in parallel."""

    def __init__(self, dataset: EncodedPairs, plan: list[list[list[int]]], collate: Collator):
        self.dataset, self.plan, self.collate = dataset, plan, collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int):
        questions = self.plan[b]
        batch, errors = self.collate([x for q in questions for x in self.dataset.question(q)])
        return sum(map(len, questions)), errors, batch


def _questions(mixture: PreferenceMixture, indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by question (:func:`~mpo.train.data.question_key`), in order of first appearance; a row
    that does not parse is a question of its own (its error is reported when it is encoded)."""
    groups: dict[object, list[int]] = {}
    for i in indices:
        try:
            key = question_key(mixture.record(i))
        except RowError:
            key = ("unreadable", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _batches(questions: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Whole questions per batch, about ``batch_size`` pairs each (a question larger than that is one batch)."""
    out: list[list[list[int]]] = []
    n = 0
    for q in questions:
        if not out or n + len(q) > batch_size:
            out.append([])
            n = 0
        out[-1].append(q)
        n += len(q)
    return out
