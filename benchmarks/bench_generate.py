"""Benchmark of the ``hf`` sampling backend: samples/s on the tiny InternVL (generation issue, item 7).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py --batch-sizes 1 8 32 --n 8 --max-new-tokens 64
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generate.py --checkpoint /path/to/model --device cuda

Workload: the demo's correctness prompts (64x64 shape images, two-image pairs and text-only arithmetic), wrapped in
the ``en_v2`` template (~350 prompt tokens with the tiny tokenizer), ``--n`` samples per prompt, every sample run to
``--max-new-tokens`` (a random model almost never stops early), ``--dynamic --max-num 6``. Two measurements:

* ``sampler``: ``HFSampler.sample`` alone over all prompts in batches (after one warm-up batch), per batch size;
* ``end_to_end``: ``run_correctness`` on the prompt file with the same sampler: reading, part-file appends with
  fsync per batch, and the merge.

Each line is JSON: samples/s and generated tokens/s per wall second, and ``*_cpu`` per CPU second of this
process. On a shared machine the wall numbers say what this run got, the CPU numbers what the code costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _requests(prompt_path: Path, image_root: Path, n: int, seed: int):
    from mpo.generate.items import load_item_images, read_prompts, sample_seed
    from mpo.generate.prompts import place_image_markers, to_content, wrap_question
    from mpo.generate.samplers import SampleRequest

    prompts = read_prompts(prompt_path, required=("question", "answer"), image_root=image_root,
                           prepare=lambda row, k: place_image_markers(wrap_question(row["question"], "en_v2"), k))
    return [SampleRequest([{"role": "user", "content": to_content(item.prompt)}],
                          tuple(load_item_images(prompts, item)), False,
                          tuple(sample_seed(seed, item.item_id, i) for i in range(n))) for item in prompts.items]


def _time(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_sampler(sampler, requests, n: int, params, batch_size: int, repeats: int) -> dict:
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    sampler.sample(batches[0], n, params)  # warm-up: first-call allocations, lazy imports
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = _time(lambda: [sampler.sample(b, n, params) for b in batches])
        walls.append(wall)
        cpus.append(cpu)
    samples = len(requests) * n
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"bench": "sampler", "batch_size": batch_size, "prompts": len(requests), "n": n, "samples": samples,
            "max_new_tokens": params.max_new_tokens, "seconds": round(wall, 3),
            "samples_per_s": round(samples / wall, 2), "tokens_per_s": round(samples * params.max_new_tokens / wall, 1),
            "samples_per_s_cpu": round(samples / cpu, 2), "repeats": repeats}


def bench_end_to_end(sampler, checkpoint: str, prompt_path: Path, image_root: Path, out: Path, n: int,
                     max_new_tokens: int, batch_size: int) -> dict:
    from mpo.generate.correctness import CorrectnessConfig, run_correctness

    cfg = CorrectnessConfig(checkpoint=checkpoint, prompt_path=str(prompt_path), out_dir=str(out),
                            image_root=str(image_root), num_return_sequences=n, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, num_workers=2, dynamic=True, max_num=6, progress=False)
    result = {}
    wall, cpu = _time(lambda: result.update(r=run_correctness(cfg, sampler, env={})))
    samples = result["r"].summary["samples"]
    return {"bench": "end_to_end", "batch_size": batch_size, "samples": samples, "seconds": round(wall, 3),
            "samples_per_s": round(samples / wall, 2), "samples_per_s_cpu": round(samples / cpu, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model folder (default: a fresh tiny InternVL)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=16, help="demo prompts")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from mpo.data.demo import write_demo
    from mpo.generate.samplers import HFSampler, SamplingParams
    from mpo.models import build_tiny

    with tempfile.TemporaryDirectory(prefix="bench_generate.") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or str(build_tiny(tmp / "tiny" / "internvl", "internvl"))
        demo = write_demo(tmp / "demo", n=20, n_heldout=4, n_prompts=args.prompts, seed=0)
        sampler = HFSampler(checkpoint, dtype=args.dtype, device=args.device, dynamic=True, max_num=6)
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        requests = _requests(demo["correctness_prompts"], demo["images"], args.n, seed=0)
        print(json.dumps({"checkpoint": checkpoint if args.checkpoint else "tiny internvl (build_tiny defaults)",
                          "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                          "cpus": os.cpu_count(), "python": sys.version.split()[0]}))
        for bs in args.batch_sizes:
            print(json.dumps(bench_sampler(sampler, requests, args.n, params, bs, args.repeats)), flush=True)
        print(json.dumps(bench_end_to_end(sampler, checkpoint, demo["correctness_prompts"], demo["images"],
                                          tmp / "out", args.n, args.max_new_tokens, max(args.batch_sizes))))


if __name__ == "__main__":
    main()
