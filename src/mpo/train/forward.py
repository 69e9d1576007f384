"""Scoring a :class:`~mpo.train.batch.PairBatch`: per-answer log-prob sums and the chosen-answer NLL.

The language-model head is applied only to the positions that predict a completion token, in fp32 and in
chunks (``mpo.losses.completion_logps``): the (rows, length, vocab) logits tensor over image and prompt tokens
that TRL and InternVL materialise never exists here.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from mpo.losses import completion_logps, token_mean_nll
from mpo.train.attention import SPANS_KWARG, language_config, refuse_sliding_window, use_pair_attention
from mpo.train.batch import PairBatch
from mpo.train.shared import mrope_positions

__all__ = ["PairScores", "PairScorer", "TowerOutputs", "backbone_of", "replayable_tower"]


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

    ``vision_first`` (set for several processes): run the vision modules before the backbone's forward and hand it
    their features, instead of letting the backbone run them between its token embedding and its layers. A
    micro-batch without images then runs its vision filler (:class:`mpo.train.data.Collator`) at the same place in
    the graph as an image micro-batch runs its images, so every rank gathers parameters (ZeRO-3, FSDP2) and
    produces gradients (DDP buckets, ZeRO reduce-scatter) in the same order. The values are the same either way.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 4096, *, vision_first: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.vision_first = vision_first

    def forward(self, batch: PairBatch, image_features=None) -> PairScores:  # noqa: D401
        filler = batch.vision_filler
        shared_features = image_features is not None and not isinstance(image_features, TowerOutputs)
        if self.vision_first and not shared_features:
            inputs = _vision_inputs(batch)
            if "pixel_values" in inputs:
                image_features = self._vision(inputs, image_features)
        if filler is not None:  # a micro-batch without images: the features are the filler's, for no token
            # Cut to zero rows and handed to the backbone like an image batch's features: it scatters them into no
            # position (the model's check of image tokens against features sees 0 = 0), and the graph is the one
            # of an image batch, so the backward reaches the vision modules at the same point, in the same order,
            # with zero gradients.
            image_features = _no_rows(image_features) if self.vision_first and not shared_features else None
        hidden = self.hidden_states(batch, image_features)
        head = self.model.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_index)
        sums, _, token_logps = completion_logps(
            flat, head.weight, getattr(head, "bias", None), batch.target_ids, batch.segment_ids,
            batch.num_answers or 2 * batch.num_pairs, chunk_size=self.chunk_size)
        if batch.answer_of is not None:
            return _grouped_scores(sums, batch)
        chosen_segments = torch.arange(2 * batch.num_pairs, device=token_logps.device) % 2 == 0
        nll = token_mean_nll(token_logps, batch.segment_ids, chosen_segments)
        # copies, not strided views of ``sums``: FSDP2 hooks a wrapped module's outputs for backward, and an in-place
        # op on a view would silently drop that hook (it warns about every view it returns)
        return PairScores(chosen_logps=sums[0::2].clone(), rejected_logps=sums[1::2].clone(), chosen_nll=nll)

    def image_features(self, batch: PairBatch):
        """The backbone's image features of the batch (vision tower + projector), for reuse by another model; of
        its vision filler when it has one."""
        return self._vision(_vision_inputs(batch), None)

    def tower_outputs(self, batch: PairBatch) -> TowerOutputs:
        """The vision tower's output alone, for a model whose projector differs; of the batch's vision filler when
        it has one. InternVL-style ``vision_tower``: its whole output; Qwen-VL ``visual``: its blocks' output (its
        ``last_hidden_state``; the merger, the projector there, is the model's own)."""
        backbone, inputs = backbone_of(self.model), _vision_inputs(batch)
        if hasattr(backbone, "vision_tower"):
            return TowerOutputs(backbone.vision_tower(pixel_values=inputs["pixel_values"], return_dict=True))
        visual = backbone.visual
        out = visual(inputs["pixel_values"].type(visual.dtype), grid_thw=inputs["image_grid_thw"])
        return TowerOutputs(out.last_hidden_state)

    def _vision(self, inputs: dict[str, torch.Tensor], tower: TowerOutputs | None):
        """The backbone's image features of ``inputs`` (vision tower + projector, or the projector alone on a
        shared ``tower`` output), with gradients where the parts train."""
        backbone = backbone_of(self.model)
        kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        replay = _replayed_tower(backbone, tower.output) if tower is not None else contextlib.nullcontext()
        with replay:
            return backbone.get_image_features(**kwargs)

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
            elif image_features is not None and r == 0 and batch.vision_filler is not None:
                row_kwargs["mm_encoder_outputs"] = {"image": image_features}  # the filler's zero rows (forward)
            mask = batch.attention_mask[r:r + 1, :, :n, :n]
            out = backbone(input_ids=batch.input_ids[r:r + 1, :n], attention_mask=mask, use_cache=False, **row_kwargs)
            rows.append(torch.nn.functional.pad(out.last_hidden_state, (0, 0, 0, width - n)))
        return torch.cat(rows, dim=0)


def _grouped_scores(sums: torch.Tensor, batch: PairBatch) -> PairScores:
    """Per-pair scores from the distinct answers' log-prob sums (S,) of a grouped batch; the NLL counts a chosen
    answer once per pair that has it, as the ungrouped token mean does."""
    chosen, rejected = batch.answer_of.unbind(1)
    tokens = torch.bincount(batch.segment_ids, minlength=len(sums)).to(sums.dtype)
    nll = -sums.index_select(0, chosen).sum() / tokens.index_select(0, chosen).sum().clamp(min=1)
    return PairScores(chosen_logps=sums.index_select(0, chosen), rejected_logps=sums.index_select(0, rejected),
                      chosen_nll=nll)


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


def replayable_tower(backbone: nn.Module) -> bool:
    """Whether :func:`_replayed_tower` can stand in for the backbone's vision tower: InternVL's ``vision_tower``, or
    Qwen-VL's ``visual`` blocks before their ``merger`` (not deepstack towers, whose mergers read inner blocks)."""
    visual = getattr(backbone, "visual", None)
    return hasattr(backbone, "vision_tower") or (hasattr(visual, "merger")
                                                 and not hasattr(visual, "deepstack_merger_list"))


@contextlib.contextmanager
def _replayed_tower(backbone: nn.Module, output):
    """The frozen tower answers with ``output`` for the duration (the tower itself is put back after): InternVL's
    ``vision_tower`` as a whole; for Qwen-VL the blocks of ``visual`` become one block that returns ``output``, so
    its patch embedding (a linear layer), window order and the model's own merger still run."""
    owner, name = (backbone, "vision_tower") if hasattr(backbone, "vision_tower") else (backbone.visual, "blocks")
    tower = getattr(owner, name)
    setattr(owner, name, _Replay(output) if name == "vision_tower" else nn.ModuleList([_Replay(output)]))
    try:
        yield
    finally:
        setattr(owner, name, tower)


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


def _vision_inputs(batch: PairBatch) -> dict[str, torch.Tensor]:
    """The batch's image inputs, or its vision filler's when it has one (a micro-batch without images)."""
    return batch.model_inputs if batch.vision_filler is None else batch.vision_filler


def _no_rows(out):
    """A ``get_image_features`` result with its consumed features (the tensor itself, the ``pooler_output`` of a
    ModelOutput, or each element of a tuple) cut to zero rows; the cut keeps them in the autograd graph."""
    if isinstance(out, torch.Tensor):
        return out[:0]
    if getattr(out, "pooler_output", None) is not None:
        cut = copy.copy(out)
        cut.pooler_output = _no_rows(out.pooler_output)
        return cut
    if isinstance(out, (tuple, list)):
        return type(out)(_no_rows(v) for v in out)
    raise TypeError(f"get_image_features returned {type(out).__name__}, which mpo does not know how to read")
