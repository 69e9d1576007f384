"""Pairwise preference losses (MPO's "preference" term and its alternatives).

Every loss in ``mpo.losses`` reads one :class:`LossInputs` and returns per-pair losses of shape
``(B,)`` (``sft`` is the one exception, see :mod:`mpo.losses.generation`). The inputs are the
policy/reference log-ratios, summed over completion tokens:

    u_c = log pi(y_c | x) - log pi_ref(y_c | x)      chosen_logratios,   shape (B,)
    u_r = log pi(y_r | x) - log pi_ref(y_r | x)      rejected_logratios, shape (B,)

Worked example (beta = 0.1, u_c = 2, u_r = -1): the DPO logit is 0.1 * (2 - (-1)) = 0.3, so
``sigmoid_loss`` = -log sigmoid(0.3) = 0.554355..., ``hinge_loss`` = relu(1 - 0.3) = 0.7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossInputs", "hinge_loss", "ipo_loss", "sigmoid_loss"]


@dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read. One object so every loss has one signature.

    Lives here because the pairwise losses are the base case; ``quality`` and ``generation``
    import it from this module.

    Attributes:
        chosen_logratios: (B,) ``log pi(y_c) - log pi_ref(y_c)``, token sums, with gradient.
        rejected_logratios: (B,) the same for the rejected completions.
        beta: inverse temperature of the implicit reward ``r = beta * u``.
        delta: BCO reward shift (a constant, see :class:`mpo.losses.RunningMean`).
        chosen_nll: () token-mean NLL of the chosen completions of the micro-batch (``sft``).
        chosen_lengths: (B,) completion token counts of the chosen rows, only ``ipo`` reads it.
        rejected_lengths: (B,) the same for the rejected rows.
    """

    chosen_logratios: Tensor
    rejected_logratios: Tensor
    beta: float
    delta: float = 0.0
    chosen_nll: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None


def sigmoid_loss(x: LossInputs) -> Tensor:
    """DPO: ``-log sigmoid(beta * (u_c - u_r))``, shape (B,).

    Label smoothing is not offered: MPO uses eps = 0 (seed_training.md section 7.1).
    """
    return -F.logsigmoid(x.beta * (x.chosen_logratios - x.rejected_logratios))


def hinge_loss(x: LossInputs) -> Tensor:
    """SLiC hinge: ``relu(1 - beta * (u_c - u_r))``, shape (B,). Same formula as TRL 1.16."""
    return torch.relu(1.0 - x.beta * (x.chosen_logratios - x.rejected_logratios))


def ipo_loss(x: LossInputs) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) with TRL 1.16's length normalisation, shape (B,).

    ``((u_c / n_c - u_r / n_r) - 1 / (2 beta)) ** 2`` where ``n`` is the completion token count
    (clamped to at least 1). The per-token average keeps the squared loss from growing with the
    completion length; TRL documents that the IPO authors confirmed this form.

    Raises:
        ValueError: if ``chosen_lengths`` or ``rejected_lengths`` is missing.
    """
    if x.chosen_lengths is None or x.rejected_lengths is None:
        raise ValueError(
            "loss 'ipo' needs chosen_lengths and rejected_lengths (completion token counts, shape (B,))"
        )
    chosen_avg = x.chosen_logratios / x.chosen_lengths.clamp(min=1)
    rejected_avg = x.rejected_logratios / x.rejected_lengths.clamp(min=1)
    return (chosen_avg - rejected_avg - 1.0 / (2.0 * x.beta)) ** 2
