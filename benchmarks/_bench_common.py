"""Shared pieces of the training benchmark: lock-step control of worker processes, memory probes, synthetic data.

Lock-step. Every framework runs in its own process (fresh RSS), but they take turns: the parent lets one worker
run one optimizer step, then the next worker, and so on. A worker waits at a gate between steps, so the frameworks
never compete for the two cores, and whatever else runs on the machine slows all of them alike, step by step. The
time of a step is measured from the moment its worker leaves the gate to the moment it is back at the gate (wall
time between consecutive optimizer steps, data loading included: no worker prefetches, ``num_workers=0``).

Memory. On CPU the fixed runtime (Python, torch, the weights, the reference copy) is hundreds of MB and a tiny
model's activations are tens, so a plain peak RSS hides the difference that matters. The working set of the
training steps is measured instead: the kernel's peak-RSS counter (``VmHWM``) is reset just before the first step
(``/proc/self/clear_refs`` ← ``5``) and ``VmHWM`` after the last step minus ``VmRSS`` at the reset is reported.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["Gate", "OtherLoad", "Stats", "rss_mb", "peak_rss_mb", "reset_peak_rss", "stats", "word_pool", "text_of_tokens",
           "write_preference_data", "TILE_SHAPES"]


# ----------------------------------------------------------------------------------------------------------------
# memory


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        match = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} (not Linux?)")
    return int(match.group(1))


def rss_mb() -> float:
    """Resident set size now, MB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start), MB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0), so the peak covers only what follows."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


class OtherLoad:
    """CPU time used by processes other than this one and its children, between ``__init__`` and ``cores()``.

    Load average cannot tell our own workers from other people's jobs; this can: machine busy time (``/proc/stat``)
    minus our CPU time (``getrusage`` of this process and its waited-for children). ``cores()`` is the average
    number of cores others kept busy: ~0 means the numbers are clean; 0.5 or more on 2 cores means they are not.
    """

    def __init__(self) -> None:
        self._t, self._busy, self._ours = time.perf_counter(), self._machine_busy_s(), self._our_cpu_s()

    @staticmethod
    def _machine_busy_s() -> float:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _our_cpu_s() -> float:
        import resource

        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def cores(self) -> float:
        wall = time.perf_counter() - self._t
        others = (self._machine_busy_s() - self._busy) - (self._our_cpu_s() - self._ours)
        return max(others, 0.0) / wall if wall > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# lock-step control (worker side)


class Gate:
    """The worker's end of the lock-step protocol: one JSON event per line out, one command per line in.

    Events: ``ready`` (before the first step; carries ``rss_before_mb``), ``step`` (after each optimizer step;
    carries ``dt`` seconds and ``peak_mb``), ``result`` (anything else). Commands: ``go`` (run one more step) and
    ``exit`` (leave now: nothing after the last measured step, e.g. a final checkpoint, is worth waiting for).
    """

    def __init__(self, spec: str):
        read_fd, write_fd = (int(x) for x in spec.split(","))
        self._in: TextIO = os.fdopen(read_fd, "r", encoding="utf-8")
        self._out: TextIO = os.fdopen(write_fd, "w", encoding="utf-8")
        self._t = 0.0
        self.rss_before_mb = 0.0
        self.steps_started = 0
        # Hooks (profiling): before_step(k) runs as step k (0-based) starts, on_exit() before the worker leaves.
        self.before_step: list[Callable[[int], None]] = []
        self.on_exit: list[Callable[[], None]] = []

    def send(self, event: str, **payload: Any) -> None:
        self._out.write(json.dumps({"event": event, **payload}) + "\n")
        self._out.flush()

    def _wait(self) -> None:
        command = self._in.readline().strip()
        if command != "go":  # "exit", or the parent is gone
            for hook in self.on_exit:
                hook()
            self._out.flush()
            os._exit(0)
        for hook in self.before_step:
            hook(self.steps_started)
        self.steps_started += 1
        self._t = time.perf_counter()

    def ready(self, **info: Any) -> None:
        """Call right before the first step: resets the peak-RSS counter, reports, waits for ``go``."""
        import torch

        reset_peak_rss()
        self.rss_before_mb = rss_mb()
        self.send("ready", rss_before_mb=self.rss_before_mb, threads=torch.get_num_threads(), **info)
        self._wait()

    def step(self, **extra: Any) -> None:
        """Call right after each optimizer step: reports its wall time since the gate opened, waits for ``go``."""
        dt = time.perf_counter() - self._t
        self.send("step", dt=dt, peak_mb=peak_rss_mb(), rss_mb=rss_mb(), **extra)
        self._wait()


# ----------------------------------------------------------------------------------------------------------------
# statistics


@dataclass
class Stats:
    """Median and quartiles of per-step seconds (after warm-up)."""

    median: float
    q1: float
    q3: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "n": self.n}


def stats(values: list[float]) -> Stats:
    if not values:
        raise ValueError("no measured steps")
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return Stats(statistics.median(values), q[0], q[2], len(values))


# ----------------------------------------------------------------------------------------------------------------
# synthetic data

# (width, height) of a random image and the InternVL tiles it gives with max_dynamic_patch 4 at 448 px
# (checked against the stock GotOcr2 processor): 1 tile; 2 tiles + thumbnail; 3 + thumbnail; 2x2 + thumbnail.
TILE_SHAPES: dict[int, tuple[int, int]] = {1: (448, 448), 2: (896, 448), 3: (1344, 448), 4: (896, 896)}


def word_pool(tokenizer: Any) -> list[str]:
    """Lower-case words that the tokenizer encodes as exactly one token after a space (``" red"`` → ``Ġred``).

    A text of k such words, each after a space, is then k tokens, so lengths can be set in tokens without a
    tokenize-and-trim loop per row.
    """
    words = set()
    for token in tokenizer.get_vocab():
        if token.startswith("Ġ") and token[1:].isalpha() and token[1:].islower() and len(token) > 2:
            words.add(token[1:])
    pool = sorted(w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    if len(pool) < 20:
        raise RuntimeError(f"the tokenizer has only {len(pool)} single-token words; cannot size texts in tokens")
    return pool


def text_of_tokens(rng: np.random.Generator, pool: list[str], n_tokens: int, tokenizer: Any) -> str:
    """A text of exactly ``n_tokens`` tokens: one-token words, starting with a word that also is one token
    without the leading space (checked), so the count does not depend on where the text is placed."""
    starts = [w for w in pool[:200] if len(tokenizer(w.capitalize(), add_special_tokens=False)["input_ids"]) == 1]
    first = starts[rng.integers(len(starts))].capitalize() if starts else pool[0]
    words = [first] + [pool[i] for i in rng.integers(len(pool), size=n_tokens - 1)]
    text = " ".join(words)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n != n_tokens:
        raise RuntimeError(f"text sized for {n_tokens} tokens has {n}")
    return text


def _random_image(rng: np.random.Generator, size: tuple[int, int]):
    """Random RGB at 1/16 resolution, upsampled: real-photo-like smoothness, so PNG decoding costs what a photo
    costs, not what white noise (incompressible, ~4x slower to decode) would."""
    from PIL import Image

    w, h = size
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def write_preference_data(out: Path, *, n_pairs: int, question_tokens: int, answer_tokens: tuple[int, int],
                          tiles: tuple[int, ...], tokenizer: Any, seed: int = 0,
                          pairs_per_question: int = 1) -> dict[str, Any]:
    """Write an MMPR-style ``meta.json`` + ``annotations/bench.jsonl`` (+ ``images/*.png``) under ``out``.

    Each row: a question of ``question_tokens`` tokens (``<image>\\n`` first when ``tiles``), chosen and rejected
    answers of independently drawn lengths in ``answer_tokens`` (inclusive), and, for VLM cases, one random RGB
    image whose shape gives a tile count drawn uniformly from ``tiles``. ``pairs_per_question`` consecutive rows
    share question and image (as the correctness pipeline's pairs of one question do), their answers drawn anew.
    Returns a summary (counts, mean lengths).
    """
    rng = np.random.default_rng(seed)
    pool = word_pool(tokenizer)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    if tiles:
        (out / "images").mkdir(exist_ok=True)
    rows, tile_counts, answer_lengths = [], [], []
    for k in range(n_pairs):
        row: dict[str, Any] = {}
        if k % pairs_per_question == 0:
            question = text_of_tokens(rng, pool, question_tokens, tokenizer) + "?"
            if tiles:
                n_tiles = int(tiles[rng.integers(len(tiles))])
                name = f"img_{k:05d}.png"
                _random_image(rng, TILE_SHAPES[n_tiles]).save(out / "images" / name, compress_level=1)
                question = "<image>\n" + question
        if tiles:
            row["image"] = name
            tile_counts.append(n_tiles)
        lo, hi = answer_tokens
        n_c, n_r = (int(x) for x in rng.integers(lo, hi + 1, size=2))
        row.update(question=question, chosen=text_of_tokens(rng, pool, n_c, tokenizer),
                   rejected=text_of_tokens(rng, pool, n_r, tokenizer))
        answer_lengths += [n_c, n_r]
        rows.append(row)
    with open(out / "annotations" / "bench.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    meta = {"bench": {"root": "images", "annotation": "annotations/bench.jsonl", "repeat_time": 1,
                      "length": n_pairs, "data_augment": False}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {"pairs": n_pairs, "mean_answer_tokens": float(np.mean(answer_lengths)),
            "mean_tiles": float(np.mean(tile_counts)) if tile_counts else 0.0}
