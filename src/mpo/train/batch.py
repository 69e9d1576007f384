"""Collating encoded pairs into model inputs, with the exact positions whose next token is scored.

Both layouts produce a :class:`PairBatch`; the scorer (``mpo.train.forward``) does not care which one it gets.

``naive`` (the plain two-sequence layout every other trainer uses; kept for debugging and as the reference of the
exactness tests). For B pairs the rows are ``[prompt_i + chosen_i for i] + [prompt_i + rejected_i for i]``,
right-padded, with the image inputs of the B pairs repeated for the rejected rows::

    row 0: <prompt 0 ........><chosen 0 ...><pad>
    row 1: <prompt 1 ....><chosen 1 ......><pad>
    row 2: <prompt 0 ........><rejected 0 ....>
    row 3: <prompt 1 ....><rejected 1 ..><pad..>
    pixel_values: cat(pv_0, pv_1, pv_0, pv_1)           (T_0 + T_1 + T_0 + T_1, 3, S, S) for InternVL

Segments: pair i's chosen answer is segment 2i, its rejected answer segment 2i+1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from mpo.data.encode import TOKEN_ALIGNED_KEYS
from mpo.train.attention import PairSpans

__all__ = ["PairBatch", "collate_naive", "TOKEN_ALIGNED_KEYS"]



@dataclass
class PairBatch:
    """One micro-batch of B preference pairs laid out for one forward pass.

    input_ids (R, L) int64 and attention_mask (R, L) (2D padding mask, or a 4D boolean (R, 1, L, L) block mask for
    the shared layout); position_ids (R, L) or (3, R, L) for M-RoPE models, or None for the model default;
    model_inputs: image inputs (pixel_values, image_grid_thw, ...) as the model's forward takes them;
    predict_index (N,) flat indices into the (R·L) positions whose next token is a completion token;
    target_ids (N,) those tokens; segment_ids (N,) 2·pair + (0 chosen | 1 rejected).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    model_inputs: dict[str, torch.Tensor]
    predict_index: torch.Tensor
    target_ids: torch.Tensor
    segment_ids: torch.Tensor
    num_pairs: int
    num_tokens: int
    sources: list[tuple[str, int]] = field(default_factory=list)
    pair_ids: list[int] = field(default_factory=list)
    segments: list[tuple] = field(default_factory=list)
    """shared layout only: (row, start, n_prompt, (n_chosen, n_rejected), first_grid, end_grid) per span — a
    question's span lists all its answers — for models whose positions depend on the images (Qwen-VL's 3D rotary
    positions); grid rows index ``image_grid_thw``."""
    row_lengths: list[int] = field(default_factory=list)
    """shared layout only: tokens used in each row; the scorer runs each row at its own length (no padding)."""
    row_slices: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    """shared layout only: per row, the [start, end) rows of each image input (pixel_values, image_grid_thw)."""
    spans: PairSpans | None = None
    """shared layout with pair attention (sdpa): the pairs of the single flat row; ``attention_mask`` is then a
    (1, 1, 1, 1) placeholder that the pair attention ignores (see ``mpo.train.attention``)."""
    answer_of: torch.Tensor | None = None
    """shared layout with grouped prompts only (the precompute): (B, 2) int64, the segments of each pair's chosen
    and rejected answer among the ``num_answers`` distinct answers; None: segments 2i and 2i+1."""
    num_answers: int = 0
    """segments in ``segment_ids`` (0: 2 · num_pairs)."""
    vision_filler: dict[str, torch.Tensor] | None = None
    """several processes, a micro-batch without images: one blank image's inputs, which the scorer runs through
    the vision modules with a zero weight (:class:`mpo.train.data.Collator`)."""

    def answer_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,), (B,) float: the scored tokens of each pair's chosen and rejected answer (``ipo`` averages by them)."""
        counts = torch.bincount(self.segment_ids, minlength=self.num_answers or 2 * self.num_pairs).float()
        if self.answer_of is None:
            return counts[0::2], counts[1::2]
        return counts[self.answer_of[:, 0]], counts[self.answer_of[:, 1]]

    def to(self, device: torch.device | str) -> PairBatch:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return replace(
            self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids), model_inputs={k: move(v) for k, v in self.model_inputs.items()},
            predict_index=move(self.predict_index), target_ids=move(self.target_ids),
            segment_ids=move(self.segment_ids), answer_of=move(self.answer_of),
            vision_filler=None if self.vision_filler is None else {k: move(v) for k, v in self.vision_filler.items()})


def _concat_image_inputs(pairs: Sequence, order: Sequence[int]) -> dict[str, torch.Tensor]:
    """Concatenate per-image processor outputs of ``pairs`` in row ``order`` (image-aligned keys only)."""
    keys = sorted({k for p in pairs for k in p.image_inputs if k not in TOKEN_ALIGNED_KEYS})
    out = {}
    for key in keys:
        parts = [pairs[i].image_inputs[key] for i in order if key in pairs[i].image_inputs]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out


def collate_naive(pairs: Sequence, pad_id: int) -> PairBatch:
    """Lay B encoded pairs out as 2B right-padded rows (chosen rows first, then rejected rows)."""
    b = len(pairs)
    rows, completions = [], []
    for kind in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            rows.append(torch.cat([p.prompt_ids, getattr(p, kind)]))
            completions.append(getattr(p, kind))
    width = max(len(r) for r in rows)
    input_ids = torch.full((2 * b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * b, width), dtype=torch.long)
    token_aligned: dict[str, torch.Tensor] = {}
    predict, targets, segments = [], [], []
    for r, (row, comp) in enumerate(zip(rows, completions)):
        input_ids[r, : len(row)] = row
        attention_mask[r, : len(row)] = 1
        start = len(row) - len(comp)  # first completion token; it is predicted from position start - 1
        predict.append(torch.arange(start - 1, len(row) - 1) + r * width)
        targets.append(comp)
        pair, kind = r % b, r // b
        segments.append(torch.full((len(comp),), 2 * pair + kind, dtype=torch.long))
        for key in TOKEN_ALIGNED_KEYS:
            src = pairs[pair].image_inputs.get(key)
            if src is not None:
                buf = token_aligned.setdefault(key, torch.zeros((2 * b, width), dtype=src.dtype))
                buf[r, : src.shape[-1]] = src.reshape(-1)
    model_inputs = _concat_image_inputs(pairs, list(range(b)) * 2)
    model_inputs.update(token_aligned)
    return PairBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=None, model_inputs=model_inputs,
        predict_index=torch.cat(predict), target_ids=torch.cat(targets), segment_ids=torch.cat(segments),
        num_pairs=b, num_tokens=int(attention_mask.sum()), sources=[(p.dataset, p.line) for p in pairs])
