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
A span may also hold one prompt with more than two answers (``mpo precompute-ref`` scores every pair of one
question in one span): the first answer runs causally with the prompt, each further answer attends to
``[prompt, itself]`` as the rejected answer does.
Consecutive pairs of one shape go through SDPA together, as a (G, H, n, D) view of the row (no copy); the
arithmetic is the plain layout's, so log-probs and gradients match it (tested to 1e-5 in fp32 against the plain
two-sequence forward).

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
           "has_sliding_window", "refuse_sliding_window"]

PAIR_ATTENTION = "mpo_pairs"
SPANS_KWARG = "mpo_pair_spans"


@dataclass
class PairSpans:
    """The spans of one flat row, in order and back to back: (n_prompt, n_chosen, n_rejected) for a pair, or
    (n_prompt, n_answer_1, ..., n_answer_m) for a prompt with m ≥ 1 answers (a question's pairs scored together).

    ``total`` = Σ span lengths, the row length. Masks for the answers after the first are built once per batch and
    reused by every layer.
    """

    shapes: list[tuple[int, ...]]
    total: int = 0
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _runs: list[tuple[int, tuple[int, ...]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.total = sum(map(sum, self.shapes))
        for shape in self.shapes:  # runs of consecutive pairs of one shape: (count, shape)
            if self._runs and self._runs[-1][1] == shape:
                self._runs[-1] = (self._runs[-1][0] + 1, shape)
            else:
                self._runs.append((1, shape))

    def rejected_mask(self, n_p: int, n_r: int, device: torch.device) -> torch.Tensor:
        """(n_r, n_p + n_r) bool, True = may attend: the whole prompt, then the rejected answer causally."""
        key = (n_p, n_r)
        mask = self._masks.get(key)
        if mask is None or mask.device != device:
            mask = torch.ones(n_r, n_p + n_r, dtype=torch.bool, device=device)
            mask[:, n_p:] = torch.ones(n_r, n_r, dtype=torch.bool, device=device).tril()
            self._masks[key] = mask
        return mask


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
    out = []
    # split (not slicing): its backward is one concatenation, where P slices of the row would each allocate a
    # zero gradient of the whole row
    sizes = [count * sum(shape) for count, shape in spans._runs]
    for (count, shape), *qkv in zip(spans._runs, *(t.split(sizes, dim=2) for t in (query, key, value))):
        n_p, n_first, *rest = shape
        # a run of G equal spans is a (G, H, n, D) view of the row: one SDPA call for all of them, no copy
        (q_a, *q_rs), (k_a, *k_rs), (v_a, *v_rs) = (t[0].unflatten(1, (count, sum(shape))).transpose(0, 1)
                                                    .split([n_p + n_first, *rest], dim=2) for t in qkv)
        parts = [F.scaled_dot_product_attention(q_a, k_a, v_a, dropout_p=dropout, scale=scaling, is_causal=True)]
        for n_r, q_r, k_r, v_r in zip(rest, q_rs, k_rs, v_rs):  # the rejected answer (and a question's others)
            k_pr = torch.cat([k_a[:, :, :n_p], k_r], dim=2)
            v_pr = torch.cat([v_a[:, :, :n_p], v_r], dim=2)
            parts.append(F.scaled_dot_product_attention(q_r, k_pr, v_pr, dropout_p=dropout, scale=scaling,
                                                        attn_mask=spans.rejected_mask(n_p, n_r, query.device)))
        out.append(torch.cat(parts, dim=2).transpose(1, 2).flatten(0, 1))  # (G·n, H, D)
    return (out[0] if len(out) == 1 else torch.cat(out)).unsqueeze(0), None  # (1, N, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)


def language_config(backbone: torch.nn.Module):
    """The config whose ``_attn_implementation`` the language model's attention layers read."""
    lm = getattr(backbone, "language_model", None)
    return (lm if lm is not None else backbone).config


def has_sliding_window(backbone: torch.nn.Module) -> bool:
    return "sliding_attention" in (getattr(language_config(backbone), "layer_types", None) or [])


def refuse_sliding_window(backbone: torch.nn.Module) -> None:
    """The shared layout's masks (pair attention and block mask alike) know no sliding window: refuse such models."""
    if has_sliding_window(backbone):
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
