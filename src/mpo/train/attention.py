"""Pair attention: the shared layout's attention without an (L, L) mask, registered with transformers.

In the shared layout one pair is ``[prompt, chosen, rejected]`` and every answer token must see exactly what it
sees in the plain two-sequence layout. A 4D block mask says so, but SDPA then computes every (query, key) score
of the row — on CPU that cost 14 % of a step on its own, and a packed row of P pairs pays for (Σ Lᵢ)² scores when
only Σ Lᵢ²/2 are used. Here, per pair, the attention runs as two calls instead:

* ``prompt + chosen`` attends to itself with ``is_causal=True`` — the kernels' causal fast path, which skips the
  blocks above the diagonal;
* the rejected queries attend to ``[prompt, rejected]`` keys with a small (n_r, n_p + n_r) mask: all of the
  prompt, and the rejected answer causally.

So all pairs of a batch sit in one row of Σ Lᵢ tokens with no padding at all, and no (L, L) mask is ever built.
Pairs of the same shape go through SDPA together (one call per shape); the arithmetic is the plain layout's, so
log-probs and gradients match it (tested to 1e-5 in fp32 against the plain two-sequence forward).

The function is registered with transformers as the attention implementation ``mpo_pairs`` (and sdpa's mask
function under the same name), and set on the *language model's* config only: the vision tower keeps its own.
A forward call without pair spans — generation, evaluation with the plain layout — falls back to plain SDPA, so a
model with this implementation set still behaves as an ``sdpa`` model everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

__all__ = ["PAIR_ATTENTION", "PairSpans", "pair_attention_forward", "use_pair_attention", "language_config",
           "refuse_sliding_window"]

PAIR_ATTENTION = "mpo_pairs"
SPANS_KWARG = "mpo_pair_spans"


@dataclass
class PairSpans:
    """The pairs of one flat row, in order and back to back: (n_prompt, n_chosen, n_rejected) each.

    ``total`` = Σ (n_p + n_c + n_r), the row length. Masks for the rejected calls are built once per batch and
    reused by every layer.
    """

    shapes: list[tuple[int, int, int]]
    total: int = 0
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _groups: dict[tuple[int, int, int], list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.total = sum(map(sum, self.shapes))
        for i, shape in enumerate(self.shapes):
            self._groups.setdefault(shape, []).append(i)

    def rejected_mask(self, n_p: int, n_r: int, device: torch.device) -> torch.Tensor:
        """(n_r, n_p + n_r) bool, True = may attend: the whole prompt, then the rejected answer causally."""
        key = (n_p, n_r)
        mask = self._masks.get(key)
        if mask is None or mask.device != device:
            mask = torch.ones(n_r, n_p + n_r, dtype=torch.bool, device=device)
            mask[:, n_p:] = torch.ones(n_r, n_r, dtype=torch.bool, device=device).tril()
            self._masks[key] = mask
        return mask


def _stack(parts: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
    """(G, H, n, D) from G pieces of shape (1, H, n, D); one piece stays a view (no copy)."""
    return parts[idx[0]] if len(idx) == 1 else torch.cat([parts[i] for i in idx], dim=0)


def pair_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query (1, H, N, D), key/value (1, Hkv, N, D) → ((1, N, H, D), None).

    With ``mpo_pair_spans`` in ``kwargs`` (a :class:`PairSpans` with ``total == N``) the attention is the shared
    layout's and ``attention_mask`` is ignored (the scorer passes a 4D placeholder so that transformers builds no
    mask); without it, plain SDPA.
    """
    spans: PairSpans | None = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != spans.total:
        raise ValueError(f"pair attention: query {tuple(query.shape)} does not match the pair spans (1 row of "
                         f"{spans.total} tokens)")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: one copy of K/V per layer; SDPA's enable_gqa leaves the CPU flash kernel
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    bounds = [n for n_p, n_c, n_r in spans.shapes for n in (n_p + n_c, n_r)]
    q_parts, k_parts, v_parts = (t.split(bounds, dim=2) for t in (query, key, value))
    q_a, q_r = q_parts[0::2], q_parts[1::2]
    k_a, k_r, v_a, v_r = k_parts[0::2], k_parts[1::2], v_parts[0::2], v_parts[1::2]
    out_a: list[torch.Tensor | None] = [None] * len(spans.shapes)
    out_r: list[torch.Tensor | None] = [None] * len(spans.shapes)
    for (n_p, _, n_r), idx in spans._groups.items():
        ks, vs = _stack(k_a, idx), _stack(v_a, idx)
        a = F.scaled_dot_product_attention(_stack(q_a, idx), ks, vs, dropout_p=dropout, scale=scaling, is_causal=True)
        k_pr = torch.cat([ks[:, :, :n_p], _stack(k_r, idx)], dim=2)
        v_pr = torch.cat([vs[:, :, :n_p], _stack(v_r, idx)], dim=2)
        r = F.scaled_dot_product_attention(_stack(q_r, idx), k_pr, v_pr, dropout_p=dropout, scale=scaling,
                                           attn_mask=spans.rejected_mask(n_p, n_r, query.device))
        for j, i in enumerate(idx):
            out_a[i], out_r[i] = a[j:j + 1], r[j:j + 1]
    out = torch.cat([t for pair in zip(out_a, out_r) for t in pair], dim=2)  # (1, H, N, D)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)


def language_config(backbone: torch.nn.Module):
    """The config whose ``_attn_implementation`` the language model's attention layers read."""
    lm = getattr(backbone, "language_model", None)
    return (lm if lm is not None else backbone).config


def refuse_sliding_window(backbone: torch.nn.Module) -> None:
    """The shared layout's masks (pair attention and block mask alike) know no sliding window: refuse such models."""
    if "sliding_attention" in (getattr(language_config(backbone), "layer_types", None) or []):
        raise ValueError(f"{type(backbone).__name__} has sliding-window attention layers, which the shared pair "
                         "layout does not implement; use train.pair_layout=naive")


def use_pair_attention(backbone: torch.nn.Module) -> bool:
    """Switch the language model of ``backbone`` from ``sdpa`` to pair attention; True if it now uses it.

    Only ``sdpa`` models are switched (pair attention is sdpa underneath); eager models keep the block mask.
    """
    config = language_config(backbone)
    current = getattr(config, "_attn_implementation", None)
    if current == PAIR_ATTENTION:
        return True
    if current != "sdpa":
        return False
    refuse_sliding_window(backbone)
    _register()
    config._attn_implementation = PAIR_ATTENTION
    return True
