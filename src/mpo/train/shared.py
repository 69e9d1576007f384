"""The shared pair layout: each prompt (and its image tokens) computed once per pair, pairs packed without padding.

One pair is one segment ``[prompt, chosen, rejected]``. Positions restart after the prompt for the rejected
answer, and a block mask keeps the rejected tokens from seeing the chosen ones, so every answer token sees exactly
what it sees in the plain two-sequence layout: the log-probs are the same (tested to 1e-5 in fp32), while the
prompt — usually hundreds to thousands of image tokens — goes through the model once instead of twice::

    tokens    p0 p1 p2 | c0 c1 | r0 r1 r2 ‖ p0' p1' | c0' | r0' r1'     (two pairs packed in one row)
    position   0  1  2 |  3  4 |  3  4  5 ‖  0   1  |  2  |  2   3
    r1 sees   p0 p1 p2 |   -   | r0 r1    ‖                            (never c*, never the other pair)

The first token of each answer is predicted from the last prompt position, so that hidden state is gathered
twice (once per answer); the gradient of both flows back into the shared prompt.

With SDPA (the default) all pairs of a micro-batch go back to back into one row with no padding, and the pair
attention (``mpo.train.attention``) keeps them apart without any (L, L) mask: per pair, ``prompt + chosen`` runs
on SDPA's causal fast path and the rejected queries attend to ``[prompt, rejected]``.

With eager attention, pairs are packed first-fit-decreasing into rows of at most ``pack_length`` tokens (a pair
is never split across rows) under a block-diagonal mask. Eager *adds* the mask to the scores, so it gets the
additive float form (a boolean mask there is silently wrong).

Image inputs follow the order in which image tokens appear in the rows (row-major), which is the order in which
InternVL and Qwen-VL scatter image features into the sequence, so each pair's images are encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpo.train.attention import PAIR_ATTENTION, PairSpans
from mpo.train.batch import TOKEN_ALIGNED_KEYS, PairBatch, _concat_image_inputs

__all__ = ["collate_shared", "pack_pairs", "mrope_positions", "SUPPORTED_ATTENTION"]

SUPPORTED_ATTENTION = ("sdpa", "eager", PAIR_ATTENTION)


def pack_pairs(lengths: Sequence[int], pack_length: int | None) -> list[list[int]]:
    """First-fit-decreasing bins of pair indices; a pair longer than ``pack_length`` gets a row of its own."""
    if not pack_length:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(pack_length - lengths[i])
    return [sorted(r) for r in rows]


def collate_shared(pairs: Sequence, pad_id: int, *, pack_length: int | None = None,
                   attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> PairBatch:
    """Lay B encoded pairs out as ``[prompt, chosen, rejected]`` segments.

    SDPA: one flat row (R = 1, L = Σ pair lengths, no padding) with :class:`PairSpans` for the pair attention
    and a (1, 1, 1, 1) placeholder mask; ``pack_length`` does not apply (nothing is padded).
    Eager: pairs packed into rows of at most ``pack_length`` tokens with an additive (R, 1, L, L) ``dtype``
    block mask. ``position_ids`` (R, L); segments ``2i`` / ``2i+1`` are pair i's chosen / rejected answer.
    """
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"pair_layout=shared supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}, not "
                         f"{attn_implementation!r} (use pair_layout=naive)")
    flat = attn_implementation != "eager"
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    rows = [list(range(len(pairs)))] if flat else pack_pairs(lengths, pack_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    allowed = None if flat else torch.zeros((n_rows, width, width), dtype=torch.bool)
    token_aligned: dict[str, torch.Tensor] = {}
    predict, targets, segments, order, layout = [], [], [], [], []
    grid_at = 0
    image_keys = sorted({k for p in pairs for k in p.image_inputs if k not in TOKEN_ALIGNED_KEYS})
    image_at = dict.fromkeys(image_keys, 0)
    row_lengths, row_slices = [], []
    for r, row in enumerate(rows):
        start = 0
        first = dict(image_at)
        for i in row:
            p = pairs[i]
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            end = start + n_p + n_c + n_r
            input_ids[r, start:end] = torch.cat([p.prompt_ids, p.chosen_ids, p.rejected_ids])
            position_ids[r, start:end] = torch.cat([torch.arange(n_p + n_c), n_p + torch.arange(n_r)])
            if allowed is not None:
                causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
                causal[n_p + n_c:, n_p:n_p + n_c] = False  # rejected never sees chosen
                allowed[r, start:end, start:end] = causal
            base = r * width + start
            last_prompt = base + n_p - 1
            predict.append(torch.cat([torch.tensor([last_prompt]), base + n_p + torch.arange(n_c - 1)]))
            predict.append(torch.cat([torch.tensor([last_prompt]), base + n_p + n_c + torch.arange(n_r - 1)]))
            targets += [p.chosen_ids, p.rejected_ids]
            segments += [torch.full((n_c,), 2 * i, dtype=torch.long), torch.full((n_r,), 2 * i + 1, dtype=torch.long)]
            for key in TOKEN_ALIGNED_KEYS:
                src = p.image_inputs.get(key)
                if src is not None:
                    buf = token_aligned.setdefault(key, torch.zeros((n_rows, width), dtype=src.dtype))
                    buf[r, start:start + n_p] = src.reshape(-1)
            order.append(i)
            n_grid = len(p.image_inputs.get("image_grid_thw", ()))
            layout.append((r, start, n_p, n_c, n_r, grid_at, grid_at + n_grid))
            grid_at += n_grid
            for key in image_keys:
                image_at[key] += len(p.image_inputs.get(key, ()))
            start = end
        row_lengths.append(start)
        row_slices.append({key: (first[key], image_at[key]) for key in image_keys})
        if allowed is not None:
            pad = torch.arange(start, width)
            allowed[r, pad, pad] = True  # padding attends to itself only: no fully masked (NaN) row
    if allowed is None:
        mask = torch.ones((1, 1, 1, 1), dtype=torch.bool)
        spans = PairSpans([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    else:
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype).masked_fill(~allowed.unsqueeze(1),
                                                                               torch.finfo(dtype).min)
        spans = None
    model_inputs = _concat_image_inputs(pairs, order)
    model_inputs.update(token_aligned)
    return PairBatch(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, model_inputs=model_inputs,
        predict_index=torch.cat(predict), target_ids=torch.cat(targets), segment_ids=torch.cat(segments),
        num_pairs=len(pairs), num_tokens=sum(lengths), sources=[(p.dataset, p.line) for p in pairs], segments=layout,
        row_lengths=row_lengths, row_slices=row_slices, spans=spans)


def mrope_positions(backbone, batch: PairBatch) -> torch.Tensor:
    """(3, R, L) rotary positions for Qwen-VL models in the shared layout.

    Qwen-VL gives image tokens 3D (time, height, width) positions and text tokens equal positions on all three
    axes. Each pair's ``prompt + chosen`` gets the model's own ``get_rope_index``; the rejected answer restarts,
    on all three axes, at the first chosen position — the restart the 1D layout does, done on every axis.
    """
    ids, mm = batch.input_ids, batch.model_inputs.get("mm_token_type_ids")
    grid = batch.model_inputs.get("image_grid_thw")
    pos = torch.zeros((3, *ids.shape), dtype=torch.long, device=ids.device)
    for r, start, n_p, n_c, n_r, g0, g1 in batch.segments:
        head = slice(start, start + n_p + n_c)
        if g1 > g0:
            seg_ids = ids[r, head].unsqueeze(0)
            p3, _ = backbone.get_rope_index(seg_ids, mm[r, head].unsqueeze(0), image_grid_thw=grid[g0:g1],
                                            attention_mask=torch.ones_like(seg_ids))
            pos[:, r, head] = p3[:, 0]
        else:
            pos[:, r, head] = torch.arange(n_p + n_c, device=ids.device)
        first_answer = pos[:, r, start + n_p]
        tail = torch.arange(n_r, device=ids.device)
        pos[:, r, start + n_p + n_c:start + n_p + n_c + n_r] = first_answer[:, None] + tail
    return pos
