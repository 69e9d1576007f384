"""Per-sequence completion log-probs, computed only where a completion token is predicted.

Three fixes over the original (seed_training.md 8.1 items 2 and 10, 8.2):

* logits are formed only for the N hidden states that predict a completion token (the caller
  gathers them), never the full (B, T, V) tensor over image and prompt tokens;
* log-softmax runs in fp32 and per-sequence sums accumulate in fp32, even when the model runs
  in bf16 (a bf16 sum of ~300 nats is only resolved to ~2 nats);
* which tokens count is given by explicit indices/masks, so a real token id 0 is never taken for
  padding.

Packed layout used by :func:`completion_logps` (a worked example). Two pairs, chosen rows are
segments 0-1 and rejected rows segments 2-3 (the caller decides the numbering)::

    segment_ids = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]     # N = 10 completion tokens
    target_ids  = [5, 0, 9, 7, 2, 4, 0, 0, 1, 3]     # id 0 is a real token here
    hidden      = (10, H) hidden states at the positions that PREDICT those tokens
                  (position t - 1 for target position t)

    sum_logps    (4,)  = per-segment sums of log p(target)
    token_counts (4,)  = [3, 2, 1, 4]
    token_logps  (10,) = log p(target) per token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["completion_logps", "sequence_logps_from_logits", "token_mean_nll"]


def _at_least_fp32(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32; keep fp64 (so ``gradcheck`` can run in double)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _token_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, target_ids: Tensor) -> Tensor:
    """log p(target) for each row: (n, H), (V, H), (V,) | None, (n,) -> (n,) fp32 (or fp64).

    The matmul runs in the model's dtype (an fp32 copy of a large LM head would cost GBs); the
    logits are upcast before the softmax. ``gather - logsumexp`` avoids a second (n, V) tensor.
    """
    logits = _at_least_fp32(F.linear(hidden, weight, bias))
    picked = logits.gather(1, target_ids.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def _check_packed(
    hidden: Tensor, lm_head_weight: Tensor, target_ids: Tensor, segment_ids: Tensor, chunk_size: int
) -> None:
    """Shape checks that need no host sync."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (N, H), got {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must have shape (V, H={hidden.shape[1]}), got {tuple(lm_head_weight.shape)}"
        )
    n = hidden.shape[0]
    for name, ids in (("target_ids", target_ids), ("segment_ids", segment_ids)):
        if ids.shape != (n,):
            raise ValueError(f"{name} must have shape (N={n},) like hidden, got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def completion_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    target_ids: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    *,
    chunk_size: int = 4096,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-segment log-prob sums from the hidden states that predict completion tokens.

    Args:
        hidden: (N, H) final hidden states, only at positions predicting a completion token.
        lm_head_weight: (V, H) output embedding.
        lm_head_bias: (V,) or None.
        target_ids: (N,) the token each row predicts (any id, 0 included).
        segment_ids: (N,) in [0, num_segments): the sequence each row belongs to.
        num_segments: number of sequences S (2B for B pairs).
        chunk_size: rows per logits chunk; at most a (chunk_size, V) fp32 block exists at once.

    Returns:
        ``sum_logps`` (S,) fp32, ``token_counts`` (S,) int64, ``token_logps`` (N,) fp32 (fp64
        if the inputs are fp64).
        Gradients flow to ``hidden``, ``lm_head_weight`` and ``lm_head_bias``.

    When N > chunk_size and grad is on, each chunk is activation-checkpointed: the backward
    recomputes that chunk's logits instead of keeping all N x V of them. For N <= chunk_size the
    plain computation runs (no recompute cost). ``segment_ids`` must lie in [0, num_segments);
    this is not checked, because checking costs a host sync.
    """
    _check_packed(hidden, lm_head_weight, target_ids, segment_ids, chunk_size)
    target_ids = target_ids.long()
    n = hidden.shape[0]
    if n <= chunk_size:
        token_logps = _token_logps(hidden, lm_head_weight, lm_head_bias, target_ids)
    else:
        grad_needed = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
        )
        parts = []
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            args = (hidden[rows], lm_head_weight, lm_head_bias, target_ids[rows])
            # Without grad there is nothing to free, so plain chunks are enough.
            parts.append(
                checkpoint(_token_logps, *args, use_reentrant=False) if grad_needed else _token_logps(*args)
            )
        token_logps = torch.cat(parts)
    sum_logps = token_logps.new_zeros(num_segments).index_add(0, segment_ids, token_logps)
    token_counts = torch.bincount(segment_ids, minlength=num_segments)
    return sum_logps, token_counts, token_logps


def token_mean_nll(token_logps: Tensor, segment_ids: Tensor, chosen_segments: Tensor) -> Tensor:
    """Mean of ``-token_logps`` over every token of the chosen segments (the ``sft`` term).

    Args:
        token_logps: (N,) from :func:`completion_logps`.
        segment_ids: (N,) segment of each token.
        chosen_segments: either a bool mask (S,) over segments, or integer ids (K,) of the chosen
            segments.

    Returns:
        () fp32: a micro-batch TOKEN mean, not a mean of per-sequence means. With no chosen token
        it is 0 (torch's empty mean would give NaN).
    """
    if token_logps.shape != segment_ids.shape or token_logps.dim() != 1:
        raise ValueError(
            "token_logps and segment_ids must both have shape (N,), got "
            f"{tuple(token_logps.shape)} and {tuple(segment_ids.shape)}"
        )
    if chosen_segments.dim() != 1:
        raise ValueError(f"chosen_segments must be 1-D, got shape {tuple(chosen_segments.shape)}")
    if chosen_segments.dtype == torch.bool:
        is_chosen = chosen_segments[segment_ids]
    else:
        is_chosen = torch.isin(segment_ids, chosen_segments)
    # where(), not a product: a -inf log-prob outside the chosen set must not become NaN.
    nll_sum = torch.where(is_chosen, -_at_least_fp32(token_logps), 0.0).sum()
    return nll_sum / is_chosen.sum().clamp(min=1)


def sequence_logps_from_logits(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Reference implementation: masked per-row sums of ``log_softmax(logits)[label]``.

    Args:
        logits: (B, T, V); ``logits[b, t]`` scores ``labels[b, t]`` (already shifted by the caller).
        labels: (B, T) integer ids; any value where ``mask`` is False.
        mask: (B, T) bool, True where the label counts. Never derived from a pad id.

    Returns:
        (B,) fp32 sums. Materialises (B, T, V) in fp32: for tests and tiny models only.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            "expected logits (B, T, V), labels (B, T), mask (B, T), got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    safe_labels = labels.long().masked_fill(~mask, 0)
    per_token = _at_least_fp32(logits).log_softmax(-1).gather(2, safe_labels.unsqueeze(2)).squeeze(2)
    return torch.where(mask, per_token, 0.0).sum(dim=1)
