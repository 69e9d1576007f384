"""The loss registry and the MPO mixture: one table, one weighted sum.

MPO (Wang et al. 2024) = 0.8 * sigmoid (preference) + 0.2 * bco_pair (quality) + 1.0 * sft
(generation), beta = 0.1. With delta = 0 this equals TRL 1.16's
``DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])``.

Reduction (seed_training.md section 7.4): every term is reduced to its batch mean first, then

    loss = sum_k w_k * mean_i(L_k,i)

DPO and BCO use log-probs SUMMED over completion tokens; ``sft`` is a token mean over the chosen
completions of the micro-batch. Worked example, B = 1, beta = 0.1, u_c = 2, u_r = -1, delta = 0,
chosen_nll = 1.5: 0.8 * 0.554355 + 0.2 * 1.242536 + 1.0 * 1.5 = 2.191991.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from mpo.losses.generation import sft_loss
from mpo.losses.preference import LossInputs, hinge_loss, ipo_loss, sigmoid_loss
from mpo.losses.quality import bco_pair_loss

__all__ = [
    "LOSSES",
    "LossSpec",
    "MPOLossOutput",
    "check_loss_types",
    "implicit_rewards",
    "mpo_loss",
    "mpo_loss_with_rewards",
]


@dataclass(frozen=True)
class LossSpec:
    """One registry entry.

    Attributes:
        fn: ``LossInputs -> Tensor``, per-pair losses (B,), or a scalar () for ``sft``.
        needs_reference: whether the term reads reference log-probs (if no configured term does,
            the trainer may skip the reference forward).
        uses_delta: whether the term reads the BCO reward shift (then the trainer keeps a
            :class:`mpo.losses.RunningMean`).
        description: one line for ``--help`` and error messages.
    """

    fn: Callable[[LossInputs], Tensor]
    needs_reference: bool
    uses_delta: bool
    description: str


LOSSES: Mapping[str, LossSpec] = MappingProxyType(
    {
        "sigmoid": LossSpec(sigmoid_loss, True, False, "DPO: -log sigmoid(beta*(u_c - u_r)), per pair"),
        "hinge": LossSpec(hinge_loss, True, False, "SLiC hinge: relu(1 - beta*(u_c - u_r)), per pair"),
        "ipo": LossSpec(ipo_loss, True, False, "IPO, length-normalised as in TRL, per pair"),
        "bco_pair": LossSpec(bco_pair_loss, True, True, "BCO pair with reward shift delta, per pair"),
        "sft": LossSpec(sft_loss, False, False, "NLL, token mean over the chosen completions of the batch"),
    }
)


@dataclass(frozen=True)
class MPOLossOutput:
    """Result of :func:`mpo_loss_with_rewards`.

    Attributes:
        loss: () the scalar to back-propagate.
        metrics: floats, see :func:`mpo_loss_with_rewards`.
        chosen_rewards: (B,) fp32 ``beta * (policy - ref)`` of the chosen rows, detached.
        rejected_rewards: (B,) the same for the rejected rows, detached.
    """

    loss: Tensor
    metrics: dict[str, float]
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def check_loss_types(loss_types: Sequence[str], loss_weights: Sequence[float]) -> None:
    """Validate a loss configuration; call it at startup so a bad config fails before training.

    Raises:
        ValueError: empty, unknown or repeated names; length mismatch; a negative, non-finite or
            all-zero weight.
    """
    if len(loss_types) == 0:
        raise ValueError(f"loss_types is empty; valid names: {sorted(LOSSES)}")
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss type(s) {unknown} in loss_types; valid names: {sorted(LOSSES)}")
    repeated = sorted({name for name in loss_types if list(loss_types).count(name) > 1})
    if repeated:
        raise ValueError(f"loss_types lists {repeated} more than once")
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_types has {len(loss_types)}: "
            f"{list(loss_weights)} vs {list(loss_types)}"
        )
    bad = [w for w in loss_weights if not (math.isfinite(w) and w >= 0.0)]
    if bad:
        raise ValueError(f"loss_weights must be finite and >= 0, got {list(loss_weights)}")
    if all(w == 0.0 for w in loss_weights):
        raise ValueError(f"all loss_weights are 0 ({list(loss_weights)}): nothing to train")


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """``beta * (policy_logps - ref_logps)``, fp32, detached. (B,) -> (B,)."""
    return (beta * (policy_logps.detach().float() - ref_logps.detach().float())).detach()


def _check_inputs(logps: Mapping[str, Tensor], chosen_nll: Tensor, beta: float, delta: float) -> None:
    """Shape and range checks that need no host sync."""
    shape = logps["policy_chosen_logps"].shape
    for name, tensor in logps.items():
        if tensor.dim() != 1 or tensor.shape != shape or tensor.numel() == 0:
            shapes = {k: tuple(v.shape) for k, v in logps.items()}
            raise ValueError(
                f"{name} must have shape (B,) with B >= 1 like the other log-probs, got {shapes}"
            )
    if chosen_nll.dim() != 0:
        raise ValueError(
            f"chosen_nll must be a scalar tensor (shape ()), got shape {tuple(chosen_nll.shape)}"
        )
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if not math.isfinite(delta):
        raise ValueError(f"delta must be finite, got {delta}")


def mpo_loss_with_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
    loss_types: Sequence[str] = ("sigmoid", "bco_pair", "sft"),
    loss_weights: Sequence[float] = (0.8, 0.2, 1.0),
    delta: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> MPOLossOutput:
    """Weighted mixture of registered losses, plus the detached rewards.

    Args:
        policy_chosen_logps: (B,) policy log-prob sums over each chosen completion.
        policy_rejected_logps: (B,) the same for the rejected completions.
        ref_chosen_logps: (B,) reference log-prob sums (no gradient is expected or used).
        ref_rejected_logps: (B,) the same for the rejected completions.
        chosen_nll: () token-mean NLL of the chosen completions of the micro-batch.
        beta: inverse temperature of the implicit reward.
        loss_types: names from :data:`LOSSES`.
        loss_weights: one weight per name; a 0 weight removes the term from the loss (it is still
            logged).
        delta: BCO reward shift, the current :class:`mpo.losses.RunningMean` value.
        chosen_lengths: (B,) chosen completion token counts; only ``ipo`` needs them.
        rejected_lengths: (B,) rejected completion token counts; only ``ipo`` needs them.

    Returns:
        :class:`MPOLossOutput`. ``metrics`` holds ``loss``, ``loss/<name>`` (raw batch mean) and
        ``loss/<name>_weighted`` per term; ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins`` (means of the TRUE beta-rewards, as TRL 1.16 logs them; InternVL on
        TRL 0.21 logs the loss-weighted sum over loss types, sum(w) = 2.0 times larger for MPO,
        so its curves read 2x ours); ``rewards/accuracies``
        (fraction of pairs with chosen reward > rejected reward); ``logps/chosen``,
        ``logps/rejected`` (batch means of the policy sums); ``delta``.

    Log-probs are upcast to fp32 first: the DPO logit subtracts four sums of hundreds of nats,
    which bf16 resolves only to about 2 nats.
    """
    check_loss_types(loss_types, loss_weights)
    logps = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_inputs(logps, chosen_nll, beta, delta)
    policy_chosen, policy_rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    inputs = LossInputs(
        chosen_logratios=policy_chosen - ref_chosen_logps.detach().float(),
        rejected_logratios=policy_rejected - ref_rejected_logps.detach().float(),
        beta=beta,
        delta=delta,
        chosen_nll=chosen_nll.float(),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    weights = dict(zip(loss_types, loss_weights, strict=True))
    terms = {name: LOSSES[name].fn(inputs).mean() for name in weights}
    # Zero-weight terms stay out of the sum (not multiplied by 0), so a NaN there cannot leak in.
    loss = torch.stack([w * terms[name] for name, w in weights.items() if w != 0.0]).sum()

    chosen_rewards = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
    rejected_rewards = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)
    metrics = _metrics(loss, terms, weights, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    metrics["delta"] = float(delta)
    return MPOLossOutput(loss, metrics, chosen_rewards, rejected_rewards)


def _metrics(
    loss: Tensor,
    terms: Mapping[str, Tensor],
    weights: Mapping[str, float],
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> dict[str, float]:
    """All logged scalars with ONE device-to-host copy (stack, then a single ``.tolist()``)."""
    scalars: dict[str, Tensor] = {"loss": loss}
    for name in terms:
        scalars[f"loss/{name}"] = terms[name]
        scalars[f"loss/{name}_weighted"] = weights[name] * terms[name]
    scalars["rewards/chosen"] = chosen_rewards.mean()
    scalars["rewards/rejected"] = rejected_rewards.mean()
    scalars["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    scalars["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
    scalars["logps/chosen"] = policy_chosen.mean()
    scalars["logps/rejected"] = policy_rejected.mean()
    values = torch.stack([v.detach().float() for v in scalars.values()]).tolist()
    return dict(zip(scalars, values, strict=True))


def mpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
    loss_types: Sequence[str] = ("sigmoid", "bco_pair", "sft"),
    loss_weights: Sequence[float] = (0.8, 0.2, 1.0),
    delta: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """MPO loss: ``(loss (), metrics)``. Arguments as in :func:`mpo_loss_with_rewards`.

    The BCO shift ``delta`` must already include the current batch (see
    :class:`mpo.losses.RunningMean` for the update order).
    """
    out = mpo_loss_with_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_nll,
        beta=beta,
        loss_types=loss_types,
        loss_weights=loss_weights,
        delta=delta,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    return out.loss, out.metrics
