"""Load test of the data path at a million rows: indexing, ``mpo data check`` and one epoch of the sampler's order,
each with bounded memory.

    .venv/bin/python benchmarks/bench_load.py                        # 1,000,000 text rows (~330 MB under --dir)
    .venv/bin/python benchmarks/bench_load.py --rows 100000          # quicker
    .venv/bin/python benchmarks/bench_load.py --workers 2 --json     # also a 2-process check; one JSON line

The meta file and its annotation file are generated on the fly: text-only preference rows of ~330 bytes (the check
then measures parsing and validation, not image decoding; see bench_check.py for images), with one deliberately bad
row in every 1,000 (wrong types, bad JSON, a lone surrogate, an image path out of the root), which the check must
report one by one.

Every stage runs in a fresh interpreter, so its peak RSS (``ru_maxrss``) is that stage alone plus the interpreter
and its imports (reported as the baseline); with ``--workers`` the largest pool process is reported too. Stages:

* ``index``: ``AnnotationIndex`` scan (byte offsets of every row; 24 bytes a row), no cache;
* ``check``: ``run_check(meta, progress=False)``: index from the cache, every row parsed and validated;
* ``order``: ``ResumableOrder(n, per_device, accumulation, world_size=1).micro_batches(0)`` for a whole epoch, and
  the first micro-batch of the epoch's last step (``first_step``: what a resume does; no replay).

The file has just been written, so it is read from the page cache; a cold disk adds its sequential read time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
stage, meta, cache, per_device, accumulation, workers = sys.argv[1:7]
from mpo.data.check import run_check
from mpo.data.index import AnnotationIndex
from mpo.data.meta import read_meta
if stage == "order":  # torch: only the sampler needs it (hundreds of MB of baseline RSS)
    from mpo.train.data import ResumableOrder
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"stage": stage, "baseline_rss_mb": peak_mb()}
(spec,) = read_meta(meta)
t = time.perf_counter()
if stage == "index":
    index = AnnotationIndex(spec.annotation, use_cache=False)
    out["rows"] = len(index)
elif stage == "check":
    report = run_check(meta, progress=False, cache_dir=cache, workers=int(workers))
    (d,) = report.datasets
    out.update(rows=d.rows, usable=d.usable, errors=sum(p.severity == "error" for p in d.problems),
               error_lines=[p.line for p in d.problems if p.severity == "error"][:5], exit_code=report.exit_code)
else:
    n = len(AnnotationIndex(spec.annotation, cache))
    order = ResumableOrder(n, per_device=int(per_device), accumulation=int(accumulation), world_size=1)
    t = time.perf_counter()
    seen = count = 0
    for batch in order.micro_batches(0):
        count += 1
        seen += len(batch)
    out.update(rows=n, micro_batches=count, pairs=seen, steps=order.steps_per_epoch)
    out["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    next(order.micro_batches(0, first_step=order.steps_per_epoch - 1))
    out["resume_jump_seconds"] = time.perf_counter() - t
    t = None
if t is not None:
    out["seconds"] = time.perf_counter() - t
out["peak_rss_mb"] = peak_mb()
if int(workers) > 1:  # the largest pool process
    out["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
"""

# One bad row per 1,000, cycling through these (each must become one row error of ``mpo data check``).
_BAD_ROWS = [
    '{"question": 7, "chosen": "a", "rejected": "b"}',
    '{"question": "q", "chosen": "a", "rejected": "b"',
    '{"question": "q \\ud800", "chosen": "a", "rejected": "b"}',
    '{"image": "../../etc/passwd", "question": "q", "chosen": "a", "rejected": "b"}',
]


def write_meta(folder: Path, n: int) -> Path:
    """``meta.json`` + ``rows.jsonl`` with ``n`` rows (``n // 1000`` of them bad); written in 10,000-row blocks."""
    good = [json.dumps({"question": f"Question {k}: what is {k % 97} plus {k % 89}?",
                        "chosen": f"Adding {k % 97} and {k % 89} gives {k % 97 + k % 89}. " + "x" * (60 + k % 40),
                        "rejected": f"Adding {k % 97} and {k % 89} gives {k % 97 + k % 89 + 1}. " + "y" * (60 + k % 40),
                        "task": "load", "answer": str(k % 97 + k % 89)}) for k in range(10_000)]
    block = [row if k % 1000 != 999 else _BAD_ROWS[(k // 1000) % len(_BAD_ROWS)] for k, row in enumerate(good)]
    data = ("\n".join(block) + "\n").encode()
    with open(folder / "rows.jsonl", "wb") as fh:
        left = n
        while left:
            take = min(left, len(block))
            fh.write(data if take == len(block) else ("\n".join(block[:take]) + "\n").encode())
            left -= take
    (folder / "images").mkdir(exist_ok=True)
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"load": {"root": "images", "annotation": "rows.jsonl", "length": n}}))
    return meta


def stage(name: str, meta: Path, cache: Path, args: argparse.Namespace, workers: int = 1) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, name, str(meta), str(cache), str(args.per_device),
                          str(args.accumulation), str(workers)], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--per-device", type=int, default=4, help="ResumableOrder per_device (pairs per micro-batch)")
    ap.add_argument("--accumulation", type=int, default=8, help="ResumableOrder accumulation")
    ap.add_argument("--workers", type=int, default=1, help="also time the check with this many processes")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        meta = write_meta(folder, args.rows)
        size_mb = (folder / "rows.jsonl").stat().st_size / 1e6
        results = {"rows": args.rows, "file_mb": size_mb, "write_seconds": time.perf_counter() - t}
        cache = folder / "cache"
        results["index"] = stage("index", meta, cache, args)
        results["check"] = stage("check", meta, cache, args)
        if args.workers > 1:
            results[f"check_{args.workers}_workers"] = stage("check", meta, cache, args, args.workers)
        results["order"] = stage("order", meta, cache, args)
    bad = args.rows // 1000
    for key in [k for k in results if k.startswith("check")]:
        check = results[key]
        assert check["rows"] == args.rows and check["errors"] == bad and check["usable"] == args.rows - bad, check
    assert results["order"]["pairs"] == results["order"]["steps"] * args.per_device * args.accumulation
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.rows:,} rows, {size_mb:,.0f} MB ({size_mb * 1e6 / args.rows:,.0f} B/row, {bad:,} bad), "
          f"written in {results['write_seconds']:.1f} s")
    print(f"{'stage':28s} {'time':>9s} {'rows/s':>11s} {'peak RSS':>9s} {'baseline':>9s} {'workers':>8s}")
    for key in ["index", *[k for k in results if k.startswith("check")], "order"]:
        r = results[key]
        labels = {"index": "index (scan, no cache)", "check": "data check (1 process)",
                  "order": "sampler order, one epoch", f"check_{args.workers}_workers": f"data check ({args.workers} "
                                                                                        "processes)"}
        label = labels[key]
        pool = f"{r['workers_peak_rss_mb']:7.0f}M" if "workers_peak_rss_mb" in r else "       -"
        print(f"{label:28s} {r['seconds']:8.2f}s {r['rows'] / r['seconds']:11,.0f} {r['peak_rss_mb']:8.0f}M "
              f"{r['baseline_rss_mb']:8.0f}M {pool}")
    check, order = results["check"], results["order"]
    print(f"check found {check['errors']:,} bad rows, one error each (first lines: {check['error_lines']})")
    print(f"order: {order['micro_batches']:,} micro-batches of {args.per_device} in {order['steps']:,} steps; "
          f"resume jump to the last step: {order['resume_jump_seconds'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
