"""MPO's "quality" term: BCO pair loss with an explicit reward shift delta.

    r_c = beta * u_c,  r_r = beta * u_r
    L_i = -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))          shape (B,)

Each completion is judged on its own (absolute quality) against the shift ``delta``, the running
mean of past rewards kept by :class:`mpo.losses.RunningMean`. ``delta`` is a constant here: no
gradient flows into it.

Worked example (beta = 0.1, u_c = 2, u_r = -1, delta = 0): -log sigmoid(0.2) - log sigmoid(0.1)
= 0.598139 + 0.644397 = 1.242536. With delta = 0.05: -log sigmoid(0.15) - log sigmoid(0.15)
= 2 * 0.620957 = 1.241914.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mpo.losses.preference import LossInputs

__all__ = ["bco_pair_loss"]


def bco_pair_loss(x: LossInputs) -> Tensor:
    """BCO pair loss, shape (B,). With ``delta = 0`` it equals TRL 1.16's ``bco_pair``."""
    chosen_rewards = x.beta * x.chosen_logratios
    rejected_rewards = x.beta * x.rejected_logratios
    return -F.logsigmoid(chosen_rewards - x.delta) - F.logsigmoid(-(rejected_rewards - x.delta))
