"""Loss terms and the MPO mixture: hand-worked values, properties, errors.

Hand values used below (beta = 0.1, u_c = pi_c - ref_c = 2, u_r = pi_r - ref_r = -1):
    sigmoid  = -log sigmoid(0.1 * 3)                        = log(1 + e^-0.3)          = 0.5543552
    bco_pair = -log sigmoid(0.2) - log sigmoid(0.1)         = 0.5981389 + 0.6443967    = 1.2425355
    bco_pair, delta 0.05: 2 * -log sigmoid(0.15)            = 2 * 0.6209570            = 1.2419141
    hinge    = relu(1 - 0.3)                                                           = 0.7
    ipo, n_c = 4, n_r = 2: (2/4 - (-1/2) - 1/(2*0.1))^2     = (1 - 5)^2                = 16.0
    MPO, chosen_nll 1.5: 0.8 * 0.5543552 + 0.2 * 1.2425355 + 1.5                       = 2.1919913
    d MPO / d pi_c = -0.8 * 0.1 * sigmoid(-0.3) - 0.2 * 0.1 * sigmoid(-0.2)
                   = -0.0340446 - 0.0090033                                            = -0.0430479
    d MPO / d pi_r = +0.8 * 0.1 * sigmoid(-0.3) + 0.2 * 0.1 * sigmoid(-0.1)
                   = 0.0340446 + 0.0095004                                             = 0.0435450
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo.losses import (
    LOSSES,
    LossInputs,
    bco_pair_loss,
    check_loss_types,
    hinge_loss,
    ipo_loss,
    mpo_loss,
    mpo_loss_with_rewards,
    sigmoid_loss,
)

T = torch.tensor


def _pair(u_c: float = 2.0, u_r: float = -1.0) -> tuple[torch.Tensor, ...]:
    """Policy logps (u_c, u_r) with reference 0, so the log-ratios are exactly (u_c, u_r)."""
    pc = T([u_c]).requires_grad_()
    pr = T([u_r]).requires_grad_()
    return pc, pr, T([0.0]), T([0.0])


def test_single_terms_hand_values() -> None:
    x = LossInputs(T([2.0]), T([-1.0]), beta=0.1, chosen_lengths=T([4]), rejected_lengths=T([2]))
    assert sigmoid_loss(x).item() == pytest.approx(0.5543552, abs=1e-6)
    assert bco_pair_loss(x).item() == pytest.approx(1.2425355, abs=1e-6)
    assert hinge_loss(x).item() == pytest.approx(0.7, abs=1e-6)
    assert ipo_loss(x).item() == pytest.approx(16.0, abs=1e-5)
    shifted = LossInputs(T([2.0]), T([-1.0]), beta=0.1, delta=0.05)
    assert bco_pair_loss(shifted).item() == pytest.approx(1.2419141, abs=1e-6)


def test_mpo_loss_hand_value_grads_and_metrics() -> None:
    pc, pr, rc, rr = _pair()
    loss, metrics = mpo_loss(pc, pr, rc, rr, T(1.5))
    loss.backward()
    assert loss.item() == pytest.approx(2.1919913, abs=1e-6)
    assert pc.grad.item() == pytest.approx(-0.0430479, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.0435450, abs=1e-6)
    expected = {
        "loss": 2.1919913,
        "loss/sigmoid": 0.5543552,
        "loss/sigmoid_weighted": 0.4434842,
        "loss/bco_pair": 1.2425355,
        "loss/bco_pair_weighted": 0.2485071,
        "loss/sft": 1.5,
        "loss/sft_weighted": 1.5,
        "rewards/chosen": 0.2,  # true beta-rewards, not 2.0x as InternVL/TRL 0.21 log them
        "rewards/rejected": -0.1,
        "rewards/margins": 0.3,
        "rewards/accuracies": 1.0,
        "logps/chosen": 2.0,
        "logps/rejected": -1.0,
        "delta": 0.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
        assert type(metrics[key]) is float, key


def test_batch_reduction_and_accuracy_with_a_tie() -> None:
    """B = 2: each term is a batch mean; a tie (equal rewards) is not counted as accurate."""
    pc, pr = T([2.0, 0.5]), T([-1.0, 0.5])
    zeros = torch.zeros(2)
    _, metrics = mpo_loss(pc, pr, zeros, zeros, T(0.0), loss_types=("sigmoid",), loss_weights=(1.0,))
    # pair 2 has logit 0: -log sigmoid(0) = ln 2 = 0.6931472
    assert metrics["loss/sigmoid"] == pytest.approx((0.5543552 + 0.6931472) / 2, abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["rewards/margins"] == pytest.approx(0.15, abs=1e-6)


def test_delta_shifts_only_bco_and_is_reported() -> None:
    pc, pr, rc, rr = _pair()
    _, m0 = mpo_loss(pc, pr, rc, rr, T(1.5), delta=0.0)
    _, m1 = mpo_loss(pc, pr, rc, rr, T(1.5), delta=0.05)
    assert m1["loss/bco_pair"] == pytest.approx(1.2419141, abs=1e-6)
    assert m1["loss/sigmoid"] == m0["loss/sigmoid"] and m1["loss/sft"] == m0["loss/sft"]
    assert m1["loss"] - m0["loss"] == pytest.approx(0.2 * (1.2419141 - 1.2425355), abs=1e-6)
    assert m1["delta"] == 0.05


def test_rewards_are_detached_fp32_and_match_beta_logratios() -> None:
    pc = T([-3.0, -5.0], dtype=torch.bfloat16).requires_grad_()
    pr = T([-4.0, -4.0], dtype=torch.bfloat16).requires_grad_()
    rc, rr = T([-3.5, -5.0]), T([-3.0, -4.5])
    out = mpo_loss_with_rewards(pc, pr, rc, rr, T(2.0), beta=0.5)
    for rewards in (out.chosen_rewards, out.rejected_rewards):
        assert not rewards.requires_grad and rewards.grad_fn is None and rewards.dtype == torch.float32
    torch.testing.assert_close(out.chosen_rewards, T([0.25, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, T([-0.5, 0.25]))
    assert out.loss.dtype == torch.float32
    out.loss.backward()  # gradients still reach the bf16 policy log-probs
    assert pc.grad is not None and pc.grad.dtype == torch.bfloat16


def test_reference_logps_get_no_gradient() -> None:
    pc, pr = T([2.0]).requires_grad_(), T([-1.0]).requires_grad_()
    rc, rr = T([0.0]).requires_grad_(), T([0.0]).requires_grad_()
    loss, _ = mpo_loss(pc, pr, rc, rr, T(1.5))
    loss.backward()
    assert rc.grad is None and rr.grad is None


def test_zero_weight_removes_a_term_values_and_grads() -> None:
    pc1, pr1, rc, rr = _pair()
    pc2, pr2, _, _ = _pair()
    nll = T(1.5)
    with_zero, _ = mpo_loss(pc1, pr1, rc, rr, nll, loss_weights=(0.8, 0.0, 1.0))
    without, _ = mpo_loss(pc2, pr2, rc, rr, nll, loss_types=("sigmoid", "sft"), loss_weights=(0.8, 1.0))
    with_zero.backward()
    without.backward()
    assert with_zero.item() == without.item() == pytest.approx(0.8 * 0.5543552 + 1.5, abs=1e-6)
    assert pc1.grad.item() == pc2.grad.item() and pr1.grad.item() == pr2.grad.item()


def test_zero_weight_term_cannot_leak_nan() -> None:
    pc, pr, rc, rr = _pair()
    loss, metrics = mpo_loss(pc, pr, rc, rr, T(float("nan")), loss_weights=(0.8, 0.2, 0.0))
    assert math.isfinite(loss.item()) and math.isnan(metrics["loss/sft"])
    assert loss.item() == pytest.approx(0.8 * 0.5543552 + 0.2 * 1.2425355, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    u_c=st.floats(-50, 50),
    u_r=st.floats(-50, 50),
    step=st.floats(0.01, 10),
    delta=st.floats(-2, 2),
    name=st.sampled_from(["sigmoid", "bco_pair", "hinge"]),
)
def test_preferring_chosen_never_raises_the_loss(
    u_c: float, u_r: float, step: float, delta: float, name: str
) -> None:
    """Raising u_c (or lowering u_r) never increases a pairwise loss (strictly for sigmoid/BCO)."""

    def term(uc: float, ur: float) -> float:
        x = LossInputs(T([uc], dtype=torch.float64), T([ur], dtype=torch.float64), beta=0.1, delta=delta)
        return LOSSES[name].fn(x).item()

    base = term(u_c, u_r)
    for better in (term(u_c + step, u_r), term(u_c, u_r - step)):
        assert better <= base
        if name != "hinge":
            assert better < base


def test_registry_facts() -> None:
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo", "bco_pair", "sft"}
    assert [n for n, s in LOSSES.items() if s.uses_delta] == ["bco_pair"]
    assert [n for n, s in LOSSES.items() if not s.needs_reference] == ["sft"]
    with pytest.raises(TypeError):
        LOSSES["new"] = LOSSES["sigmoid"]  # type: ignore[index]


VALID = "['bco_pair', 'hinge', 'ipo', 'sft', 'sigmoid']"


@pytest.mark.parametrize(
    ("types", "weights", "message"),
    [
        (("sigmoid", "dpo"), (1.0, 1.0), f"unknown loss type(s) ['dpo'] in loss_types; valid names: {VALID}"),
        ((), (), f"loss_types is empty; valid names: {VALID}"),
        (
            ("sigmoid", "sft"),
            (0.8,),
            "loss_weights has 1 entries but loss_types has 2: [0.8] vs ['sigmoid', 'sft']",
        ),
        (("sft", "sft"), (1.0, 1.0), "loss_types lists ['sft'] more than once"),
        (("sigmoid",), (-1.0,), "loss_weights must be finite and >= 0, got [-1.0]"),
        (("sigmoid",), (float("inf"),), "loss_weights must be finite and >= 0, got [inf]"),
        (("sigmoid", "sft"), (0.0, 0.0), "all loss_weights are 0 ([0.0, 0.0]): nothing to train"),
    ],
)
def test_bad_loss_config_messages(types: tuple, weights: tuple, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_loss_types(types, weights)
    assert str(err.value) == message
    pc, pr, rc, rr = _pair()
    with pytest.raises(ValueError) as err:
        mpo_loss(pc, pr, rc, rr, T(1.0), loss_types=types, loss_weights=weights)
    assert str(err.value) == message


def test_bad_input_messages() -> None:
    pc, pr, rc, rr = _pair()
    with pytest.raises(ValueError) as err:
        mpo_loss(pc, T([1.0, 2.0]), rc, rr, T(1.0))
    assert str(err.value) == (
        "policy_rejected_logps must have shape (B,) with B >= 1 like the other log-probs, got "
        "{'policy_chosen_logps': (1,), 'policy_rejected_logps': (2,), 'ref_chosen_logps': (1,), "
        "'ref_rejected_logps': (1,)}"
    )
    with pytest.raises(
        ValueError, match=r"^chosen_nll must be a scalar tensor \(shape \(\)\), got shape \(1,\)$"
    ):
        mpo_loss(pc, pr, rc, rr, T([1.0]))
    with pytest.raises(ValueError, match=r"^beta must be finite and > 0, got 0.0$"):
        mpo_loss(pc, pr, rc, rr, T(1.0), beta=0.0)
    with pytest.raises(ValueError, match=r"^delta must be finite, got nan$"):
        mpo_loss(pc, pr, rc, rr, T(1.0), delta=float("nan"))
    with pytest.raises(ValueError) as err:
        mpo_loss(pc, pr, rc, rr, T(1.0), loss_types=("ipo",), loss_weights=(1.0,))
    assert str(err.value) == (
        "loss 'ipo' needs chosen_lengths and rejected_lengths (completion token counts, shape (B,))"
    )


def test_metrics_cost_one_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """All logged floats come from a single ``.tolist()``; no ``.item()`` per metric."""
    calls: list[str] = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counting_tolist(self: torch.Tensor):  # noqa: ANN202
        calls.append("tolist")
        return tolist(self)

    def counting_item(self: torch.Tensor):  # noqa: ANN202
        calls.append("item")
        return item(self)

    pc, pr, rc, rr = (torch.randn(4) for _ in range(4))
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    mpo_loss(pc, pr, rc, rr, T(1.0))
    assert calls == ["tolist"]
