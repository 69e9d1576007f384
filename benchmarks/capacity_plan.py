#!/usr/bin/env python
"""Capacity plan on paper: parameters, memory, tokens, FLOPs and GPU-hours of InternVL3.5 MPO with mpo.

Every number in ``docs/scale.md`` and the memory tables of ``docs/launch.md`` is printed by this script. The docs
quote the command above each table, and ``tests/train/test_launch_docs.py`` checks that each quoted table is
exactly what the script prints. Nothing here is measured on a GPU: it is arithmetic on the assumptions printed by
``--section assumptions`` (change them here, then ``--write-docs``).

    python benchmarks/capacity_plan.py                        # every section (markdown)
    python benchmarks/capacity_plan.py --section train-hours  # one section
    python benchmarks/capacity_plan.py --write-docs           # rewrite the generated blocks in docs/*.md
    python benchmarks/capacity_plan.py --demo-check           # measured lengths of `mpo data demo` (about 1 min)

Conventions. 1 GB = 1e9 bytes, 1 GiB = 2**30 bytes. "FLOPs" are the useful model FLOPs of the computation
(matmuls + attention scores over the pairs a token may attend to); recomputation for gradient checkpointing,
masked-out attention blocks that a kernel computes anyway, and padding are not counted: they are part of what an
MFU below 100 % pays for. Forward + backward = 3 × forward (backward = 2 × forward).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "launch.md", ROOT / "docs" / "scale.md")

# ----------------------------------------------------------------------------------------------------------------
# Assumptions (every one is printed by --section assumptions)

H100_BF16_PEAK = 989e12       # FLOP/s, H100 SXM5 dense BF16 tensor-core peak (NVIDIA datasheet; 1,979 with sparsity)
H100_HBM_BYTES_S = 3.35e12    # bytes/s, H100 SXM5 HBM3
MFU = (0.40, 0.35)            # assumed model-FLOPs utilisation of training and prefill (best, worst)
DECODE_BW_EFF = 0.7           # assumed share of HBM bandwidth reached by decode kernels
GPU_BUDGET_GIB = 70.0         # usable per H100 80GB: ~90 % of the ~78 GiB it exposes (context, NCCL, fragmentation)
VLLM_MEM_FRACTION = 0.9       # mpo's VLLMSampler passes gpu_memory_utilization=0.9
VLLM_MAX_SEQS = 256           # assumed sequences in flight per vLLM engine (mpo does not set max_num_seqs)
VLLM_WORKSPACE_GIB = 2.0      # assumed activations/workspace per GPU of a vLLM engine
ZERO3_LIVE_PARAMS = 1e9       # configs/deepspeed/zero3.json stage3_max_live_parameters (bf16 gathered weights)
LM_HEAD_CHUNK = 4096          # mpo.train.forward.PairScorer chunk_size (rows of logits at once)
LORA_RANK = 16

TILE_PX, PATCH_PX, DOWNSAMPLE = 448, 14, 0.5
TOKENS_PER_TILE = int((TILE_PX // PATCH_PX) ** 2 * DOWNSAMPLE**2)  # 256: 32x32 patches, pixel shuffle 0.5

MMPR_PAIRS_TOTAL = 3_000_000  # seed README: "approximately 3 million preference pairs"
MMPR_PAIRS_USED = 400_000     # seed README: "only around 400k are utilized during training"
GLOBAL_BATCH = 256            # seed InternVL3.5 scripts (seed_training.md §10.1)

# Correctness pipeline as the seed ran it (seed_datapipelines.md §8): 39 prompt files, ~7000 prompts each,
# 32 samples per prompt, up to 4096 new tokens, tile cap 6 for most files.
GEN_PROMPTS = 39 * 7000
GEN_SAMPLES = 32
GEN_MAX_NEW = 4096
GEN_MEAN_NEW = 1000           # assumed mean generated length (the cap 4096 is the worst case, also printed)
GEN_TILES = 6 + 1             # --max-num 6 plus the thumbnail
GEN_QUESTION_TOKENS = 150     # assumed: question + the en_v2 answer-format instruction + chat template


@dataclass(frozen=True)
class PairShape:
    """Token counts of one preference pair (all assumptions but the image tokens, which follow from the tiling)."""

    name: str
    tiles: int                # tiles incl. thumbnail (0 = text-only)
    question: int = 100       # system/chat template + question text
    chosen: int = 400         # chosen answer + <|im_end|>
    rejected: int = 400       # rejected answer + <|im_end|>

    @property
    def image_tokens(self) -> int:
        return self.tiles * TOKENS_PER_TILE + 2 if self.tiles else 0  # + <img> and </img>

    @property
    def prompt(self) -> int:
        return self.question + self.image_tokens

    @property
    def shared_tokens(self) -> int:  # mpo's shared layout: [prompt, chosen, rejected]
        return self.prompt + self.chosen + self.rejected

    @property
    def naive_tokens(self) -> int:  # TRL / InternVL: [prompt, chosen] and [prompt, rejected]
        return 2 * self.prompt + self.chosen + self.rejected


SHAPES = (
    PairShape("cap: 1 image at the seed's cap, 12 tiles + thumbnail", tiles=13),
    PairShape("light: 1 image, 6 tiles + thumbnail", tiles=7),
    PairShape("text-only row", tiles=0),
)
MAIN = SHAPES[0]  # the plan uses the cap (conservative: every image reaches max_dynamic_patch 12)

# ----------------------------------------------------------------------------------------------------------------
# Architectures (assumptions, cross-checked against InternVL's published sizes and, in the tests, against
# transformers' own InternVL/Qwen3 modules built on the meta device)


@dataclass(frozen=True)
class ViT:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    qkv_bias: bool
    qk_norm: bool
    rms_norm: bool

    @property
    def seq(self) -> int:
        return (TILE_PX // PATCH_PX) ** 2 + 1  # patches + CLS

    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        norm = h if self.rms_norm else 2 * h
        embed = 3 * PATCH_PX**2 * h + h + h + self.seq * h  # patch conv (+ bias), CLS, positions
        attn = 4 * h * h + (3 * h if self.qkv_bias else 0) + h + (2 * h if self.qk_norm else 0)
        layer = attn + 2 * h * i + i + h + 2 * norm + 2 * h  # + MLP, two norms, two layer-scale vectors
        return embed + self.layers * layer

    def matmul_params(self) -> int:
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    def layer_act_elems(self) -> int:
        return 10 * self.hidden + 4 * self.intermediate


@dataclass(frozen=True)
class LLM:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151936
    tied: bool = False
    experts: int = 0
    active_experts: int = 0
    expert_intermediate: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def _attn(self) -> int:
        return 2 * self.hidden * (self.q_dim + self.kv_dim)

    def _mlp(self, active: bool) -> int:
        h = self.hidden
        if not self.experts:
            return 3 * h * self.intermediate
        n = self.active_experts if active else self.experts
        return n * 3 * h * self.expert_intermediate + h * self.experts  # router always runs

    def params(self, active: bool = False) -> int:
        h = self.hidden
        layer = self._attn() + 2 * self.head_dim + self._mlp(active) + 2 * h  # + q/k norms, two RMSNorms
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def body_matmul(self) -> int:
        """Weights each token multiplies, per token (active experts only), without embeddings and LM head."""
        return self.layers * (self._attn() + self._mlp(active=True))

    @property
    def head(self) -> int:
        return self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * 2  # K and V, bf16

    def layer_act_elems(self) -> int:
        """Elements per token one decoder layer keeps for backward (norm inputs, q/k/v, attention out, SwiGLU)."""
        inter = self.intermediate if not self.experts else self.active_experts * self.expert_intermediate
        return 4 * self.hidden + 3 * self.q_dim + 3 * self.kv_dim + 4 * inter

    def lora_params(self, r: int) -> int:
        """LoRA on q/k/v/o (+ gate/up/down of a dense MLP; fused MoE experts are not nn.Linear, so not matched)."""
        h = self.hidden
        attn = r * ((h + self.q_dim) * 2 + (h + self.kv_dim) * 2)
        mlp = 0 if self.experts else r * 3 * (h + self.intermediate)
        return self.layers * (attn + mlp)


VIT_300M = ViT("InternViT-300M", 24, 1024, 4096, 16, qkv_bias=True, qk_norm=False, rms_norm=False)
VIT_6B = ViT("InternViT-6B", 45, 3200, 12800, 25, qkv_bias=False, qk_norm=True, rms_norm=True)


@dataclass(frozen=True)
class VLM:
    key: str
    name: str
    vit: ViT
    llm: LLM
    published: tuple[str, str, str]  # vision, language, total as InternVL's docs print them

    def projector(self) -> int:
        d, h = 4 * self.vit.hidden, self.llm.hidden
        return 2 * d + d * h + h + h * h + h

    def projector_matmul(self) -> int:
        d, h = 4 * self.vit.hidden, self.llm.hidden
        return d * h + h * h

    def vision(self) -> int:
        return self.vit.params() + self.projector()

    def total(self) -> int:
        return self.vision() + self.llm.params()

    def active(self) -> int:
        return self.vision() + self.llm.params(active=True)


MODELS = (
    VLM("1b", "InternVL3.5-1B", VIT_300M, LLM("Qwen3-0.6B", 28, 1024, 3072, 16, 8), ("0.3B", "0.8B", "1.1B")),
    VLM("2b", "InternVL3.5-2B", VIT_300M, LLM("Qwen3-1.7B", 28, 2048, 6144, 16, 8), ("0.3B", "2.0B", "2.3B")),
    VLM("4b", "InternVL3.5-4B", VIT_300M, LLM("Qwen3-4B", 36, 2560, 9728, 32, 8), ("0.3B", "4.4B", "4.7B")),
    VLM("8b", "InternVL3.5-8B", VIT_300M, LLM("Qwen3-8B", 36, 4096, 12288, 32, 8), ("0.3B", "8.2B", "8.5B")),
    VLM("14b", "InternVL3.5-14B", VIT_300M, LLM("Qwen3-14B", 40, 5120, 17408, 40, 8), ("0.3B", "14.8B", "15.1B")),
    VLM("38b", "InternVL3.5-38B", VIT_6B, LLM("Qwen3-32B", 64, 5120, 25600, 64, 8), ("5.5B", "32.8B", "38.4B")),
    VLM("30b_a3b", "InternVL3.5-30B-A3B", VIT_300M,
        LLM("Qwen3-30B-A3B", 48, 2048, 0, 32, 4, experts=128, active_experts=8, expert_intermediate=768),
        ("0.3B", "30.5B", "30.8B-A3B")),
    VLM("241b_a28b", "InternVL3.5-241B-A28B", VIT_6B,
        LLM("Qwen3-235B-A22B", 94, 4096, 0, 64, 4, experts=128, active_experts=8, expert_intermediate=1536),
        ("5.5B", "235.1B", "240.7B-A28B")),
)
BY_KEY = {m.key: m for m in MODELS}


def model(key: str) -> VLM:
    return BY_KEY[key]

# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def shared_pairs(s: PairShape) -> int:
    """(query, key) pairs the shared layout lets attend: the prompt causally, each answer to prompt + itself."""
    p = s.prompt
    return causal_pairs(p) + s.chosen * p + causal_pairs(s.chosen) + s.rejected * p + causal_pairs(s.rejected)


def llm_fwd(m: VLM, tokens: int, attn_pairs: int, head_rows: int) -> float:
    llm = m.llm
    return 2.0 * llm.body_matmul() * tokens + 4.0 * llm.layers * llm.q_dim * attn_pairs + 2.0 * llm.head * head_rows


def vision_fwd(m: VLM, tiles: int) -> float:
    v = m.vit
    per_tile = (2.0 * v.matmul_params() * v.seq + 4.0 * v.layers * v.hidden * v.seq**2
                + 2.0 * m.projector_matmul() * TOKENS_PER_TILE)
    return tiles * per_tile


def pair_flops(m: VLM, s: PairShape, recipe: str) -> dict[str, float]:
    """FLOPs per pair by part.

    Multi-GPU presets (the vision tower trains, as in the seed: 3 x forward): ``naive`` (TRL / InternVL: two
    sequences, logits everywhere, vision 4x), ``shared_ref`` (mpo shared layout, reference in the loop: vision once
    per pair per model), ``shared_cache`` (reference cached; its one-time cost is reported apart as
    ``precompute``). One GPU: ``lora_ref`` / ``lora_cache`` (frozen base: forward + activation gradients = 2 x
    forward, vision forward only; the in-loop reference is the policy with adapters off, vision included) and
    ``frozen_ref`` / ``frozen_cache`` (full LLM fine-tuning, vision + projector frozen: the in-loop reference
    reuses the policy's image features).
    """
    vis = vision_fwd(m, s.tiles)
    if recipe == "naive":
        seqs = (s.prompt + s.chosen, s.prompt + s.rejected)
        fwd = sum(llm_fwd(m, n, causal_pairs(n), n) for n in seqs)  # logits at every position
        return {"policy LLM": 3 * fwd, "policy vision": 3 * 2 * vis, "reference LLM": fwd, "reference vision": 2 * vis}
    fwd = llm_fwd(m, s.shared_tokens, shared_pairs(s), s.chosen + s.rejected)  # logits at answer positions only
    llm_factor, vis_factor, ref_vis = {"shared": (3, 3, vis), "lora": (2, 1, vis), "frozen": (3, 1, 0.0)}[
        recipe.split("_")[0]]
    out = {"policy LLM": llm_factor * fwd, "policy vision": vis_factor * vis}
    if recipe.endswith("_ref"):
        out.update({"reference LLM": fwd, "reference vision": ref_vis})
    elif recipe.endswith("_cache"):
        out.update({"reference LLM": 0.0, "reference vision": 0.0, "precompute": fwd + vis})
    else:
        raise ValueError(recipe)
    return out


def train_total(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if k != "precompute")


def gpu_hours(flops: float, mfu: float) -> float:
    return flops / (H100_BF16_PEAK * mfu) / 3600


def hours_range(flops: float) -> str:
    return f"{gpu_hours(flops, MFU[0]):,.0f}–{gpu_hours(flops, MFU[1]):,.0f}"

# ----------------------------------------------------------------------------------------------------------------
# Memory


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def act_bytes(m: VLM, tokens: int) -> float:
    """Gradient checkpointing on every decoder layer: each layer's bf16 input is kept, plus one layer's
    activations and their gradients while it is recomputed in backward."""
    llm = m.llm
    return tokens * (llm.layers * llm.hidden * 2 + 2 * llm.layer_act_elems() * 2)


def vit_act_bytes(m: VLM, tiles: int) -> float:
    v = m.vit
    return tiles * v.seq * (v.layers * v.hidden * 2 + 2 * v.layer_act_elems() * 2)


def head_bytes(m: VLM, answer_tokens: int) -> float:
    """Logits only at answer positions, in chunks: bf16 logits, their fp32 copy and both gradients (~12 B)."""
    return min(answer_tokens, LM_HEAD_CHUNK) * m.llm.vocab * 12


def mask_bytes(s: PairShape) -> float:
    """Shared layout with SDPA: the pair attention's only mask is the rejected call's bool (n_r, n_p + n_r) one."""
    return float(s.rejected * (s.prompt + s.rejected))


ZERO2_BUCKETS = 2 * 1e9 * 2  # configs/deepspeed/zero2.json: reduce + allgather buckets of 1e9 bf16 elements


@dataclass
class SingleGPU:
    lora_total: float
    full_total_cached: float
    full_total_ref: float


def single_gpu(m: VLM, s: PairShape) -> SingleGPU:
    """One GPU, one pair of ``s``. LoRA: bf16 base, fp32 adapters (PEFT), reference = adapters off (no memory).
    Full FT of the LLM with vision + projector frozen, DeepSpeed ZeRO-2 on one process (bf16 weights and
    gradients, fp32 master weights and Adam moments: 2 + 2 + 12 B per trainable parameter, 2 B per frozen one,
    plus zero2.json's buckets); the in-loop reference is a bf16 copy."""
    t, a = s.shared_tokens, s.chosen + s.rejected
    transient = act_bytes(m, t) + head_bytes(m, a) + mask_bytes(s)
    lora_total = 2 * m.total() + m.llm.lora_params(LORA_RANK) * 16 + transient
    full = 2 * m.total() + (2 + 12) * m.llm.params() + ZERO2_BUCKETS + transient
    return SingleGPU(lora_total, full, full + 2 * m.total())


def sharded_per_gpu(m: VLM, s: PairShape, gpus: int, reference: bool) -> float:
    """Presets (everything trains, bf16 weights + fp32 master/Adam = 16 B per parameter) sharded over ``gpus``
    (ZeRO-3 or FSDP2); under ZeRO-3 mpo's in-loop reference is its own ZeRO-3 engine: bf16 weights sharded too,
    plus its live gathered parameters."""
    t, a = s.shared_tokens, s.chosen + s.rejected
    per = 16 * m.total() / gpus + 2 * ZERO3_LIVE_PARAMS
    per += act_bytes(m, t) + vit_act_bytes(m, s.tiles) + head_bytes(m, a) + mask_bytes(s)
    return per + (2 * m.total() / gpus + 2 * ZERO3_LIVE_PARAMS if reference else 0)


def min_gpus(m: VLM, s: PairShape, reference: bool) -> str:
    for g in (8, 16, 32, 64, 128, 256, 512):
        if gib(sharded_per_gpu(m, s, g, reference)) <= GPU_BUDGET_GIB:
            return str(g)
    return "none"


def precompute_fits(m: VLM, s: PairShape) -> bool:
    """mpo precompute-ref loads the whole bf16 model on each GPU and runs it without grad."""
    no_grad = s.shared_tokens * 2 * m.llm.layer_act_elems() * 2 + head_bytes(m, s.chosen + s.rejected) / 2
    return gib(2 * m.total() + no_grad + mask_bytes(s)) <= GPU_BUDGET_GIB

# ----------------------------------------------------------------------------------------------------------------
# Generation (correctness pipeline)


def suggested_tp(m: VLM) -> int:
    """Smallest TP whose GPUs hold the bf16 weights in half their vLLM memory (the other half for KV cache)."""
    for tp in (1, 2, 4, 8, 16):
        if 2 * m.total() <= 0.5 * tp * VLLM_MEM_FRACTION * 80e9:
            return tp
    return 32


@dataclass
class Decode:
    tp: int
    batch: int
    tokens_per_s_gpu: float
    bound: str


def decode_rate(m: VLM, prompt: int, mean_new: int, shared_prompt: bool) -> Decode:
    """Roofline of one engine (TP GPUs) decoding: each step reads the weights once and every sequence's whole
    context KV; ``shared_prompt``: the n samples of a prompt share its KV blocks in memory (vLLM n>1)."""
    tp, llm = suggested_tp(m), m.llm
    weights = 2 * m.total()
    ctx = prompt + mean_new / 2
    room = tp * (VLLM_MEM_FRACTION * 80e9 - VLLM_WORKSPACE_GIB * 2**30) - weights
    per_seq = (mean_new / 2 + (prompt / GEN_SAMPLES if shared_prompt else prompt)) * llm.kv_bytes_per_token
    batch = max(1, min(VLLM_MAX_SEQS, int(room // per_seq)))
    flops_tok = 2.0 * (llm.body_matmul() + llm.head) + 4.0 * llm.layers * llm.q_dim * ctx
    t_mem = (weights + batch * ctx * llm.kv_bytes_per_token) / (tp * H100_HBM_BYTES_S * DECODE_BW_EFF)
    t_flop = batch * flops_tok / (tp * H100_BF16_PEAK * MFU[0])
    step = max(t_mem, t_flop)
    return Decode(tp, batch, batch / step / tp, "memory" if t_mem >= t_flop else "compute")


def generation(m: VLM, mean_new: int, shared_prompt: bool) -> dict[str, float]:
    prompt = GEN_QUESTION_TOKENS + GEN_TILES * TOKENS_PER_TILE + 2
    prefill = vision_fwd(m, GEN_TILES) + llm_fwd(m, prompt, causal_pairs(prompt), 1)
    prefills = GEN_PROMPTS * (1 if shared_prompt else GEN_SAMPLES)
    new_tokens = GEN_PROMPTS * GEN_SAMPLES * mean_new
    llm = m.llm
    decode_flops = new_tokens * (2.0 * (llm.body_matmul() + llm.head) + 4.0 * llm.layers * llm.q_dim
                                 * (prompt + mean_new / 2))
    rate = decode_rate(m, prompt, mean_new, shared_prompt)
    return {"prompt": prompt, "prefill_flops": prefills * prefill, "decode_flops": decode_flops,
            "new_tokens": new_tokens, "tp": rate.tp, "batch": rate.batch, "tok_s_gpu": rate.tokens_per_s_gpu,
            "bound": rate.bound, "prefill_h": gpu_hours(prefills * prefill, MFU[0]),
            "decode_h": new_tokens / rate.tokens_per_s_gpu / 3600}

# ----------------------------------------------------------------------------------------------------------------
# Sections (each returns markdown)


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}"


def sec_assumptions() -> str:
    rows = [
        ["H100 SXM5 BF16 dense peak", f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s", "NVIDIA datasheet (no sparsity)"],
        ["H100 SXM5 HBM bandwidth", f"{H100_HBM_BYTES_S / 1e12:.2f} TB/s", "NVIDIA datasheet"],
        ["MFU (training, prefill)", f"{MFU[0]:.0%} best, {MFU[1]:.0%} worst", "assumption; not measured for mpo"],
        ["decode bandwidth efficiency", f"{DECODE_BW_EFF:.0%}", "assumption"],
        ["usable memory per H100 80GB", f"{GPU_BUDGET_GIB:.0f} GiB", "assumption (~90 % of ~78 GiB)"],
        ["image tokens per 448 px tile", f"{TOKENS_PER_TILE}", "(448/14)² patches × 0.5² pixel shuffle (seed)"],
        ["tiles per image (plan)", f"{MAIN.tiles}", "seed cap: max_dynamic_patch 12 + thumbnail"],
        ["question tokens (incl. template)", f"{MAIN.question}", "assumption"],
        ["chosen / rejected tokens", f"{MAIN.chosen} / {MAIN.rejected}", "assumption (answer + <|im_end|>)"],
        ["MMPR pairs: total / used", f"{MMPR_PAIRS_TOTAL:,} / {MMPR_PAIRS_USED:,}", "seed README"],
        ["global batch", f"{GLOBAL_BATCH}", "seed InternVL3.5 scripts"],
        ["LoRA rank (memory table)", f"{LORA_RANK}", "example value"],
        ["correctness prompts", f"{GEN_PROMPTS:,}", "seed: 39 files × ~7000 prompts"],
        ["samples per prompt / max new tokens", f"{GEN_SAMPLES} / {GEN_MAX_NEW}", "seed"],
        ["mean generated tokens", f"{GEN_MEAN_NEW}", "assumption (cap also shown)"],
        ["generation tiles / question tokens", f"{GEN_TILES} / {GEN_QUESTION_TOKENS}", "seed --max-num 6 / assumption"],
        ["vLLM sequences in flight per engine", f"{VLLM_MAX_SEQS}", "assumption"],
    ]
    return _table(["quantity", "value", "source"], rows)


def sec_models() -> str:
    rows = []
    for m in MODELS:
        active = f"{_b(m.active())}" if m.llm.experts else "= total"
        rows.append([m.name, f"{m.vit.name} + {m.llm.name}", _b(m.vit.params()), f"{m.projector() / 1e6:.1f}",
                     _b(m.llm.params()), _b(m.total()), active, " / ".join(m.published)])
    return _table(["model", "assumed parts", "ViT (B)", "projector (M)", "LLM (B)", "total (B)", "active (B)",
                   "InternVL docs: vision / language / total"], rows)


def sec_tokens() -> str:
    rows = []
    for s in SHAPES:
        rows.append([s.name, f"{s.image_tokens:,}", f"{s.prompt:,}", f"{s.chosen} + {s.rejected}",
                     f"{s.naive_tokens:,}", f"{s.shared_tokens:,}", f"{s.naive_tokens / s.shared_tokens:.2f}×"])
    return _table(["pair", "image tokens", "prompt tokens", "answers", "naive: tokens (2 sequences)",
                   "shared: tokens (1 segment)", "ratio"], rows)


def sec_memory() -> str:
    s = MAIN
    rows = []
    for m in MODELS:
        llm = m.llm.params()
        rows.append([m.name, f"{gib(2 * m.total()):.1f}", f"{gib(m.llm.lora_params(LORA_RANK) * 16):.2f}",
                     f"{gib(2 * llm):.1f}", f"{gib(12 * llm):.1f}", f"{gib(act_bytes(m, 1000)):.2f}",
                     f"{gib(head_bytes(m, 1000)):.2f}"])
    comp = _table(["model", "weights bf16 (= in-loop reference copy)", f"LoRA r={LORA_RANK}: weights + grads + Adam, fp32",
                   "full FT: grads bf16 (LLM)", "full FT: fp32 master + Adam m, v (LLM)",
                   "activations per 1k tokens", "LM head per 1k answer tokens"], rows)
    rows = []
    for m in MODELS:
        g = single_gpu(m, s)
        fit = lambda x: f"{gib(x):.1f}" + ("" if gib(x) <= GPU_BUDGET_GIB else " ✗")  # noqa: E731
        rows.append([m.name, fit(g.lora_total), fit(g.full_total_cached), fit(g.full_total_ref)])
    tot = _table(["model", "LoRA (reference = adapters off)", "full FT, frozen vision, ref cache",
                  "full FT, frozen vision, ref in the loop"], rows)
    return (f"Components (GiB):\n\n{comp}\n\nPeak on one GPU for one pair of {s.shared_tokens:,} tokens in the shared "
            f"layout ({s.name}), GiB; ✗ = over {GPU_BUDGET_GIB:.0f} GiB. Full FT adds zero2.json's buckets "
            f"({gib(ZERO2_BUCKETS):.1f} GiB):\n\n{tot}")


def sec_memory_sharded() -> str:
    s = MAIN
    rows = []
    for m in MODELS:
        rows.append([m.name, f"{gib(sharded_per_gpu(m, s, 8, False)):.1f}", f"{gib(sharded_per_gpu(m, s, 8, True)):.1f}",
                     min_gpus(m, s, False), min_gpus(m, s, True), "yes" if precompute_fits(m, s) else "no"])
    return _table(["model", "8 GPUs, ref cache (GiB/GPU)", "8 GPUs, ref in the loop (GiB/GPU)",
                   "min GPUs, ref cache", "min GPUs, ref in the loop", "precompute-ref fits one GPU"], rows)


def sec_flops() -> str:
    m, s = model("8b"), MAIN
    recipes = [("naive", "naive (TRL / InternVL)"), ("shared_ref", "mpo shared, ref in the loop"),
               ("shared_cache", "mpo shared, ref cached")]
    parts = {r: pair_flops(m, s, r) for r, _ in recipes}
    keys = ["policy LLM", "policy vision", "reference LLM", "reference vision"]
    rows = [[k] + [f"{parts[r][k] / 1e12:.1f}" for r, _ in recipes] for k in keys]
    rows.append(["**total per pair (training)**"] + [f"**{train_total(parts[r]) / 1e12:.1f}**" for r, _ in recipes])
    rows.append(["one-time reference precompute"] + ["–", "–", f"{parts['shared_cache']['precompute'] / 1e12:.1f}"])
    naive = train_total(parts["naive"])
    rows.append(["speed-up vs naive (FLOPs)"] + [f"{naive / train_total(parts[r]):.2f}×" for r, _ in recipes])
    useful = 4.0 * m.llm.layers * m.llm.q_dim * shared_pairs(s)
    head = s.prompt + s.chosen
    computed = 4.0 * m.llm.layers * m.llm.q_dim * (causal_pairs(head) + s.rejected * (s.prompt + s.rejected))
    dense = 4.0 * m.llm.layers * m.llm.q_dim * s.shared_tokens**2
    note = (f"Attention is {3 * useful / train_total(parts['shared_cache']):.1%} of the cached recipe's FLOPs. mpo's "
            f"pair attention runs prompt + chosen on the causal kernel and the rejected answer against [prompt, "
            f"rejected] with a small mask: {computed / useful:.2f}× the useful scores (a dense (L, L) block mask: "
            f"{dense / useful:.2f}×).")
    return f"{m.name}, {s.name}; TFLOPs per pair:\n\n" + _table(["part"] + [n for _, n in recipes], rows) + \
        f"\n\n{note}"


def sec_train_hours() -> str:
    s = MAIN
    rows = []
    for m in MODELS:
        naive = MMPR_PAIRS_USED * train_total(pair_flops(m, s, "naive"))
        ref = MMPR_PAIRS_USED * train_total(pair_flops(m, s, "shared_ref"))
        cache = pair_flops(m, s, "shared_cache")
        fast, pre = MMPR_PAIRS_USED * train_total(cache), MMPR_PAIRS_USED * cache["precompute"]
        rows.append([m.name, f"{naive / 1e18:,.0f}", hours_range(naive), hours_range(ref), hours_range(fast),
                     hours_range(pre), f"{naive / fast:.2f}×"])
    table = _table(["model", "naive EFLOPs", "naive GPU-h", "mpo shared + ref in loop GPU-h",
                    "mpo shared + ref cache GPU-h", "+ one-time precompute GPU-h", "naive / cached"], rows)
    m = model("8b")
    naive1, fast1 = train_total(pair_flops(m, s, "naive")), train_total(pair_flops(m, s, "shared_cache"))
    pre1 = pair_flops(m, s, "shared_cache")["precompute"]
    steps = math.ceil(MMPR_PAIRS_USED / GLOBAL_BATCH)
    wall = []
    for gpus in (8, 64, 256):
        wall.append([str(gpus), f"{gpu_hours(MMPR_PAIRS_USED * naive1, MFU[0]) / gpus:,.1f}",
                     f"{gpu_hours(MMPR_PAIRS_USED * (fast1 + pre1), MFU[0]) / gpus:,.1f}"])
    all_pairs = [["all ~3 M MMPR pairs, 8B", hours_range(MMPR_PAIRS_TOTAL * naive1),
                  hours_range(MMPR_PAIRS_TOTAL * (fast1 + pre1))]]
    single = []
    for key, kind, label in (("8b", "lora", "InternVL3.5-8B, LoRA"), ("2b", "frozen", "InternVL3.5-2B, full FT, frozen vision")):
        mm = model(key)
        ref = MMPR_PAIRS_USED * train_total(pair_flops(mm, s, f"{kind}_ref"))
        cache = pair_flops(mm, s, f"{kind}_cache")
        single.append([label, hours_range(ref), hours_range(MMPR_PAIRS_USED * train_total(cache)),
                       hours_range(MMPR_PAIRS_USED * cache["precompute"])])
    shapes = []
    for sh in SHAPES:
        n_, c_ = train_total(pair_flops(m, sh, "naive")), pair_flops(m, sh, "shared_cache")
        shapes.append([sh.name, hours_range(MMPR_PAIRS_USED * n_), hours_range(MMPR_PAIRS_USED * train_total(c_)),
                       hours_range(MMPR_PAIRS_USED * c_["precompute"]), f"{n_ / train_total(c_):.2f}×"])
    return (f"{MMPR_PAIRS_USED:,} pairs ({steps:,} optimizer steps of {GLOBAL_BATCH}), {s.name}, H100 at "
            f"{MFU[0]:.0%}–{MFU[1]:.0%} MFU (GPU-hours: best–worst):\n\n{table}\n\n"
            f"InternVL3.5-8B wall-clock hours at {MFU[0]:.0%} MFU (training; cached = training + precompute):\n\n"
            + _table(["H100s", "naive", "mpo shared + ref cache"], wall) + "\n\n"
            + _table(["scale-up", "naive GPU-h", "mpo shared + ref cache (incl. precompute) GPU-h"], all_pairs)
            + f"\n\nInternVL3.5-8B, {MMPR_PAIRS_USED:,} pairs if every pair had one shape (GPU-h, best–worst):\n\n"
            + _table(["pair shape", "naive", "mpo shared + ref cache", "+ one-time precompute", "naive / cached"],
                     shapes)
            + f"\n\nOne H100, {MMPR_PAIRS_USED:,} pairs (hours, best–worst; gradient-checkpoint recompute not counted):\n\n"
            + _table(["single-GPU recipe", "reference in the loop", "reference cached", "+ one-time precompute"],
                     single))


def sec_generate() -> str:
    m = model("8b")
    rows = []
    for label, mean_new in (("mean", GEN_MEAN_NEW), ("cap", GEN_MAX_NEW)):
        for style, shared in (("seed: 32 calls of n=1", False), ("mpo vLLM: one call n=32", True)):
            g = generation(m, mean_new, shared)
            rows.append([f"{style}, {mean_new} new tokens ({label})", f"{g['prefill_flops'] / 1e18:,.1f}",
                         f"{g['prefill_h']:,.0f}", f"{g['new_tokens'] / 1e9:,.2f}", f"{g['batch']}",
                         f"{g['tok_s_gpu']:,.0f} ({g['bound']})", f"{g['decode_h']:,.0f}",
                         f"{g['prefill_h'] + g['decode_h']:,.0f}"])
    g = generation(m, GEN_MEAN_NEW, True)
    head = (f"{m.name}, {GEN_PROMPTS:,} prompts × {GEN_SAMPLES} samples, prompt {g['prompt']:,} tokens "
            f"({GEN_TILES} tiles + {GEN_QUESTION_TOKENS} text), TP {g['tp']}:\n\n")
    t1 = _table(["sampling", "prefill EFLOPs", "prefill GPU-h", "new tokens (B)", "sequences in flight",
                 "decode tokens/s per GPU", "decode GPU-h", "total GPU-h"], rows)
    rows = []
    for mm in MODELS:
        gg = generation(mm, GEN_MEAN_NEW, True)
        rows.append([mm.name, str(gg["tp"]), f"{gg['batch']}", f"{gg['tok_s_gpu']:,.0f}",
                     f"{gg['prefill_h'] + gg['decode_h']:,.0f}"])
    t2 = _table(["model", "suggested --tp", "sequences in flight", "decode tokens/s per GPU",
                 "correctness GPU-h (vLLM n=32, mean length)"], rows)
    wall = (f"On 256 H100s (the seed's sampling job size) the 8B run with vLLM n=32 and mean-length answers takes "
            f"about {(g['prefill_h'] + g['decode_h']) / 256:.1f} hours of wall clock.")
    return head + t1 + "\n\n" + wall + "\n\nPer size (same prompts and assumptions):\n\n" + t2


def sec_figures() -> str:
    """Derived figures the docs quote in their text (so that no number there is worked out by hand)."""
    m8, m30 = model("8b"), model("30b_a3b")
    seed = generation(m8, GEN_MEAN_NEW, shared_prompt=False)
    vllm = generation(m8, GEN_MEAN_NEW, shared_prompt=True)
    seed_total, vllm_total = seed["prefill_h"] + seed["decode_h"], vllm["prefill_h"] + vllm["decode_h"]
    prompt = vllm["prompt"]
    rows = [
        ["executed share of peak at 40% MFU with gradient checkpointing (4 forwards per 3 counted)",
         f"{MFU[0] * 4 / 3:.0%}"],
        ["InternVL3.5-30B-A3B: language model's active parameters",
         f"{m30.llm.params(active=True) / 1e9:.2f}B"],
        ["InternVL3.5-8B bf16 weights (each ZeRO-3 rank holds 1/N of them, reference included)",
         f"{2 * m8.total() / 1e9:.1f} GB"],
        ["eager attention's block mask for one 16,384-token row (SDPA's pair attention builds none)",
         f"{gib(16384**2) * 1024:.0f} MiB"],
        ["8B correctness sampling: prefill GPU-h saved by n=32 (seed-style − vLLM)",
         f"{seed['prefill_h'] - vllm['prefill_h']:,.0f}"],
        ["8B correctness sampling: total GPU-h saved by n=32, share of the seed-style total",
         f"{seed_total - vllm_total:,.0f} ({(seed_total - vllm_total) / seed_total:.0%})"],
        ["mean decode context at the mean length (prompt + half the answer)", f"{prompt + GEN_MEAN_NEW // 2:,} tokens"],
    ]
    return _table(["figure", "value"], rows)


SECTIONS = {
    "assumptions": sec_assumptions,
    "models": sec_models,
    "tokens": sec_tokens,
    "memory": sec_memory,
    "memory-sharded": sec_memory_sharded,
    "flops": sec_flops,
    "train-hours": sec_train_hours,
    "generate": sec_generate,
    "figures": sec_figures,
}


def render(section: str) -> str:
    return SECTIONS[section]().rstrip() + "\n"

# ----------------------------------------------------------------------------------------------------------------
# Docs and the measured demo lengths

BLOCK = re.compile(r"(<!-- capacity_plan:begin (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- capacity_plan:end (?P=name) -->)",
                   re.S)


def write_docs() -> list[str]:
    changed = []
    for path in DOCS:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = BLOCK.sub(lambda mt: mt.group(1) + (render(mt.group("name")) if mt.group("name") in SECTIONS
                                                  else mt.group("body")) + mt.group(4), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(str(path.relative_to(ROOT)))
    return changed


def demo_check() -> str:
    """Run `mpo data demo`, `mpo models tiny --arch internvl` and `mpo data check --json`; tabulate the lengths."""
    mpo = [sys.executable, "-m", "mpo.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        d, mdl = Path(tmp) / "d", Path(tmp) / "m"
        subprocess.run([*mpo, "data", "demo", str(d)], check=True, capture_output=True)
        subprocess.run([*mpo, "models", "tiny", str(mdl), "--arch", "internvl"], check=True, capture_output=True)
        out = subprocess.run([*mpo, "data", "check", str(d / "meta.json"), "--model", str(mdl), "--json"],
                             check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    rows = [[ds["name"], str(ds["usable"]), ", ".join(f"{k} {v}" for k, v in ds["modalities"].items()),
             str(ds["lengths"]["p50"]), str(ds["lengths"]["p95"]), str(ds["lengths"]["max"])]
            for ds in report["datasets"]]
    return _table(["demo dataset", "pairs", "rows", "p50 tokens", "p95 tokens", "max"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), action="append", help="print only these sections")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the generated blocks in docs/launch.md, scale.md")
    ap.add_argument("--demo-check", action="store_true", help="measure the demo's token lengths (runs mpo, ~1 min)")
    args = ap.parse_args(argv)
    if args.write_docs:
        changed = write_docs()
        print("updated: " + (", ".join(changed) if changed else "nothing (already current)"))
        return 0
    if args.demo_check:
        print(demo_check(), end="")
        return 0
    for name in args.section or list(SECTIONS):
        if not args.section or len(args.section) > 1:
            print(f"## {name}\n")
        print(render(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
