"""The floor of ``mpo precompute-ref`` on this machine, against the reference forward it replaces.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ref_floor.py --work /tmp/bench     # internvl448 data, ~2 min

Same model folder and data as ``bench_train.py --case internvl448`` (built in ``--work`` when missing, reused
when they match). One process, nothing else running, torch's default threads, and three timings over all pairs:

* ``decode_s``: encoding every pair as the precompute does (image decode, tiling, normalising, tokenizing), one
  pass, single-threaded Python as in the precompute's prefetch thread;
* ``precompute_forward_s``: the precompute's forward alone on batches decoded beforehand: its own plan (a
  question's pairs in one span, about 8 pairs per batch), inference mode, best of two passes;
* ``in_loop_forward_s``: the reference forward that training runs in the loop when there is no cache: the same
  pairs in micro-batches of 4 (``bench_train``'s batch), one unpadded row each, best of two passes.

The epoch target of ``bench_train`` (``epoch_speedup_vs_trl_cached_ref`` >= ``speedup_vs_trl``) holds exactly when
the precompute takes no longer than the in-loop reference adds to an epoch. Where decoding has no core of its own,
the precompute takes at least ``precompute_forward_s + decode_s`` minus what its nice-19 prefetch thread hides in
the forward's idle moments: ``floor_over_in_loop`` prints that sum over ``in_loop_forward_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import CASES, SEED, prepare_data, prepare_model  # noqa: E402


def _best_of_two(scorer, batches) -> float:
    with torch.inference_mode():
        scorer(batches[0])  # warm-up
        times = []
        for _ in range(2):
            t = time.perf_counter()
            for batch in batches:
                scorer(batch)
            times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_train's --work folder (models and data)")
    parser.add_argument("--dims", choices=["small", "baseline"], default="small")
    parser.add_argument("--pairs", type=int, default=128, help="pairs in the data set (bench_train: 128)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from mpo.data.encode import PairEncoder
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.models import load_model, load_processor
    from mpo.train.data import Collator, EncodedPairs
    from mpo.train.forward import PairScorer
    from mpo.train.precompute import _batches, _questions

    case = CASES["internvl448"]
    model_dir = prepare_model(args.work.resolve(), case.arch, args.dims)
    data_dir, _ = prepare_data(args.work.resolve(), case, model_dir, args.pairs)
    processor = load_processor(str(model_dir))
    mixture = PreferenceMixture(read_meta(data_dir / "meta.json"), seed=SEED, max_dynamic_patch=4)
    dataset = EncodedPairs(mixture, PairEncoder(processor, max_length=8192, system_prompt=None), augment_seed=SEED)
    dataset[0]  # the processor's lazy imports and first-call set-up are not decoding
    t = time.perf_counter()
    items = [dataset[i] for i in range(len(mixture))]
    decode_s = time.perf_counter() - t

    model = load_model(str(model_dir), dtype="float32", attn_implementation="sdpa").eval().requires_grad_(False)
    scorer, pad = PairScorer(model), processor.tokenizer.pad_token_id
    plan = _batches(_questions(mixture, list(range(len(mixture)))), 8)
    grouped = Collator(pad, "shared", attn_implementation="sdpa", dtype=torch.float32, group_prompts=True)
    pre = [grouped([items[i] for q in questions for i in q])[0] for questions in plan]
    plain = Collator(pad, "shared", attn_implementation="sdpa", dtype=torch.float32)
    loop = [plain(items[i:i + 4])[0] for i in range(0, len(items), 4)]
    result = {"pairs": len(items), "threads": torch.get_num_threads(), "decode_s": decode_s,
              "decode_ms_per_pair": 1000 * decode_s / len(items),
              "precompute_forward_s": _best_of_two(scorer, pre), "in_loop_forward_s": _best_of_two(scorer, loop)}
    result["floor_over_in_loop"] = (result["precompute_forward_s"] + decode_s) / result["in_loop_forward_s"]
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22s} {value:.3f}" if isinstance(value, float) else f"{key:22s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
