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


def _groups(pairs: Sequence, group_prompts: bool) -> list[tuple[list[int], list[torch.Tensor], list[tuple[int, int]]]]:
    """Spans of the batch: (pair indices, distinct answers, (chosen, rejected) answer index of each pair).

    Without ``group_prompts`` every pair is its own span with answers [chosen, rejected]. With it, consecutive
    pairs of one ``group`` (one question: the same prompt and images, encoded once) share a span, and an answer
    that occurs in several of its pairs (a correct response paired with several wrong ones) is scored once.
    """
    spans: list[tuple[list[int], list[torch.Tensor], list[tuple[int, int]]]] = []
    for i, p in enumerate(pairs):
        key = getattr(p, "group", None) if group_prompts else None
        if key is None or not spans or getattr(pairs[spans[-1][0][0]], "group", None) != key:
            spans.append(([], [], []))
        members, answers, answer_of = spans[-1]
        members.append(i)
        pick = []
        for ids in (p.chosen_ids, p.rejected_ids):
            j = next((j for j, a in enumerate(answers) if key is not None and torch.equal(a, ids)), None)
            if j is None:
                answers.append(ids)
                j = len(answers) - 1
            pick.append(j)
        answer_of.append((pick[0], pick[1]))
    return spans


def collate_shared(pairs: Sequence, pad_id: int, *, pack_length: int | None = None,
                   attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                   group_prompts: bool = False) -> PairBatch:
    """Lay B encoded pairs out as ``[prompt, chosen, rejected]`` spans.

    SDPA: one flat row (R = 1, L = Σ span lengths, no padding) with :class:`PairSpans` for the pair attention
    and a (1, 1, 1, 1) placeholder mask; ``pack_length`` does not apply (nothing is padded).
    Eager: spans packed into rows of at most ``pack_length`` tokens with an additive (R, 1, L, L) ``dtype``
    block mask. ``position_ids`` (R, L); segments ``2i`` / ``2i+1`` are pair i's chosen / rejected answer.

    ``group_prompts`` (the reference precompute): consecutive pairs with the same ``group`` share one span
    ``[prompt, answer_1, ..., answer_m]`` with their distinct answers; segments are then the distinct answers and
    ``answer_of`` says which are each pair's chosen and rejected. Each answer sees the prompt and itself only, so
    its log-probs are those of the plain two-sequence layout.
    """
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"pair_layout=shared supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}, not "
                         f"{attn_implementation!r} (use pair_layout=naive)")
    flat = attn_implementation != "eager"
    groups = _groups(pairs, group_prompts)
    leaders = [pairs[members[0]] for members, _, _ in groups]  # prompt, images and token-aligned inputs
    lengths = [len(p.prompt_ids) + sum(len(a) for a in answers) for p, (_, answers, _) in zip(leaders, groups)]
    rows = [list(range(len(groups)))] if flat else pack_pairs(lengths, pack_length)
    width = max(sum(lengths[g] for g in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    allowed = None if flat else torch.zeros((n_rows, width, width), dtype=torch.bool)
    first_segment = [0]
    for _, answers, _ in groups:
        first_segment.append(first_segment[-1] + len(answers))
    token_aligned: dict[str, torch.Tensor] = {}
    predict, targets, segments, order, layout = [], [], [], [], []
    grid_at = 0
    image_keys = sorted({k for p in leaders for k in p.image_inputs if k not in TOKEN_ALIGNED_KEYS})
    image_at = dict.fromkeys(image_keys, 0)
    row_lengths, row_slices = [], []
    for r, row in enumerate(rows):
        start = 0
        first = dict(image_at)
        for g in row:
            p, answers = leaders[g], groups[g][1]
            n_p, n_as = len(p.prompt_ids), [len(a) for a in answers]
            end = start + lengths[g]
            input_ids[r, start:end] = torch.cat([p.prompt_ids, *answers])
            position_ids[r, start:end] = torch.cat([torch.arange(n_p + n_as[0])]
                                                   + [n_p + torch.arange(n) for n in n_as[1:]])
            if allowed is not None:
                block = torch.ones(end - start, end - start, dtype=torch.bool).tril()
                at = n_p + n_as[0]
                for n in n_as[1:]:  # a later answer sees no earlier answer of its span
                    block[at:at + n, n_p:at] = False
                    at += n
                allowed[r, start:end, start:end] = block
            base, at = r * width + start, n_p
            for j, (ids, n) in enumerate(zip(answers, n_as)):
                predict.append(torch.cat([torch.tensor([base + n_p - 1]), base + at + torch.arange(n - 1)]))
                targets.append(ids)
                segments.append(torch.full((n,), first_segment[g] + j, dtype=torch.long))
                at += n
            for key in TOKEN_ALIGNED_KEYS:
                src = p.image_inputs.get(key)
                if src is not None:
                    buf = token_aligned.setdefault(key, torch.zeros((n_rows, width), dtype=src.dtype))
                    buf[r, start:start + n_p] = src.reshape(-1)
            order.append(g)
            n_grid = len(p.image_inputs.get("image_grid_thw", ()))
            layout.append((r, start, n_p, tuple(n_as), grid_at, grid_at + n_grid))
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
        spans = PairSpans([(len(p.prompt_ids), *(len(a) for a in answers))
                           for p, (_, answers, _) in zip(leaders, groups)])
    else:
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype).masked_fill(~allowed.unsqueeze(1),
                                                                               torch.finfo(dtype).min)
        spans = None
    model_inputs = _concat_image_inputs(leaders, order)
    model_inputs.update(token_aligned)
    answer_of = None
    if group_prompts:
        answer_of = torch.zeros((len(pairs), 2), dtype=torch.long)
        for g, (members, _, picks) in enumerate(groups):
            for i, (c, rj) in zip(members, picks):
                answer_of[i] = torch.tensor([first_segment[g] + c, first_segment[g] + rj])
    return PairBatch(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, model_inputs=model_inputs,
        predict_index=torch.cat(predict), target_ids=torch.cat(targets), segment_ids=torch.cat(segments),
        num_pairs=len(pairs), num_tokens=sum(lengths), sources=[(p.dataset, p.line) for p in pairs], segments=layout,
        row_lengths=row_lengths, row_slices=row_slices, spans=spans, answer_of=answer_of,
        num_answers=first_segment[-1])


def mrope_positions(backbone, batch: PairBatch) -> torch.Tensor:
    """(3, R, L) rotary positions for Qwen-VL models in the shared layout.

    Qwen-VL gives image tokens 3D (time, height, width) positions and text tokens equal positions on all three
    axes. Each pair's ``prompt + chosen`` gets the model's own ``get_rope_index``; the rejected answer restarts,
    on all three axes, at the first chosen position — the restart the 1D layout does, done on every axis (and so
    does every further answer of a question's span).
    """
    ids, mm = batch.input_ids, batch.model_inputs.get("mm_token_type_ids")
    grid = batch.model_inputs.get("image_grid_thw")
    pos = torch.zeros((3, *ids.shape), dtype=torch.long, device=ids.device)
    for r, start, n_p, (n_c, *rest), g0, g1 in batch.segments:
        head = slice(start, start + n_p + n_c)
        if g1 > g0:
            seg_ids = ids[r, head].unsqueeze(0)
            p3, _ = backbone.get_rope_index(seg_ids, mm[r, head].unsqueeze(0), image_grid_thw=grid[g0:g1],
                                            attention_mask=torch.ones_like(seg_ids))
            pos[:, r, head] = p3[:, 0]
        else:
            pos[:, r, head] = torch.arange(n_p + n_c, device=ids.device)
        first_answer = pos[:, r, start + n_p]
        at = start + n_p + n_c
        for n_r in rest:
            pos[:, r, at:at + n_r] = first_answer[:, None] + torch.arange(n_r, device=ids.device)
            at += n_r
    return pos
