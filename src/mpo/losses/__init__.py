"""mpo.losses: MPO loss math and log-prob kernels as pure tensor functions.

Knows no model, config or dataset: tensors and floats in, tensors plus a metrics dict out.

* :func:`mpo_loss` / :func:`mpo_loss_with_rewards`: the weighted mixture over :data:`LOSSES`;
* :class:`RunningMean`, :func:`rewards_mean`: the BCO reward shift delta, checkpointable;
* :func:`completion_logps`, :func:`token_mean_nll`: fp32 log-prob sums over completion tokens
  from gathered hidden states; :func:`sequence_logps_from_logits` is the plain reference.

One training micro-step, rows packed as [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]::

    sums, counts, tok = completion_logps(h_sel, head.weight, head.bias, targets, seg, 2 * B)
    with torch.no_grad():
        ref_sums, _, _ = completion_logps(ref_h_sel, ref_head.weight, ref_head.bias, targets, seg, 2 * B)
    nll = token_mean_nll(tok, seg, torch.arange(B))
    r_c = implicit_rewards(sums[:B], ref_sums[:B], beta)
    r_r = implicit_rewards(sums[B:], ref_sums[B:], beta)
    delta = running.update(rewards_mean(r_c, r_r))        # training only; eval uses running.value
    loss, metrics = mpo_loss(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], nll, beta=beta, delta=delta)
"""

from mpo.losses.generation import sft_loss
from mpo.losses.logprobs import completion_logps, sequence_logps_from_logits, token_mean_nll
from mpo.losses.mixed import (
    LOSSES,
    LossSpec,
    MPOLossOutput,
    check_loss_types,
    implicit_rewards,
    mpo_loss,
    mpo_loss_with_rewards,
)
from mpo.losses.preference import LossInputs, hinge_loss, ipo_loss, sigmoid_loss
from mpo.losses.quality import bco_pair_loss
from mpo.losses.running import RunningMean, rewards_mean

__all__ = [
    "LOSSES",
    "LossInputs",
    "LossSpec",
    "MPOLossOutput",
    "RunningMean",
    "bco_pair_loss",
    "check_loss_types",
    "completion_logps",
    "hinge_loss",
    "implicit_rewards",
    "ipo_loss",
    "mpo_loss",
    "mpo_loss_with_rewards",
    "rewards_mean",
    "sequence_logps_from_logits",
    "sft_loss",
    "sigmoid_loss",
    "token_mean_nll",
]
