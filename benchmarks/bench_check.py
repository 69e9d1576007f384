"""Benchmark ``mpo data check`` throughput. Targets (issue item 9): >= 2,000 text rows/s and >= 200 image
decodes/s per worker.

    .venv/bin/python benchmarks/bench_check.py                       # 20,000 text rows, 1,000 + 2,000 images
    .venv/bin/python benchmarks/bench_check.py --workers 2           # also time a 2-process pool

Image sets: 448x448 JPEG (one InternVL tile, camera-like: smooth gradient plus noise) and 64x64 PNG (the demo).
Times cover the whole ``run_check`` (index, parse, full decode, RGB conversion), without a progress bar.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mpo.data import run_check


def _write(root: Path, name: str, rows: list[dict]) -> Path:
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = root / f"{name}.meta.json"
    meta.write_text(json.dumps({name: {"root": "images", "annotation": f"{name}.jsonl"}}))
    return meta


def _images(root: Path, n: int, size: int, fmt: str, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    names = []
    for k in range(n):
        base = ramp[None, :, None] * rng.uniform(0.3, 1.0, size=3) + ramp[:, None, None] * rng.uniform(0, 0.5)
        pixels = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        name = f"{fmt.lower()}{size}/{k:05d}.{fmt.lower()}"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        names.append(name)
    return names


def _time(meta: Path, workers: int) -> tuple[float, int]:
    t = time.perf_counter()
    report = run_check(meta, workers=workers, progress=False)
    seconds = time.perf_counter() - t
    assert report.exit_code == 0, report.lines()[:5]
    return seconds, sum(d.rows for d in report.datasets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-rows", type=int, default=20_000)
    ap.add_argument("--jpeg-images", type=int, default=1_000)
    ap.add_argument("--png-images", type=int, default=2_000)
    ap.add_argument("--workers", type=int, default=1, help="also time this many workers (1 = only one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = _write(root, "text", [{"question": f"What is {k} plus 1?", "chosen": f"It is {k + 1}. " * 8,
                                      "rejected": f"It is {k + 2}. " * 8, "source": "bench"}
                                     for k in range(args.text_rows)])
        jpeg = _write(root, "jpeg", [{"image": p, "question": "Describe.", "chosen": "a", "rejected": "b"}
                                     for p in _images(root, args.jpeg_images, 448, "JPEG")])
        png = _write(root, "png", [{"image": p, "question": "Colour?", "chosen": "red", "rejected": "blue"}
                                   for p in _images(root, args.png_images, 64, "PNG")])
        for workers in sorted({1, args.workers}):
            print(f"workers={workers}")
            for name, meta, unit, target in (("text rows", text, "rows", 2000), ("448x448 JPEG", jpeg, "decodes", 200),
                                             ("64x64 PNG", png, "decodes", 200)):
                seconds, n = _time(meta, workers)
                rate = n / seconds
                verdict = ("PASS" if rate / workers >= target else "FAIL") + f" (target >= {target:,}/s per worker)"
                print(f"  {name:13s} {n:6,d} in {seconds:6.2f} s = {rate:8,.0f} {unit}/s   "
                      f"{rate / workers:8,.0f}/s per worker  {verdict}")


if __name__ == "__main__":
    main()
