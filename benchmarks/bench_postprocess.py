"""Benchmark of ``mpo postprocess correctness``: judging speed and peak memory on synthetic Stage-1 data.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_postprocess.py                 # 200k lines
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_postprocess.py --lines 1200000  # the memory target

Targets (generation issue, item 7): judging >= 20,000 responses/s on 2 cores for boxed numeric and option
answers; a 1.2-million-line input in < 2 GB peak RSS. The synthetic file mimics ``en_v2`` sampling: 32
responses per question of ~700 characters, half of them right; numeric (int/decimal) and option-letter
answers; some unboxed, truncated or ``**B**``-wrapped answers. Three numbers are printed:

* ``judge_1proc``: ``judge_record`` over records already in memory, one process (pure judging cost);
* ``pass1_2proc``: the real pass 1 (read, parse JSON, judge, group) with a pool of 2;
* ``end_to_end``: the whole command in a child process (both passes, four output files, fsync): wall
  time, peak RSS of the main process and of the largest pool worker, and the peak PSS of the whole
  process tree (sampled every 0.1 s from /proc).

``*_cpu`` numbers divide by CPU seconds instead of wall seconds: on a shared machine they say what the
code costs, the wall numbers what this run got.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("the triangle area angle side length ratio chart bar value shows we compute first then so "
         "therefore total sum difference each step equals because given figure label axis").split()


def _response(rng: random.Random, answer: str) -> tuple[str, str]:
    """One synthetic response with ``answer`` in the requested format (or broken), and its finish reason."""
    body = "\n".join(" ".join(rng.choices(WORDS, k=24)) + "." for _ in range(5))
    roll = rng.random()
    if roll < 0.03:
        return body[: rng.randrange(100, 600)], "length"
    if roll < 0.06:
        return body + f"\nSo the answer is {answer}.", "stop"
    if roll < 0.10 and answer.isalpha():
        answer = rng.choice([f"**{answer}**", f"({answer})", f"{answer}. option"])
    return body + f"\nAnswer: \\boxed{{{answer}}}", "stop"


def _wrong(rng: random.Random, gt: str) -> str:
    if gt.isalpha():
        return rng.choice([c for c in "ABCDE" if c != gt])
    if "." in gt:
        return f"{float(gt) + rng.choice([-1.5, 0.25, 2.0]):.2f}"
    return str(int(gt) + rng.choice([-2, -1, 1, 10]))


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """Write ``lines`` Stage-1 records (32 per question), streaming, so generation needs little memory."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        q = 0
        while q * 32 < lines:
            kind = q % 3
            gt = rng.choice("ABCDE") if kind == 0 else str(rng.randrange(1, 500)) if kind == 1 \
                else f"{rng.uniform(1, 100):.2f}"
            base = {"image": f"images/{q:07d}.jpg", "question_orig": f"Question {q}: what is the value?",
                    "question": f"Question {q}: what is the value?\nAnswer the preceding question ...",
                    "answer": gt, "prompt_version": "en_v2", "item_id": f"{q:040x}"}
            for idx in range(min(32, lines - q * 32)):
                text, finish = _response(rng, gt if rng.random() < 0.5 else _wrong(rng, gt))
                fh.write(json.dumps({**base, "response": text, "sample_idx": idx, "seed": rng.getrandbits(63),
                                     "finish_reason": finish}) + "\n")
            q += 1


def bench_judge(path: Path, n: int) -> float:
    from mpo.generate.answers import _check_cached
    from mpo.generate.postprocess import judge_record

    with open(path, "rb") as fh:
        records = [json.loads(fh.readline()) for _ in range(n)]
    _check_cached.cache_clear()
    start, cpu = time.perf_counter(), time.process_time()
    for record in records:
        judge_record(record, "auto")
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def bench_pass1(path: Path, lines: int, workers: int) -> float:
    from mpo.generate.postprocess import PostprocessConfig, _scan_file

    cfg = PostprocessConfig(data_dir=path.parent, save_dir=path.parent / "unused", workers=workers)
    start, cpu = time.perf_counter(), _cpu_with_children()
    scan = _scan_file(path, 0, "auto", cfg, lines)
    assert scan.lines == lines, (scan.lines, lines)
    return lines / (time.perf_counter() - start), lines / (_cpu_with_children() - cpu)


def _cpu_with_children() -> float:
    """CPU seconds of this process plus its finished children (the pool's workers, once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _kib(path: str, field: str) -> int:
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    return next((int(x.split()[1]) for x in text.splitlines() if x.startswith(field)), 0)


def bench_end_to_end(data_dir: Path, save_dir: Path, max_lines: int, workers: int) -> dict:
    """Run the CLI in a child; memory is sampled every 0.1 s. PSS (proportional set size) is the honest
    sum over a forked pool, whose workers share the parent's pages (RSS would count those twice)."""
    cmd = [sys.executable, "-m", "mpo.cli", "postprocess", "correctness", "--data-dir", str(data_dir),
           "--save-dir", str(save_dir), "--max-lines", str(max_lines), "--workers", str(workers), "--overwrite"]
    start, cpu = time.perf_counter(), _cpu_with_children()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree_pss": 0, "main_hwm": 0, "child_hwm": 0}

    def watch() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            peak["tree_pss"] = max(peak["tree_pss"], pss)
            peak["main_hwm"] = max(peak["main_hwm"], _kib(f"/proc/{proc.pid}/status", "VmHWM:"))
            for p in pids[1:]:
                peak["child_hwm"] = max(peak["child_hwm"], _kib(f"/proc/{p}/status", "VmHWM:"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"postprocess failed ({proc.returncode}):\n{out}")
    cpu = _cpu_with_children() - cpu  # the CLI process and its pool workers (waited for: counted)
    return {"wall_s": round(wall, 2), "lines_per_s": round(max_lines / wall), "cpu_s": round(cpu, 2),
            "lines_per_cpu_s": round(max_lines / cpu),
            "peak_tree_pss_mb": peak["tree_pss"] >> 10, "main_peak_rss_mb": peak["main_hwm"] >> 10,
            "worker_peak_rss_mb": peak["child_hwm"] >> 10, "log": out.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000, help="Stage-1 lines in the synthetic file")
    ap.add_argument("--judge-lines", type=int, default=50_000, help="records for the in-memory judge timing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_pp_") as tmp:
        work = args.workdir or Path(tmp)
        data = work / "data"
        data.mkdir(parents=True, exist_ok=True)
        path = data / "synthetic_en_v2.jsonl"
        t0 = time.perf_counter()
        generate(path, args.lines)
        print(f"generated {args.lines} lines, {path.stat().st_size >> 20} MiB in {time.perf_counter() - t0:.1f} s")
        wall, cpu = bench_judge(path, min(args.judge_lines, args.lines))
        print(f"judge_1proc: {wall:,.0f} responses/s (wall), judge_1proc_cpu: {cpu:,.0f} responses/CPU-s")
        wall, cpu = bench_pass1(path, args.lines, args.workers)
        print(f"pass1_{args.workers}proc: {wall:,.0f} responses/s (wall), "
              f"pass1_cpu: {cpu:,.0f} responses/CPU-s ({2 * cpu:,.0f}/s on 2 free cores)")
        e2e = bench_end_to_end(data, work / "out", args.lines, args.workers)
        print(f"end_to_end: {json.dumps(e2e)}")
        print(f"cpu_count={os.cpu_count()} python={sys.version.split()[0]}")


if __name__ == "__main__":
    main()
