"""RunningMean (the BCO shift delta) and rewards_mean.

Hand-worked sequence: updates 0.5, -0.1, 0.3 from (mean 0, count 1e-24):
    step 1: 0 + (0.5 - 0) * 1 / (1e-24 + 1)          = 0.5   (count ~1)
    step 2: 0.5 + (-0.1 - 0.5) * 1 / 2                = 0.2   (count ~2)
    step 3: 0.2 + (0.3 - 0.2) * 1 / 3                 = 0.2333333 = (0.5 - 0.1 + 0.3) / 3
With n = 3 at step 2 instead: 0.5 + (-0.6) * 3 / 4   = 0.05.
"""

from __future__ import annotations

import pytest
import torch

from mpo.losses import RunningMean, implicit_rewards, mpo_loss, rewards_mean


def test_hand_worked_sequence() -> None:
    running = RunningMean()
    assert running.value == 0.0
    assert [running.update(x) for x in (0.5, -0.1, 0.3)] == pytest.approx([0.5, 0.2, 0.7 / 3], abs=1e-12)
    assert running.count == pytest.approx(3.0)


def test_weighted_update() -> None:
    running = RunningMean()
    running.update(0.5)
    assert running.update(-0.1, n=3) == pytest.approx(0.05, abs=1e-12)
    assert running.count == pytest.approx(4.0)


def test_state_dict_round_trip_resumes_identically() -> None:
    straight = RunningMean()
    for x in (0.5, -0.1, 0.3, 0.9):
        straight.update(x)

    first = RunningMean()
    first.update(0.5)
    first.update(-0.1)
    saved = first.state_dict()
    assert saved == {"value": pytest.approx(0.2), "count": pytest.approx(2.0)}
    resumed = RunningMean()
    resumed.load_state_dict(saved)
    resumed.update(0.3)
    resumed.update(0.9)
    assert resumed.value == straight.value and resumed.count == straight.count
    assert resumed.value == pytest.approx((0.5 - 0.1 + 0.3 + 0.9) / 4, abs=1e-12)


def test_all_reduce_hook_is_called_and_its_result_used() -> None:
    """A fake 2-rank mean: the other rank's batch mean is always 1.0."""
    seen: list[float] = []

    def mean_over_ranks(x: float) -> float:
        seen.append(x)
        return (x + 1.0) / 2

    running = RunningMean(all_reduce=mean_over_ranks)
    running.update(0.5)
    running.update(-0.1)
    assert seen == [0.5, -0.1]
    assert running.value == pytest.approx((0.75 + 0.45) / 2, abs=1e-12)
    assert running.state_dict().keys() == {"value", "count"}  # the hook is not state


def test_a_rank_without_pairs_passes_none_and_the_others_decide() -> None:
    """A rank whose rows were all bad passes None: the reducer leaves it out; with no pair anywhere (or in one
    process) δ stays."""
    assert RunningMean(value=0.5, count=2.0).update(None) == 0.5
    others = RunningMean(all_reduce=lambda x: 0.25 if x is None else (x + 0.25) / 2)
    assert others.update(None) == pytest.approx(0.25)
    nobody = RunningMean(value=0.5, count=2.0, all_reduce=lambda x: None)
    assert nobody.update(None) == 0.5 and nobody.count == 2.0


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"value": 0.1}, "RunningMean state must have keys ['count', 'value'], got ['value']"),
        (
            {"value": 0.1, "count": 1.0, "var": 0.0},
            "RunningMean state must have keys ['count', 'value'], got ['count', 'value', 'var']",
        ),
        ({"value": float("nan"), "count": 1.0}, "RunningMean state field 'value' must be finite, got nan"),
        ({"value": 0.1, "count": 0.0}, "RunningMean state field 'count' must be finite and > 0, got 0.0"),
    ],
)
def test_load_state_dict_errors(state: dict, message: str) -> None:
    running = RunningMean()
    with pytest.raises(ValueError) as err:
        running.load_state_dict(state)
    assert str(err.value) == message
    assert running.state_dict() == {"value": 0.0, "count": 1e-24}  # unchanged


def test_update_errors() -> None:
    running = RunningMean()
    with pytest.raises(ValueError, match=r"^RunningMean.update: n must be >= 1, got 0$"):
        running.update(0.1, n=0)
    with pytest.raises(ValueError, match=r"^RunningMean.update: batch_mean must be finite, got inf"):
        running.update(float("inf"))
    assert running.value == 0.0


def test_rewards_mean_is_over_all_2b_values() -> None:
    """(0.2 + 0.4 - 0.1 + 0.1) / 4 = 0.15."""
    chosen = torch.tensor([0.2, 0.4], requires_grad=True)
    assert rewards_mean(chosen, torch.tensor([-0.1, 0.1])) == pytest.approx(0.15, abs=1e-7)
    with pytest.raises(ValueError) as err:
        rewards_mean(torch.zeros(2), torch.zeros(3))
    assert (
        str(err.value) == "chosen_rewards and rejected_rewards must both have shape (B,), got (2,) and (3,)"
    )


def test_documented_update_order_first_step() -> None:
    """Step 1 of a run, B = 1, beta 0.1, u_c = 2, u_r = -1: rewards 0.2 and -0.1, mean 0.05.

    delta includes the current batch, so after the update delta = 0.05 (not 0), and the BCO term
    is 2 * -log sigmoid(0.15) = 1.2419141 (test_losses_terms.py works it out).
    """
    pc, pr, ref = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.0])
    running = RunningMean()
    delta = running.update(rewards_mean(implicit_rewards(pc, ref, 0.1), implicit_rewards(pr, ref, 0.1)))
    assert delta == pytest.approx(0.05, abs=1e-7)
    _, metrics = mpo_loss(pc, pr, ref, ref, torch.tensor(1.0), delta=delta)
    assert metrics["loss/bco_pair"] == pytest.approx(1.2419141, abs=1e-6)
    assert metrics["delta"] == delta
