"""Pair selection of ``mpo postprocess correctness``: from the judged entries of each key, pick the pairs.

What lives here, and why it is its own module: the rules that decide *which* chosen/rejected pairs a key
yields, kept apart from judging (``mpo.generate.scan``) and from reading and writing files
(``mpo.generate.postprocess``), so that they can be read and tested on ``Entry`` lists alone.

* ``select_pairs`` draws up to ``cap`` distinct (chosen, rejected) combinations. Identical responses
  are merged first and candidates are ordered by response digest, so the result ignores file order; the
  RNG is seeded from a stable hash of the key and the rule (``_key_seed``), so a rerun picks the same pairs.
  Small keys list every candidate and sample from the list; a huge key samples index pairs instead.
* ``_plan`` walks the keys of one dataset in sorted order and returns a ``_KeyPlan`` per key that writes
  anything: its positives, its correctness pairs (correct vs wrong answer, equal normalised answers
  skipped), its format pairs (correct vs format failure), and its negative item (a question the model
  always got wrong). ``--gt-responses`` positives join a key that has none (or every key, with ``--force``).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import TYPE_CHECKING, NamedTuple

from mpo.generate.scan import FMT, NEG, POS, Entry, Key, _Scan, question_of

if TYPE_CHECKING:  # only for annotations: postprocess imports this module
    from mpo.generate.postprocess import DatasetStats, PostprocessConfig

__all__ = ["select_pairs"]

_ENUMERATE_LIMIT = 1 << 16  # candidate pairs materialised per key; above this, sample index pairs


def _unique(entries: list[Entry]) -> list[Entry]:
    """One entry per distinct response text, ordered by digest (so the order ignores file order)."""
    seen: dict[int, Entry] = {}
    for e in sorted(entries, key=lambda e: (e.digest, e.src, e.offset)):
        seen.setdefault(e.digest, e)
    return list(seen.values())


def select_pairs(chosen: list[Entry], rejected: list[Entry], cap: int, seed: int,
                 skip_equal_answers: bool) -> list[tuple[Entry, Entry]]:
    """Up to ``cap`` distinct (chosen, rejected) combinations, drawn without replacement by
    ``random.Random(seed)``. With ``skip_equal_answers``, a combination whose normalised answers are
    equal is dropped (replaces the seed's substring test, which dropped ``3`` vs ``13``)."""
    chosen, rejected, rng = _unique(chosen), _unique(rejected), random.Random(seed)
    if len(chosen) * len(rejected) <= _ENUMERATE_LIMIT:
        cands = [(c, r) for c in chosen for r in rejected if not (skip_equal_answers and c.pred == r.pred)]
        return rng.sample(cands, min(cap, len(cands)))
    picked: list[tuple[Entry, Entry]] = []
    tried: set[tuple[int, int]] = set()
    for _ in range(cap * 64):  # a huge key: rejection-sample index pairs instead of listing them all
        if len(picked) == cap:
            break
        i, j = rng.randrange(len(chosen)), rng.randrange(len(rejected))
        if (i, j) in tried:
            continue
        tried.add((i, j))
        if not (skip_equal_answers and chosen[i].pred == rejected[j].pred):
            picked.append((chosen[i], rejected[j]))
    return picked


def _key_seed(key: Key, rule: str) -> int:
    # The question and the row's system prompt (when it has one), not the prompt text: a key of a row without
    # a system prompt draws the same pairs as before the key held the last two.
    text = json.dumps([rule, *question_of(key), *([key[3]] if key[3] else [])], ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class _KeyPlan(NamedTuple):
    key: Key
    positives: list[Entry]
    correctness: list[tuple[Entry, Entry]]
    format: list[tuple[Entry, Entry]]
    neg_item: Entry | None


def _plan(scan: _Scan, gt_pos: dict[tuple[str, str, str], list[Entry]], cfg: PostprocessConfig,
          stats: DatasetStats) -> list[_KeyPlan]:
    """One plan per key that writes anything. ``gt_pos``: ``--gt-responses`` positives by question
    (``question_of``): a reference answer is not sampled under a prompt, so it joins every key of its question."""
    plans = []
    for key in sorted(scan.groups):
        entries = scan.groups[key]
        pos = [e for e in entries if e.label == POS]
        neg = [e for e in entries if e.label == NEG]
        fmt = [e for e in entries if e.label == FMT]
        stats.all_correct_keys += bool(pos and not neg and not fmt)
        stats.all_wrong_keys += bool(not pos and (neg or fmt))
        neg_item = min(neg, key=lambda e: (e.digest, e.offset)) if neg and not pos else None
        if question_of(key) in gt_pos and (cfg.force or not pos):
            pos = pos + gt_pos[question_of(key)]
        cap = cfg.num_pairs_per_key
        corr = select_pairs(pos, neg, cap, _key_seed(key, "correctness"), True) if pos and neg else []
        form = select_pairs(pos, fmt, cap, _key_seed(key, "format"), False) if pos and fmt else []
        if pos or neg_item:
            plans.append(_KeyPlan(key, sorted(pos, key=lambda e: (e.digest, e.src, e.offset)), corr, form,
                                  neg_item))
        stats.correctness_pairs += len(corr)
        stats.format_pairs += len(form)
        stats.neg_items += neg_item is not None
    return plans
