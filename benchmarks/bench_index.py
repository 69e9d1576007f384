"""Benchmark the annotation index: build, cache load, random access. Targets (issue item 6, 2-core machine):
index 1,000,000 rows of ~1 KB in under 10 s and under 300 MB peak RSS; random access to a row in under 1 ms.

    .venv/bin/python benchmarks/bench_index.py                 # 1,000,000 rows (writes ~1 GB under --dir)
    .venv/bin/python benchmarks/bench_index.py --rows 100000   # quicker

Build and load each run in a fresh interpreter, so that peak RSS (ru_maxrss) is that of the index alone plus the
interpreter and imports (reported separately as "baseline"). The file has just been written, so it is read from
the page cache: a cold disk adds its read time (1 GB at the disk's sequential speed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, os, resource, sys, time
from mpo.data.index import AnnotationIndex
from mpo.data.records import parse_row
path, cache, mode = sys.argv[1], sys.argv[2], sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
index = AnnotationIndex(path, cache_dir=cache)
seconds = time.perf_counter() - t
out = {"seconds": seconds, "rows": len(index), "from_cache": index.from_cache, "baseline_rss_mb": base / 1024,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if mode == "access":
    import numpy as np
    picks = np.random.default_rng(0).integers(0, len(index), size=20000)
    lat = []
    for i in picks[:10000]:
        t = time.perf_counter(); index.raw(int(i)); lat.append(time.perf_counter() - t)
    parse = []
    for i in picks[10000:]:
        t = time.perf_counter(); parse_row(index.raw(int(i)), "bench", index.line_number(int(i))); parse.append(time.perf_counter() - t)
    out.update(raw_mean_us=float(np.mean(lat)) * 1e6, raw_p99_us=float(np.percentile(lat, 99)) * 1e6,
               raw_max_us=float(np.max(lat)) * 1e6, parse_mean_us=float(np.mean(parse)) * 1e6,
               parse_p99_us=float(np.percentile(parse, 99)) * 1e6)
print(json.dumps(out))
"""


def write_rows(path: Path, n: int, seed: int = 0) -> float:
    """~1 KB preference rows (chosen and rejected padded to 400-600 bytes each); 10,000 distinct rows written in blocks."""
    rng = np.random.default_rng(seed)
    block_rows = min(n, 10_000)
    pads = rng.integers(400, 600, size=block_rows)
    rows = [json.dumps({"image": f"img/{k:07d}.jpg", "question": f"Question {k}: what is shown?",
                        "chosen": "A " + "x" * int(pads[k]), "rejected": "B " + "y" * int(pads[k])})
            for k in range(block_rows)]
    block = ("\n".join(rows) + "\n").encode()
    with open(path, "wb") as fh:
        left = n
        while left:
            take = min(left, block_rows)
            fh.write(block if take == block_rows else ("\n".join(rows[:take]) + "\n").encode())
            left -= take
    return path.stat().st_size / n


def child(path: Path, cache: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(cache), mode], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the test file (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, cache = Path(tmp) / "rows.jsonl", Path(tmp) / "cache"
        t = time.perf_counter()
        mean_bytes = write_rows(path, args.rows)
        print(f"wrote {args.rows:,} rows, {path.stat().st_size / 1e6:,.0f} MB ({mean_bytes:,.0f} B/row) "
              f"in {time.perf_counter() - t:.1f} s")
        build = child(path, cache, "build")
        load = child(path, cache, "access")
        assert not build["from_cache"] and load["from_cache"] and build["rows"] == args.rows
        print(f"build (scan + write cache): {build['seconds']:.2f} s, peak RSS {build['peak_rss_mb']:.0f} MB "
              f"(baseline after imports {build['baseline_rss_mb']:.0f} MB)   target < 10 s, < 300 MB")
        print(f"load from cache:            {load['seconds']:.3f} s, peak RSS {load['peak_rss_mb']:.0f} MB")
        print(f"random raw(i):              mean {load['raw_mean_us']:.1f} us, p99 {load['raw_p99_us']:.1f} us, "
              f"max {load['raw_max_us']:.0f} us   target < 1 ms")
        print(f"random raw(i) + parse_row:  mean {load['parse_mean_us']:.1f} us, p99 {load['parse_p99_us']:.1f} us")
        ok = build["seconds"] < 10 and build["peak_rss_mb"] < 300 and load["raw_p99_us"] < 1000
        print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
