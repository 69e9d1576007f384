"""The BCO reward shift delta as explicit, checkpointable state.

InternVL MPO (via TRL 0.21 ``RunningMoments``) shifts the BCO rewards by delta, the cumulative
mean of the per-micro-step mean reward. The original keeps it inside the trainer and loses it on
resume; here the trainer owns a :class:`RunningMean` and saves ``state_dict()`` in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["RunningMean", "rewards_mean"]

# TRL's RunningMoments starts at count 1e-24 (not 0) so the first update needs no special case:
# the first batch mean then replaces the initial 0 almost exactly.
_INITIAL_COUNT = 1e-24


def rewards_mean(chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
    """Mean over the 2B values ``{r_c_i} + {r_r_i}``; (B,), (B,) -> float (one host sync).

    This is the per-micro-step value fed to :meth:`RunningMean.update`.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            "chosen_rewards and rejected_rewards must both have shape (B,), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    total = chosen_rewards.detach().float().sum() + rejected_rewards.detach().float().sum()
    return (total / (2 * chosen_rewards.numel())).item()


@dataclass
class RunningMean:
    """Cumulative (equal-weight, not exponential) mean of per-step reward means: BCO's delta.

    Update order, per training micro-step (InternVL/TRL semantics, "including the current batch"):

    1. forward policy and reference; ``r_c, r_r = beta * (logps - ref_logps)``, detached (B,);
    2. ``delta = running.update(rewards_mean(r_c, r_r))``: the current batch enters delta
       BEFORE the loss is computed;
    3. ``mpo_loss(..., delta=delta)``.

    Never call :meth:`update` during evaluation; pass ``running.value`` instead.

    ``update(x, n)`` does ``mean <- mean + (x - mean) * n / (count + n)``; ``count <- count + n``,
    starting from mean 0 and count 1e-24. Worked example: updates 1.0, 3.0, 2.0 give means
    1.0, 2.0, 2.0 (exactly the running average of the inputs).

    Distributed: ``all_reduce`` maps this rank's batch mean to the mean over ranks (e.g. an
    ``all_reduce(SUM) / world_size`` wrapper the trainer supplies; this module imports no
    distributed code). InternVL counts world_size per step; we count ``n`` per step. The update
    ratio ``n / (count + n)`` after k steps is 1 / (k + 1) either way, so delta is identical.

    Attributes:
        value: current delta (0.0 before any update).
        count: total weight seen so far.
        all_reduce: optional cross-rank mean of a float; not part of the saved state.
    """

    value: float = 0.0
    count: float = _INITIAL_COUNT
    all_reduce: Callable[[float], float] | None = field(default=None, repr=False, compare=False)

    def update(self, batch_mean: float | None, n: int = 1) -> float:
        """Fold one step's mean reward into the running mean and return the new value.

        ``None``: this rank had no usable pair in the step (all its rows were bad). Under ``all_reduce`` the other
        ranks' means decide (the reducer gets ``None`` and must leave this rank out); when no rank had a pair,
        or in one process, delta stays as it is.
        """
        if n <= 0:
            raise ValueError(f"RunningMean.update: n must be >= 1, got {n}")
        x = batch_mean if self.all_reduce is None else self.all_reduce(batch_mean)
        if x is None:
            return self.value
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"RunningMean.update: batch_mean must be finite, got {x} (after all_reduce)")
        total = self.count + n
        self.value = self.value + (x - self.value) * n / total
        self.count = total
        return self.value

    def state_dict(self) -> dict[str, float]:
        """``{"value": float, "count": float}``, for the checkpoint."""
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: a missing or extra key, or a non-finite value / negative count.
        """
        keys = set(state)
        if keys != {"value", "count"}:
            raise ValueError(f"RunningMean state must have keys ['count', 'value'], got {sorted(keys)}")
        value, count = float(state["value"]), float(state["count"])
        if not math.isfinite(value):
            raise ValueError(f"RunningMean state field 'value' must be finite, got {value}")
        if not (math.isfinite(count) and count > 0.0):
            raise ValueError(f"RunningMean state field 'count' must be finite and > 0, got {count}")
        self.value, self.count = value, count
