"""Scoring a :class:`~mpo.train.batch.PairBatch`: per-answer log-prob sums and the chosen-answer NLL.

The language-model head is applied only to the positions that predict a completion token, in fp32 and in
chunks (``mpo.losses.completion_logps``): the (rows, length, vocab) logits tensor over image and prompt tokens
that TRL and InternVL materialise never exists here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from mpo.losses import completion_logps, token_mean_nll
from mpo.train.attention import SPANS_KWARG, language_config, refuse_sliding_window, use_pair_attention
from mpo.train.batch import PairBatch
from mpo.train.shared import mrope_positions

__all__ = ["PairScores", "PairScorer", "TowerOutputs", "backbone_of"]


@dataclass
class PairScores:
    """chosen_logps, rejected_logps (B,) fp32 sums over answer tokens; chosen_nll () token-mean NLL of chosen."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor


def backbone_of(model: nn.Module) -> nn.Module:
    """The part of an HF ``*ForConditionalGeneration`` / ``*ForCausalLM`` that returns hidden states."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    backbone = getattr(inner, "model", None)
    if backbone is None:
        raise TypeError(f"{type(inner).__name__} has no .model backbone; mpo needs an HF *ForConditionalGeneration "
                        "or *ForCausalLM model")
    return backbone


class PairScorer(nn.Module):
    """Wraps an HF model so that one ``forward(batch)`` returns :class:`PairScores`.

    The whole computation sits inside ``forward`` so that DDP/DeepSpeed wrappers around this module see the
    forward they have to synchronise.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: PairBatch, image_features=None) -> PairScores:  # noqa: D401
        hidden = self.hidden_states(batch, image_features)
        head = self.model.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_index)
        sums, _, token_logps = completion_logps(
            flat, head.weight, getattr(head, "bias", None), batch.target_ids, batch.segment_ids,
            2 * batch.num_pairs, chunk_size=self.chunk_size)
        chosen_segments = torch.arange(2 * batch.num_pairs, device=token_logps.device) % 2 == 0
        nll = token_mean_nll(token_logps, batch.segment_ids, chosen_segments)
        # copies, not strided views of ``sums``: FSDP2 hooks a wrapped module's outputs for backward, and an in-place
        # op on a view would silently drop that hook (it warns about every view it returns)
        return PairScores(chosen_logps=sums[0::2].clone(), rejected_logps=sums[1::2].clone(), chosen_nll=nll)

    def image_features(self, batch: PairBatch):
        """The backbone's image features of the batch (vision tower + projector), for reuse by another model."""
        kwargs = {k: batch.model_inputs[k] for k in ("pixel_values", "image_grid_thw") if k in batch.model_inputs}
        return backbone_of(self.model).get_image_features(**kwargs)

    def tower_outputs(self, batch: PairBatch) -> TowerOutputs:
        """The vision tower's output alone (InternVL-style ``vision_tower``), for a model whose projector differs."""
        tower = backbone_of(self.model).vision_tower
        return TowerOutputs(tower(pixel_values=batch.model_inputs["pixel_values"], return_dict=True))

    def hidden_states(self, batch: PairBatch, image_features=None) -> torch.Tensor:
        """(R, L, H) last hidden states; ``image_features``: the backbone's image features (replace vision tower and
        projector) or :class:`TowerOutputs` (replace the tower only), e.g. from another model's pass."""
        if isinstance(image_features, TowerOutputs):
            with _replayed_tower(backbone_of(self.model), image_features.output):
                return self._hidden_states(batch, None)
        return self._hidden_states(batch, image_features)

    def _hidden_states(self, batch: PairBatch, image_features=None) -> torch.Tensor:
        """(R, L, H) last hidden states of the backbone; ``image_features`` replaces the vision pass if given.

        One forward over the batch: the naive layout's padded rows, or the shared layout's single flat row (pair
        attention). Only the eager shared layout has several rows of different lengths; they run one forward each,
        cut to their own length, when padding would waste over 20 % (:func:`_pays_to_split`). Positions at and
        past a row's length come back as zeros (never gathered).
        """
        backbone = backbone_of(self.model)
        kwargs = dict(batch.model_inputs)
        if batch.segments:
            refuse_sliding_window(backbone)
        if batch.segments and hasattr(backbone, "get_rope_index"):
            kwargs["position_ids"] = mrope_positions(backbone, batch)
        elif batch.position_ids is not None:
            kwargs["position_ids"] = batch.position_ids
        if image_features is not None:
            kwargs.pop("pixel_values", None)
        if batch.spans is not None:
            if not use_pair_attention(backbone):
                raise ValueError(f"the shared layout's flat batches need sdpa attention; the language model uses "
                                 f"{language_config(backbone)._attn_implementation!r} (set model.attn_implementation)")
            kwargs[SPANS_KWARG] = batch.spans
        if not _pays_to_split(batch):
            if image_features is not None:
                kwargs["mm_encoder_outputs"] = {"image": image_features}
            out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
            return out.last_hidden_state
        width = batch.input_ids.shape[1]
        rows = []
        for r, (n, slices) in enumerate(zip(batch.row_lengths, batch.row_slices)):
            has_images = any(end > start for start, end in slices.values())
            row_kwargs = {k: _row_input(k, v, r, n, slices) for k, v in kwargs.items()
                          if has_images or k not in slices}  # a text-only row gets no (empty) image inputs
            if image_features is not None and has_images:
                row_kwargs["mm_encoder_outputs"] = {"image": _row_features(image_features, slices)}
            mask = batch.attention_mask[r:r + 1, :, :n, :n]
            out = backbone(input_ids=batch.input_ids[r:r + 1, :n], attention_mask=mask, use_cache=False, **row_kwargs)
            rows.append(torch.nn.functional.pad(out.last_hidden_state, (0, 0, 0, width - n)))
        return torch.cat(rows, dim=0)


@dataclass
class TowerOutputs:
    """A frozen vision tower's output for one batch; passed as ``image_features`` it replaces the tower's forward
    (the model's own layer selection, pixel shuffle and projector still run on it)."""

    output: object


class _Replay(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def _replayed_tower(backbone: nn.Module, output):
    """``backbone.vision_tower`` answers with ``output`` for the duration (the tower itself is put back after)."""
    tower = backbone.vision_tower
    backbone.vision_tower = _Replay(output)
    try:
        yield
    finally:
        backbone.vision_tower = tower


def _pays_to_split(batch: PairBatch, max_padding: float = 0.2) -> bool:
    """Run rows one by one only when padding would waste more than ``max_padding`` of the batch: with rows of
    equal length one batched forward is faster (measured: row by row cost the text benchmark 1.41× → 0.99×)."""
    if len(batch.row_lengths) <= 1:
        return False
    padded = len(batch.row_lengths) * batch.input_ids.shape[1]
    return sum(batch.row_lengths) < (1 - max_padding) * padded


def _row_input(key: str, value: torch.Tensor, r: int, n: int, slices: dict[str, tuple[int, int]]) -> torch.Tensor:
    """Row ``r`` (first ``n`` tokens) of a batch input: token-aligned keys by row, image keys by their slice."""
    if key in slices:
        start, end = slices[key]
        return value[start:end]
    if key == "position_ids" and value.dim() == 3:  # (3, R, L) M-RoPE
        return value[:, r:r + 1, :n]
    return value[r:r + 1, :n]


def _row_features(features, slices: dict[str, tuple[int, int]]):
    """The precomputed image features of one row: per tile (InternVL tensor) or per image (Qwen-VL tuple)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled = features.pooler_output
    if isinstance(pooled, (tuple, list)):
        start, end = slices["image_grid_thw"]
    else:
        start, end = slices["pixel_values"]
    return BaseModelOutputWithPooling(pooler_output=pooled[start:end])
