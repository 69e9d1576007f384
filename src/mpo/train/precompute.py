"""``mpo precompute-ref CONFIG``: the reference model's log-probs of every training pair, once, resumable.

Each process (``torchrun``/``accelerate launch`` ranks, or one) takes every ``world``-th unique pair, scores it
with the frozen reference (no grad, eval mode, the shared pair layout), and appends the results to its own part
file after every batch. Restarting skips every pair already in any part file, so a kill costs at most one batch;
rank 0 merges the parts into ``logps.npz`` and writes ``fingerprint.json`` when every pair is done.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mpo.data.encode import PairEncoder
from mpo.data.meta import read_meta
from mpo.data.mixture import PreferenceMixture
from mpo.data.rejects import RejectedRowLog
from mpo.fsio import atomic_write_json
from mpo.models import load_model, load_processor
from mpo.train.config import RunConfig
from mpo.train.data import Collator, EncodedPairs, prefetch
from mpo.train.forward import PairScorer
from mpo.train.recipe import make_accelerator
from mpo.train.refcache import PartWriter, RefCacheError, _diff, fingerprint, merge_parts, read_parts

__all__ = ["run_precompute", "cache_dir_of"]

log = logging.getLogger("mpo.refcache")


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.ref_cache) if cfg.train.ref_cache else Path(cfg.train.output_dir) / "ref_cache"


def run_precompute(cfg: RunConfig, *, batch_size: int = 8, progress: bool = True) -> Path:
    """Fill the reference cache for ``cfg``'s data; returns the cache folder."""
    cfg.require_paths()
    acc = make_accelerator()
    out = cache_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    processor = load_processor(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    specs = read_meta(cfg.data.meta_path)
    fp = fingerprint(cfg, specs, processor)
    partial = out / "fingerprint.partial.json"
    if partial.is_file():
        diff = _diff(fp, json.loads(partial.read_text(encoding="utf-8")))
        if diff:
            raise RefCacheError(f"{out} holds a partial cache for another setting ({'; '.join(diff[:3])}); "
                                "remove the folder or set train.ref_cache to a new one")
    elif acc.is_main_process:
        atomic_write_json(partial, fp)
    acc.wait_for_everyone()

    mixture = PreferenceMixture(specs, seed=cfg.data.seed, max_dynamic_patch=cfg.data.max_dynamic_patch)
    dataset = EncodedPairs(mixture, PairEncoder(processor, max_length=cfg.data.max_length))
    done = {(d, line) for d, line, _, _ in read_parts(out)} if (out / "parts").is_dir() else set()
    seen, todo = set(done), []
    for i in range(len(mixture)):
        key = mixture.source(i)
        if key not in seen:
            seen.add(key)
            todo.append(i)
    mine = todo[acc.process_index::acc.num_processes]
    # Every rank must split the same ``todo``: a rank still reading the parts while another already appends its
    # first results would count those as done, get a shorter list, and stride past pairs that nobody computes (its
    # read_parts could also cut another rank's half-written line as "torn"). Nobody writes before all have read.
    acc.wait_for_everyone()
    model = load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype,
                       attn_implementation=cfg.model.attn_implementation).to(acc.device)
    model.eval().requires_grad_(False)
    scorer = PairScorer(model)
    tok = getattr(processor, "tokenizer", processor)
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0, "shared",
                       attn_implementation=cfg.model.attn_implementation, dtype=next(model.parameters()).dtype)
    writer, rejects = PartWriter(out, acc.process_index), RejectedRowLog(out / "rejected_rows.jsonl")
    t0, n = time.perf_counter(), 0
    bar = tqdm(total=len(mine), desc=f"reference log-probs (rank {acc.process_index})", disable=not progress,
               unit="pair")

    def batches():
        for start in range(0, len(mine), batch_size):
            items = [dataset[i] for i in mine[start:start + batch_size]]
            yield len(items), collate(items)

    # decoding and tiling the next batch in a (nice 19) thread while the model runs, whatever data.prefetch_batches
    # says: on the internvl448 benchmark decoding was a quarter of the precompute (11.2 -> 9.6 s with the thread)
    ready = prefetch(batches(), 1)
    try:
        with torch.inference_mode():
            for n_items, (batch, errors) in ready:
                for err in errors:
                    rejects.write(err)
                if batch is not None:
                    scores = scorer(batch.to(acc.device))
                    writer.write(batch.sources, scores.chosen_logps, scores.rejected_logps)
                    n += batch.num_pairs
                bar.update(n_items)
    finally:
        getattr(ready, "close", lambda: None)()
        bar.close()
        writer.close()
        rejects.close()
    log.info("rank %d: %d pairs in %.1f s", acc.process_index, n, time.perf_counter() - t0)
    acc.wait_for_everyone()
    if acc.is_main_process:
        total = merge_parts(out, fp)
        log.info("reference cache %s: %d pairs", out, total)
    acc.wait_for_everyone()
    return out

