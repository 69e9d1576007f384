"""Benchmark an MPO training step: mpo against TRL 1.16's ``DPOTrainer`` configured for MPO, same model, data,
batch and machine, in one invocation (issue "The fast pair path", item 6).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py                       # all cases, ~9 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --case text --json    # one case, JSON
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --steps 50            # longer, tighter medians
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --case internvl448 --dims baseline   # env-notes dims
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --case internvl448 --steps 8 --profile mpo_cached \
        --work /tmp/bench                                # where mpo's step time goes: /tmp/bench/*.profile.txt
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py --case internvl448 --pairs-per-question 4
                                                         # 4 pairs per question and image, as the correctness pipeline

What runs, per case, each in its own process (so each peak RSS is its own):

* ``trl``: ``DPOTrainer`` with ``loss_type=["sigmoid","bco_pair","sft"]``, ``loss_weights=[0.8,0.2,1.0]``, beta 0.1,
  fp32, no gradient checkpointing, reference model in the loop (TRL refuses ``precompute_ref_log_probs`` for vision
  data; the text case keeps the same configuration so the cases compare alike);
* ``mpo``: ``mpo.train.recipe`` with the shared pair layout and the reference in the loop;
* ``mpo_cached``: the same with ``train.ref_cache`` (built by ``mpo.train.precompute.run_precompute``, timed in its
  own process before the steps: that time, spread over the steps of one epoch, gives the epoch speedup);
* ``bound``: the cost floor of a step: a plain forward+backward of the policy over the deduplicated tokens of the
  batch (prompt once, chosen and rejected after it, in one row per pair; SDPA, fp32; the LM head only on answer
  positions), gradient clipping and the AdamW step. Two plain layouts are timed on every batch: one right-padded
  batch (2D padding mask) and each pair alone as an unpadded row (no mask: SDPA's causal fast path); the bound of a
  batch is the faster of the two. Then, timed apart, one no-grad forward of a reference copy over the padded batch.
  The rows are plain causal rows (the rejected answer sees the chosen one): the bound prices the tokens, it does not
  train MPO. Batches are built before timing, so the bound has no data loading.

The steps run in lock-step (see ``_bench_common``): one step of each worker in turn, order reversed every round,
all on the same batches in the same order (TRL reads the rows in mpo's epoch-0 order with a sequential sampler).
Step time is the wall time between consecutive optimizer steps, data loading included (no loader workers);
medians over ``--steps`` steps after ``--warmup`` warm-up steps. Memory is the working set of the steps: peak RSS
minus RSS just before the first step. ``loadavg.other_processes_cores`` says how many cores other people's jobs kept
busy meanwhile: above ~0.2 the numbers are disturbed (with torch's 2 threads on 2 cores, one busy foreign process
can double a step); ``--threads 1`` is the robust setting on a busy machine.

Model (both frameworks load the same folder): ``mpo.models.tiny.build_tiny``, vocab 2048, InternVL at the real tile
geometry (448 px, patch 14, 256 tokens per tile, up to 4 tiles + thumbnail); ``--dims small`` (default: text hidden
128 × 2 layers, vision 64 × 2) or ``--dims baseline`` (text 256 × 4, vision 128 × 2: the dims of TRL's baseline in
env-notes §3; about 2.7x the run time). Data: synthetic, written by ``_bench_common.write_preference_data``, one
pair per question unless ``--pairs-per-question`` says more (only the precompute can use it: training shuffles
pairs, and the precompute scores a question's pairs in one span).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import Gate, OtherLoad, stats, write_preference_data  # noqa: E402

BATCH = 4  # pairs per optimizer step (env-notes §3 baseline)
SEED = 42  # mpo's default data.seed: its epoch-0 order is randperm(n, seed 42), which TRL and the bound reuse
# "baseline": the dims of TRL's baseline in env-notes §3; "small": build_tiny's defaults, ~3x less compute per step,
# so that the default invocation (three cases, four workers each) stays near ten minutes on two cores.
MODEL_DIMS = {
    "small": dict(text_hidden=128, text_layers=2, vision_hidden=64, vision_layers=2, vocab_size=2048),
    "baseline": dict(text_hidden=256, text_layers=4, vision_hidden=128, vision_layers=2, vocab_size=2048),
}
LOSS = dict(types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], beta=0.1)
LEARNING_RATE = 5e-6
WORKERS = ("trl", "mpo", "mpo_cached", "bound")


@dataclass(frozen=True)
class Case:
    """One benchmark case: model family, data shape and the targets of the issue."""

    name: str
    arch: str  # build_tiny arch
    prompt_tokens: int  # question text tokens (VLM: after <image>); text case: the whole rendered prompt
    answer_tokens: tuple[int, int]  # inclusive range, drawn independently for chosen and rejected
    tiles: tuple[int, ...] = ()  # tile counts drawn uniformly (InternVL; +1 thumbnail when > 1)
    targets: dict[str, tuple[str, float | str]] = field(default_factory=dict)  # goal: a number or another key


CASES: dict[str, Case] = {c.name: c for c in (
    Case("internvl448", "internvl", 40, (64, 256), (1, 2, 3, 4),
         {"speedup_vs_trl": (">=", 2.2), "speedup_vs_trl_cached_ref": (">=", 3.0),
          "epoch_speedup_vs_trl_cached_ref": (">=", "speedup_vs_trl"), "step_over_bound": ("<=", 1.1),
          "mem_ratio_vs_trl": ("<=", 0.6)}),
    Case("text", "qwen2", 64, (64, 64), (), {"speedup_vs_trl": (">=", 1.4)}),
    Case("long_answers", "internvl", 40, (512, 1024), (1, 2, 3, 4), {"speedup_vs_trl": (">=", 1.3)}),
)}


# ----------------------------------------------------------------------------------------------------------------
# preparation (parent): model folders and data, reused from --work when they match


def prepare_model(work: Path, arch: str, dims: str) -> Path:
    from mpo.models.tiny import build_tiny

    out = work / f"model_{arch}_{dims}"
    spec = {"arch": arch, **MODEL_DIMS[dims], "image_size": 448, "patch_size": 14, "max_patches": 4}
    stamp = out / "bench_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return out
    if stamp.is_file():  # the bench's own folder of other dims (or from before mpo_tiny.json): built anew
        shutil.rmtree(out)
    build_tiny(out, arch, image_size=448, patch_size=14, max_patches=4, **MODEL_DIMS[dims])
    stamp.write_text(json.dumps(spec))
    return out


def _template_overhead(model_dir: Path) -> int:
    """Tokens the chat template adds around a one-token user question (system turn, markers, header)."""
    from mpo.data.encode import PairEncoder
    from mpo.models import load_processor

    encoder = PairEncoder(load_processor(str(model_dir)))

    class _Row:  # the fields PairEncoder.prompt_text reads
        question, system_prompt = "x", None

    text = encoder.prompt_text(_Row())
    return len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def prepare_data(work: Path, case: Case, model_dir: Path, n_pairs: int,
                 pairs_per_question: int = 1) -> tuple[Path, dict[str, Any]]:
    from mpo.models import load_processor

    out = work / (f"data_{case.name}_{model_dir.name}" + ("" if pairs_per_question == 1 else f"_q{pairs_per_question}"))
    question_tokens = case.prompt_tokens
    if not case.tiles:  # "64-token prompts": the rendered prompt, template included
        question_tokens -= _template_overhead(model_dir)
    spec = {"case": case.name, "n_pairs": n_pairs, "question_tokens": question_tokens,
            "answer_tokens": list(case.answer_tokens), "tiles": list(case.tiles), "model": str(model_dir),
            "pairs_per_question": pairs_per_question}
    stamp = out / "bench_spec.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("spec") == spec:
            return out, saved["summary"]
    shutil.rmtree(out, ignore_errors=True)
    processor = load_processor(str(model_dir))
    tokenizer = getattr(processor, "tokenizer", processor)
    summary = write_preference_data(out, n_pairs=n_pairs, question_tokens=question_tokens,
                                    answer_tokens=case.answer_tokens, tiles=case.tiles, tokenizer=tokenizer,
                                    pairs_per_question=pairs_per_question)
    stamp.write_text(json.dumps({"spec": spec, "summary": summary}))
    return out, summary


# ----------------------------------------------------------------------------------------------------------------
# workers (one process each)


def mpo_config(args: argparse.Namespace, out: Path, *, ref_cache: str = ""):
    """The mpo run: the same optimisation as TRL's (constant lr 5e-6, no weight decay, clip 1.0, AdamW)."""
    from mpo.config import load_config
    from mpo.train.config import RunConfig

    overrides = [f"model.path={args.model}", f"data.meta_path={args.data / 'meta.json'}", f"train.output_dir={out}",
                 f"train.max_steps={args.warmup + args.steps}", f"train.per_device_batch_size={BATCH}",
                 "train.lr_scheduler=constant", "train.warmup_steps=0", f"train.learning_rate={LEARNING_RATE}",
                 "train.weight_decay=0.0", "train.max_grad_norm=1.0", "train.logging_steps=1", "train.save_steps=0",
                 "data.max_length=8192", "data.max_dynamic_patch=4", "data.num_workers=0", f"data.seed={SEED}",
                 f"train.pair_layout={args.layout}", f"train.pack_length={args.pack_length}",
                 f"loss.beta={LOSS['beta']}", f"loss.loss_types={json.dumps(LOSS['types'])}",
                 f"loss.loss_weights={json.dumps(LOSS['weights'])}",
                 "data.system_prompt=none"]  # TRL renders the chat template alone: the same prompts, token for token
    if ref_cache:
        overrides.append(f"train.ref_cache={ref_cache}")
    overrides += args.mpo_set or []
    return load_config(RunConfig, None, overrides)


def worker_mpo(args: argparse.Namespace, gate: Gate, cached: bool) -> None:
    from mpo.train.recipe import setup, train

    out = args.work / f"run_{args.case}_{args.worker}"
    shutil.rmtree(out, ignore_errors=True)
    run = setup(mpo_config(args, out, ref_cache=str(args.cache) if cached else ""))
    log = run.metrics.log

    def log_then_wait(step: int, metrics: dict[str, float]) -> None:
        # metrics.log runs once per optimizer step (logging_steps=1), right after the step: the gate goes here.
        log(step, metrics)
        gate.step(loss=metrics.get("loss"), loss_step=step)

    run.metrics.log = log_then_wait
    gate.ready()
    train(run)


def _trl_dataset(data: Path, order: list[int]):
    """TRL's conversational preference rows, in ``order``; images stay files (``datasets`` keeps the path of a
    PIL image opened from disk and decodes it on access, as mpo decodes from disk in its loader)."""
    from datasets import Dataset
    from PIL import Image

    rows = [json.loads(x) for x in (data / "annotations" / "bench.jsonl").read_text().splitlines()]
    examples = []
    for i in order:
        row = rows[i]
        ex = {"prompt": [{"role": "user", "content": row["question"].removeprefix("<image>\n")}],
              "chosen": [{"role": "assistant", "content": row["chosen"]}],
              "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        if "image" in row:  # TRL puts the image before the question text, as "<image>\n" does for mpo
            ex["images"] = [Image.open(data / "images" / row["image"])]
        examples.append(ex)
    return Dataset.from_list(examples)


def worker_trl(args: argparse.Namespace, gate: Gate) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer

    vision = bool(CASES[args.case].tiles)
    n_rows = sum(1 for _ in open(args.data / "annotations" / "bench.jsonl", encoding="utf-8"))
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(SEED)).tolist()
    loader = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    # Loaded by path, so config._name_or_path lets TRL build its reference copy itself (ref_model=None).
    model = loader.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    processing = (AutoProcessor if vision else AutoTokenizer).from_pretrained(args.model)
    config = DPOConfig(
        output_dir=str(args.work / f"run_{args.case}_trl"), loss_type=LOSS["types"], loss_weights=LOSS["weights"],
        beta=LOSS["beta"], per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=None, use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", report_to="none", dataloader_num_workers=0,
        remove_unused_columns=not vision, logging_steps=1, disable_tqdm=True, seed=SEED,
        train_sampling_strategy="sequential")

    class Gated(TrainerCallback):
        logged: tuple[int, float] | None = None

        def on_train_begin(self, args_, state, control, **kwargs):
            gate.ready()

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logged = (state.global_step, float(logs["loss"]))

        def on_step_end(self, args_, state, control, **kwargs):
            # on_step_end fires after optimizer.step and zero_grad; step k's loss is logged just after it, so
            # this reports the loss of step k-1.
            step, loss = self.logged or (None, None)
            gate.step(loss=loss, loss_step=step)

    trainer = DPOTrainer(model=model, args=config, train_dataset=_trl_dataset(args.data, order),
                         processing_class=processing, callbacks=[Gated()])
    trainer.train()


def _single_rows(pairs: list) -> list[dict[str, Any]]:
    """Each pair alone as one unpadded row (prompt, chosen, rejected): no padding and no mask, so SDPA takes its
    causal fast path. The tightest layout of the deduplicated tokens a plain HF forward can run."""
    import torch

    out = []
    for p in pairs:
        row = torch.cat([p.prompt_ids, p.chosen_ids, p.rejected_ids])
        first = len(p.prompt_ids)
        inputs: dict[str, Any] = {"input_ids": row[None]}
        if "pixel_values" in p.image_inputs:
            inputs["pixel_values"] = p.image_inputs["pixel_values"]
        out.append({"inputs": inputs, "predict": torch.arange(first - 1, len(row) - 1), "targets": row[first:]})
    return out


def _plain_rows(pairs: list, pad_id: int) -> dict[str, Any]:
    """One right-padded row per pair: prompt, chosen, rejected (the deduplicated tokens), 2D padding mask.

    The rejected answer sees the chosen one here, so its log-probs are not MPO's: the bound prices the tokens,
    it does not train the objective. Targets are every answer token, predicted from the position before it.
    """
    import torch

    rows = [torch.cat([p.prompt_ids, p.chosen_ids, p.rejected_ids]) for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predict, targets = [], []
    for r, (row, p) in enumerate(zip(rows, pairs)):
        input_ids[r, :len(row)] = row
        attention_mask[r, :len(row)] = 1
        first = len(p.prompt_ids)
        predict.append(torch.arange(first - 1, len(row) - 1) + r * width)
        targets.append(row[first:])
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    pixels = [p.image_inputs["pixel_values"] for p in pairs if "pixel_values" in p.image_inputs]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    return {"inputs": inputs, "predict": torch.cat(predict), "targets": torch.cat(targets)}


def worker_bound(args: argparse.Namespace, gate: Gate) -> None:
    import torch
    import torch.nn.functional as F

    from mpo.data.encode import PairEncoder
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.models import load_model, load_processor
    from mpo.train.data import EncodedPairs, ResumableOrder
    from mpo.train.forward import backbone_of

    processor = load_processor(str(args.model))
    model = load_model(str(args.model), dtype="float32", attn_implementation="sdpa")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    mixture = PreferenceMixture(read_meta(args.data / "meta.json"), seed=SEED, max_dynamic_patch=4)
    dataset = EncodedPairs(mixture, PairEncoder(processor, max_length=8192))
    order = ResumableOrder(len(dataset), per_device=BATCH, accumulation=1, seed=SEED)
    tok = getattr(processor, "tokenizer", processor)
    pairs = [[dataset[i] for i in idx] for idx in islice(iter(order), args.warmup + args.steps)]
    batches = [_plain_rows(b, tok.pad_token_id) for b in pairs]
    singles = [_single_rows(b) for b in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)

    def answer_logits(net: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        hidden = backbone_of(net)(**b["inputs"], use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b["predict"])
        return net.get_output_embeddings()(flat).float()

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    gate.ready()
    for b, rows in zip(batches, singles):
        t0 = time.perf_counter()
        loss = F.cross_entropy(answer_logits(model, b), b["targets"])
        loss.backward()
        optimizer_step()
        t1 = time.perf_counter()
        with torch.no_grad():
            answer_logits(reference, b).log_softmax(-1).gather(1, b["targets"][:, None]).sum()
        t2 = time.perf_counter()
        n_targets = sum(len(r["targets"]) for r in rows)
        for r in rows:
            F.cross_entropy(answer_logits(model, r), r["targets"], reduction="sum").div(n_targets).backward()
        optimizer_step()
        gate.step(policy_s=t1 - t0, ref_s=t2 - t1, unpadded_s=time.perf_counter() - t2, loss=loss.item())


def attach_profiler(gate: Gate, path: Path, first_step: int) -> None:
    """Profile steps ``first_step``.. of this worker: aten ops by self CPU time (where the model time goes) and
    Python functions by cumulative time (where the rest goes: data loading, collation, the loss)."""
    import cProfile
    import io
    import pstats

    import torch

    python = cProfile.Profile()
    ops = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)

    def start(k: int) -> None:
        if k == first_step:
            ops.__enter__()
            python.enable()

    def finish() -> None:
        python.disable()
        ops.__exit__(None, None, None)
        text = io.StringIO()
        text.write(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=35) + "\n")
        pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(45)
        path.write_text(text.getvalue(), encoding="utf-8")

    gate.before_step.append(start)
    gate.on_exit.append(finish)


def worker_precompute(args: argparse.Namespace, gate: Gate) -> None:
    # Library imports are process start-up, outside the timer as they are outside the training workers' steps;
    # transformers imports its processor stack (torchvision, ~3 s here) lazily, at the first AutoProcessor use.
    from transformers import AutoProcessor, AutoTokenizer  # noqa: F401

    from mpo.train.precompute import run_precompute

    shutil.rmtree(args.cache, ignore_errors=True)
    cfg = mpo_config(args, args.work / f"run_{args.case}_precompute", ref_cache=str(args.cache))
    timings = []

    class Timing(logging.Handler):  # run_precompute logs its PrecomputeTiming with its last per-rank line
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "timing"):
                timings.append(record.timing)

    logger = logging.getLogger("mpo.refcache")
    logger.setLevel(logging.INFO)
    logger.addHandler(Timing())
    t0 = time.perf_counter()
    run_precompute(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    gate.send("result", precompute_s=elapsed, precompute_forward_s=timings[0].scoring_s,
              precompute_waiting_s=timings[0].waiting_s)


# ----------------------------------------------------------------------------------------------------------------
# orchestration (parent)


class Worker:
    """A worker process and the two pipes of its gate; its stdout/stderr go to ``<work>/<case>_<name>.log``."""

    def __init__(self, name: str, args: argparse.Namespace, case: Case, model: Path, data: Path, cache: Path):
        self.name = name
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        self.log_path = args.work / f"{case.name}_{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--case", case.name,
               "--ctl", f"{to_worker_r},{from_worker_w}", "--work", str(args.work), "--model", str(model),
               "--data", str(data), "--cache", str(cache), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--layout", args.layout, "--pack-length", str(args.pack_length), "--threads", str(args.threads)]
        cmd += [x for p in (args.profile or []) for x in ("--profile", p)]
        cmd += [x for o in (args.mpo_set or []) for x in ("--mpo-set", o)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(to_worker_r, from_worker_w),
                                         env=env)
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._in = os.fdopen(self._from_worker, "r", encoding="utf-8")
        self._out = os.fdopen(self._to_worker, "w", encoding="utf-8")
        self.steps: list[dict[str, Any]] = []
        self.ready: dict[str, Any] = {}

    def read(self, expected: str) -> dict[str, Any]:
        line = self._in.readline()
        if not line:
            self.proc.wait()
            tail = "".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
            raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}) before '{expected}'; "
                               f"last lines of {self.log_path}:\n{tail}")
        event = json.loads(line)
        if event["event"] != expected:
            raise RuntimeError(f"worker {self.name}: expected {expected}, got {event}")
        return event

    def command(self, what: str) -> None:
        try:
            self._out.write(what + "\n")
            self._out.flush()
        except BrokenPipeError:
            pass

    def step(self) -> None:
        self.command("go")
        self.steps.append(self.read("step"))

    def close(self) -> None:
        self.command("exit")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    t_case = time.perf_counter()
    steps_total = args.warmup + args.steps
    # Enough pairs that the measured steps stay inside epoch 0 (the order all three share), and at least 32
    # steps per epoch so that the precompute is amortised over a realistic, not a tiny, epoch.
    n_pairs = BATCH * max(32, steps_total)
    model = prepare_model(args.work, case.arch, args.dims)
    data, data_summary = prepare_data(args.work, case, model, n_pairs, args.pairs_per_question)
    cache = args.work / f"cache_{case.name}"
    load = {"start": _loadavg()}

    names = [w for w in WORKERS if not (args.no_cached and w == "mpo_cached")]
    precompute: dict[str, Any] = {}
    if "mpo_cached" in names:
        during = OtherLoad()
        pre = Worker("precompute", args, case, model, data, cache)
        precompute = pre.read("result")
        pre.close()
        load["after_precompute"] = _loadavg()
        # the precompute runs alone, before the lock-step: outside load then moves the epoch ratio alone
        load["precompute_other_processes_cores"] = round(during.cores(), 2)

    # Over the workers' whole lives (setup included), so that all their CPU time, counted once close() has
    # waited for them, falls inside the window.
    others = OtherLoad()
    workers = [Worker(n, args, case, model, data, cache) for n in names]
    try:
        for w in workers:
            w.ready = w.read("ready")
        for r in range(steps_total):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                w.step()
    finally:
        for w in workers:
            w.close()
    load["end"] = _loadavg()
    load["other_processes_cores"] = round(others.cores(), 2)
    by = {w.name: w for w in workers}
    result = summarise(case, by, args, precompute, n_pairs)
    result.update(data=data_summary, loadavg=load, wall_s=round(time.perf_counter() - t_case, 1))
    return result


def summarise(case: Case, by: dict[str, Worker], args: argparse.Namespace, precompute: dict[str, Any],
              n_pairs: int) -> dict[str, Any]:
    w = args.warmup
    dt = {name: [s["dt"] for s in worker.steps[w:]] for name, worker in by.items()}
    med = {name: stats(v).median for name, v in dt.items()}
    bound_steps = by["bound"].steps[w:]
    bound_padded = stats([s["policy_s"] for s in bound_steps]).median
    bound_unpadded = stats([s["unpadded_s"] for s in bound_steps]).median
    # The bound of a batch is the cheaper of the two plain layouts of its deduplicated tokens: unpadded rows win
    # when pair lengths differ (tiles, long answers), one padded batch wins when they are equal (text).
    bound_policy = stats([min(s["policy_s"], s["unpadded_s"]) for s in bound_steps]).median
    bound_ref = stats([s["ref_s"] for s in bound_steps]).median

    def mem(name: str) -> float:
        worker = by[name]
        return worker.steps[-1]["peak_mb"] - worker.ready["rss_before_mb"]

    def paired(a: str, b: str) -> float:  # median of per-step ratios: each step is the same batch for both
        return stats([x / y for x, y in zip(dt[a], dt[b])]).median

    out: dict[str, Any] = {
        "case": case.name, "mpo_commit": _mpo_commit(), "pairs_per_question": args.pairs_per_question,
        "batch_pairs": BATCH, "measured_steps": args.steps, "warmup_steps": w,
        "mpo_pairs_per_s": BATCH / med["mpo"], "trl_pairs_per_s": BATCH / med["trl"],
        "mpo_step_s": med["mpo"], "trl_step_s": med["trl"],
        "speedup_vs_trl": med["trl"] / med["mpo"], "speedup_vs_trl_paired": paired("trl", "mpo"),
        "mpo_mem_mb": mem("mpo"), "trl_mem_mb": mem("trl"), "mem_ratio_vs_trl": mem("mpo") / mem("trl"),
        "bound_step_s": bound_policy, "bound_padded_step_s": bound_padded, "bound_unpadded_step_s": bound_unpadded,
        "bound_ref_forward_s": bound_ref,
        "step_over_bound_in_loop_ref": med["mpo"] / (bound_policy + bound_ref),
        "step_quartiles_s": {name: stats(v).as_dict() for name, v in dt.items()},
        # Same initial weights, same batches: the first step's loss must agree across frameworks (sanity check).
        "loss_step1": {name: next((s["loss"] for s in worker.steps if s.get("loss_step") == 1), None)
                       for name, worker in by.items() if name != "bound"},
        "mpo_layout": args.layout, "mpo_pack_length": args.pack_length, "mpo_set": args.mpo_set or [],
        "model_dims": {"name": args.dims, **MODEL_DIMS[args.dims]}, "torch_threads": by["trl"].ready["threads"],
    }
    if "mpo_cached" in med:
        steps_per_epoch = n_pairs // BATCH
        precompute_s = precompute["precompute_s"]
        amortised = med["mpo_cached"] + precompute_s / steps_per_epoch
        out.update({
            "mpo_cached_pairs_per_s": BATCH / med["mpo_cached"], "mpo_cached_step_s": med["mpo_cached"],
            "speedup_vs_trl_cached_ref": med["trl"] / med["mpo_cached"],
            "speedup_vs_trl_cached_ref_paired": paired("trl", "mpo_cached"),
            "precompute_s": precompute_s, "steps_per_epoch": steps_per_epoch,
            # where the precompute's time went, against what the in-loop reference adds to an epoch of steps:
            # the epoch target holds when precompute_s <= in_loop_reference_epoch_s
            "precompute_forward_s": precompute["precompute_forward_s"],
            "precompute_waiting_s": precompute["precompute_waiting_s"],
            "in_loop_reference_epoch_s": (med["mpo"] - med["mpo_cached"]) * steps_per_epoch,
            "epoch_speedup_vs_trl_cached_ref": med["trl"] / amortised,
            "mpo_cached_mem_mb": mem("mpo_cached"),
            "step_over_bound": med["mpo_cached"] / bound_policy,
        })
    out["targets"] = check_targets(case, out)
    return out


def _mpo_commit() -> str:
    """The checkout's commit, ``+dirty`` when src/ has uncommitted changes: mpo changes while it is measured."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def check_targets(case: Case, result: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for key, (op, goal) in case.targets.items():
        value = result.get(key)
        limit = result.get(goal) if isinstance(goal, str) else goal
        if value is None or limit is None:
            checks[key] = {"target": f"{op} {goal}", "value": None, "met": None}
            continue
        met = value >= limit if op == ">=" else value <= limit
        checks[key] = {"target": f"{op} {goal}" + (f" ({limit:.2f})" if isinstance(goal, str) else ""),
                       "value": round(value, 3), "met": met}
    return checks


def print_table(r: dict[str, Any]) -> None:
    q = r["step_quartiles_s"]
    print(f"\n== {r['case']}  (batch {r['batch_pairs']} pairs, {r['measured_steps']} steps after {r['warmup_steps']} "
          f"warm-up; load average {r['loadavg']}; data {r['data']})")
    print(f"{'run':<26}{'s/step (q1-q3)':>22}{'pairs/s':>10}{'step mem MB':>13}{'vs TRL':>9}")
    rows = [("trl (ref in loop)", "trl", r["trl_mem_mb"]), ("mpo (ref in loop)", "mpo", r["mpo_mem_mb"])]
    if "mpo_cached" in q:
        rows.append(("mpo (ref cache)", "mpo_cached", r["mpo_cached_mem_mb"]))
    for label, key, mem in rows:
        s = q[key]
        print(f"{label:<26}{s['median_s']:>8.3f} ({s['q1_s']:.3f}-{s['q3_s']:.3f}){r['batch_pairs'] / s['median_s']:>10.2f}"
              f"{mem:>13.0f}{q['trl']['median_s'] / s['median_s']:>9.2f}")
    print(f"bound: policy fwd+bwd+AdamW {r['bound_step_s']:.3f} s (padded batch {r['bound_padded_step_s']:.3f}, "
          f"unpadded rows {r['bound_unpadded_step_s']:.3f}), reference forward {r['bound_ref_forward_s']:.3f} s; "
          f"mpo step / bound: in-loop {r['step_over_bound_in_loop_ref']:.2f}"
          + (f", cached {r['step_over_bound']:.2f}" if "step_over_bound" in r else ""))
    if "precompute_s" in r:
        print(f"precompute {r['precompute_s']:.1f} s for {r['steps_per_epoch']} steps/epoch → epoch speedup "
              f"{r['epoch_speedup_vs_trl_cached_ref']:.2f} (other processes during it: "
              f"{r['loadavg'].get('precompute_other_processes_cores')} cores; "
              f"{r['pairs_per_question']} pair(s) per question): reference forward {r['precompute_forward_s']:.1f} s, "
              f"waiting for batches {r['precompute_waiting_s']:.1f} s; the in-loop reference adds "
              f"{r['in_loop_reference_epoch_s']:.1f} s to an epoch")
    print(f"mem ratio mpo/trl {r['mem_ratio_vs_trl']:.2f}; paired speedup (median of per-step ratios) "
          f"{r['speedup_vs_trl_paired']:.2f}; step-1 losses {r['loss_step1']}")
    for key, c in r["targets"].items():
        verdict = "n/a" if c["met"] is None else ("met" if c["met"] else "MISSED")
        print(f"  target {key} {c['target']}: {c['value']} {verdict}")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), action="append",
                        help="case to run (repeatable); default: all")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case instead of tables")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per framework (>= 20 for the issue)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps before the measured ones")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for models, data, caches and worker logs (kept; reused when it matches); "
                             "default: a temporary folder, removed afterwards")
    parser.add_argument("--dims", choices=list(MODEL_DIMS), default="small",
                        help="model size: small (default, ~10 min for all cases) or baseline (env-notes §3 dims)")
    parser.add_argument("--layout", choices=["shared", "naive"], default="shared", help="mpo train.pair_layout")
    parser.add_argument("--pack-length", type=int, default=0, help="mpo train.pack_length (0: one pair per row)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: torch's default, one per core). With another busy process "
                             "on a 2-core machine, 2 threads stall on each other at every parallel region; 1 does not")
    parser.add_argument("--mpo-set", action="append", metavar="KEY=VALUE",
                        help="extra mpo config override for the mpo runs and the precompute (repeatable), e.g. "
                             "data.prefetch_batches=0")
    parser.add_argument("--pairs-per-question", type=int, default=1, metavar="K",
                        help="K consecutive pairs share question and image (correctness-pipeline data); default 1")
    parser.add_argument("--no-cached", action="store_true", help="skip the reference-cache run and its precompute")
    parser.add_argument("--profile", choices=WORKERS, action="append",
                        help="profile this worker's measured steps (torch.profiler ops + cProfile) into "
                             "<work>/<case>_<worker>.profile.txt; profiling slows it, so its timings are not clean")
    # worker mode (internal)
    parser.add_argument("--worker", choices=[*WORKERS, "precompute"], help=argparse.SUPPRESS)
    parser.add_argument("--ctl", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.case = args.case[0]
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        gate = Gate(args.ctl)
        if args.worker in (args.profile or []):
            attach_profiler(gate, args.work / f"{args.case}_{args.worker}.profile.txt", args.warmup)
        if args.worker == "trl":
            worker_trl(args, gate)
        elif args.worker in ("mpo", "mpo_cached"):
            worker_mpo(args, gate, cached=args.worker == "mpo_cached")
        elif args.worker == "bound":
            worker_bound(args, gate)
        else:
            worker_precompute(args, gate)
        return 0

    os.environ["HF_HUB_OFFLINE"] = "1"
    # A SIGTERM must still run the cleanup below (workers exit on their own once the control pipe closes).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    temporary = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="mpo_bench_train_")) if temporary else args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.case or list(CASES):
            result = run_case(CASES[name], args)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print_table(result)
                sys.stdout.flush()
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
