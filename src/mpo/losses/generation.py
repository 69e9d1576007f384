"""MPO's "generation" term: SFT (NLL) on the chosen completions.

Unlike the pairwise losses, ``sft`` has no per-pair vector. It is the token mean of the NLL over
ALL chosen completion tokens of the micro-batch, as in TRL 1.16 and InternVL:

    L_sft = sum_{chosen tokens t} -log pi(t) / (number of chosen tokens)        shape ()

so a long chosen answer weighs more than a short one. TRL broadcasts this scalar to every pair and
then averages, which is a no-op; we return the scalar. At B = 1 it is the MPO paper's
``-log pi(y_c | x) / |y_c|``. The caller computes it with :func:`mpo.losses.token_mean_nll`.
"""

from __future__ import annotations

from torch import Tensor

from mpo.losses.preference import LossInputs

__all__ = ["sft_loss"]


def sft_loss(x: LossInputs) -> Tensor:
    """Return ``chosen_nll``, shape () (the micro-batch token mean).

    Raises:
        ValueError: if ``chosen_nll`` is missing.
    """
    if x.chosen_nll is None:
        raise ValueError("loss 'sft' needs chosen_nll (token-mean NLL of the chosen completions, shape ())")
    return x.chosen_nll
