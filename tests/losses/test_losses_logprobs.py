"""completion_logps, token_mean_nll and the plain reference sequence_logps_from_logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpo.losses import completion_logps, sequence_logps_from_logits, token_mean_nll

T = torch.tensor


def _packed_problem(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """B = 3 rows of T = 9 positions, V = 11, H = 6; about half the labels are the real id 0."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, 6, generator=g, dtype=dtype)
    weight = torch.randn(11, 6, generator=g, dtype=dtype)
    bias = torch.randn(11, generator=g, dtype=dtype)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[torch.rand(3, 9, generator=g) < 0.5] = 0
    mask = torch.rand(3, 9, generator=g) < 0.7
    mask[2] = False  # a row with no completion token
    mask[0, 0] = True
    return {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, "mask": mask}


def _gathered(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, H) hidden at masked positions, their targets and row ids."""
    rows = torch.arange(p["mask"].shape[0]).unsqueeze(1).expand_as(p["mask"])
    return p["hidden"][p["mask"]], p["labels"][p["mask"]], rows[p["mask"]]


def test_sequence_logps_from_logits_hand_value() -> None:
    """Uniform logits over V = 4: each counted token scores -ln 4; 3 tokens -> -4.1588831.

    Label id 0 counts where the mask says so; -100 under mask False is never read.
    """
    logits = torch.zeros(2, 4, 4)
    labels = T([[0, 3, 0, -100], [1, 2, 3, 0]])
    mask = T([[True, True, True, False], [False, False, False, False]])
    out = sequence_logps_from_logits(logits, labels, mask)
    torch.testing.assert_close(out, T([-3 * math.log(4), 0.0]))


def test_completion_logps_matches_reference_values_and_grads() -> None:
    p = _packed_problem(0)
    leaves = [p[k].requires_grad_() for k in ("hidden", "weight", "bias")]
    hidden, targets, rows = _gathered(p)
    sums, counts, token_logps = completion_logps(hidden, p["weight"], p["bias"], targets, rows, 3)

    assert (targets == 0).sum() >= 3  # id 0 really is among the targets
    torch.testing.assert_close(counts, p["mask"].sum(1))
    assert counts.dtype == torch.int64 and counts[2] == 0 and sums[2] == 0.0
    logits = F.linear(p["hidden"], p["weight"], p["bias"])
    expected = sequence_logps_from_logits(logits, p["labels"], p["mask"])
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        token_logps, logits.log_softmax(-1)[p["mask"]].gather(1, targets[:, None])[:, 0]
    )

    (sums * T([1.0, -2.0, 3.0])).sum().backward()
    ours = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    (expected * T([1.0, -2.0, 3.0])).sum().backward()
    for mine, ref in zip(ours, (x.grad for x in leaves), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunked_equals_plain_values_and_grads(chunk_size: int) -> None:
    p = _packed_problem(1)
    hidden, targets, rows = _gathered(p)
    results = []
    for size in (4096, chunk_size):
        h = hidden.detach().clone().requires_grad_()
        w = p["weight"].clone().requires_grad_()
        b = p["bias"].clone().requires_grad_()
        sums, _, token_logps = completion_logps(h, w, b, targets, rows, 3, chunk_size=size)
        (sums.sum() + token_logps.square().sum()).backward()
        results.append((sums.detach(), token_logps.detach(), h.grad, w.grad, b.grad))
    assert hidden.shape[0] > chunk_size
    for plain, chunked in zip(*results, strict=True):
        # rtol 1e-5: a 1-row matmul and a 20-row matmul round differently in the last bits.
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def _saved_shapes(fn) -> list[tuple[int, ...]]:  # noqa: ANN001
    shapes: list[tuple[int, ...]] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return shapes


def test_chunked_backward_keeps_no_logits_alive() -> None:
    """Plain mode saves an (N, V) logits tensor for backward; chunked mode saves none of shape (*, V)."""
    n, h, v = 40, 8, 1000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets, rows = torch.randint(0, v, (n,)), torch.arange(n) % 4
    plain = _saved_shapes(lambda: completion_logps(hidden, weight, None, targets, rows, 4))
    chunked = _saved_shapes(lambda: completion_logps(hidden, weight, None, targets, rows, 4, chunk_size=5))
    assert (n, v) in plain
    assert not [s for s in chunked if s and s[-1] == v]


def test_chunked_without_grad_matches() -> None:
    p = _packed_problem(2)
    hidden, targets, rows = _gathered(p)
    plain = completion_logps(hidden, p["weight"], p["bias"], targets, rows, 3)
    with torch.no_grad():
        chunked = completion_logps(hidden, p["weight"], p["bias"], targets, rows, 3, chunk_size=2)
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64_chunked() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    targets, rows = T([0, 6, 0, 2, 3]), T([0, 0, 1, 1, 1])

    def sums(hh: torch.Tensor, ww: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
        return completion_logps(hh, ww, bb, targets, rows, 2, chunk_size=2)[0]

    assert sums(hidden, weight, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(sums, (hidden, weight, bias))


def test_bf16_inputs_give_fp32_sums() -> None:
    """A 300-token completion in bf16: ours stays within 1e-3 nats of an fp64 sum of the same bf16
    logits; the original's recipe (bf16 log-softmax, bf16 sum) is off by more than 0.5 nats."""
    g = torch.Generator().manual_seed(4)
    n, h, v = 300, 16, 64
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (0.25 * torch.randn(v, h, generator=g)).bfloat16()  # ~4.6 nats/token, sum ~ -1379
    targets, rows = torch.randint(0, v, (n,), generator=g), torch.zeros(n, dtype=torch.long)
    sums, _, token_logps = completion_logps(hidden, weight, None, targets, rows, 1, chunk_size=128)
    assert sums.dtype == token_logps.dtype == torch.float32

    logits = F.linear(hidden, weight)  # the same bf16 logits both ways
    exact = logits.double().log_softmax(-1).gather(1, targets[:, None]).sum().item()
    bf16_recipe = logits.log_softmax(-1).gather(1, targets[:, None]).sum(dtype=torch.bfloat16).item()
    assert abs(sums.item() - exact) < 1e-3
    assert abs(bf16_recipe - exact) > 0.5  # measured 2.76: bf16 has an 8-nat step at 1379


def test_empty_completion_set() -> None:
    sums, counts, token_logps = completion_logps(
        torch.zeros(0, 4),
        torch.randn(5, 4),
        None,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        2,
    )
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0] and token_logps.shape == (0,)


def test_token_mean_nll_hand_values() -> None:
    """Tokens of segments 0 and 2: -(-1 - 2 - 4) / 3 = 7/3; segment 1 (-3, and a -inf) is excluded."""
    token_logps = T([-1.0, -2.0, -3.0, float("-inf"), -4.0])
    segments = T([0, 0, 1, 1, 2])
    by_mask = token_mean_nll(token_logps, segments, T([True, False, True]))
    by_ids = token_mean_nll(token_logps, segments, T([0, 2]))
    assert by_mask.item() == by_ids.item() == pytest.approx(7 / 3, abs=1e-6)
    assert token_mean_nll(token_logps, segments, T([False, False, False])).item() == 0.0


def test_token_mean_nll_is_a_token_mean_with_grad() -> None:
    """Not a mean of per-sequence means: segment 0 has 3 tokens, segment 1 has 1."""
    token_logps = T([-1.0, -1.0, -1.0, -5.0], requires_grad=True)
    nll = token_mean_nll(token_logps, T([0, 0, 0, 1]), T([0, 1]))
    nll.backward()
    assert nll.item() == pytest.approx(2.0)  # (1 + 1 + 1 + 5) / 4, not (1 + 5) / 2 = 3
    torch.testing.assert_close(token_logps.grad, torch.full((4,), -0.25))


def test_error_messages() -> None:
    w = torch.randn(5, 4)
    ids = torch.zeros(3, dtype=torch.long)
    cases = [
        (
            lambda: completion_logps(torch.zeros(3, 4, 1), w, None, ids, ids, 1),
            "hidden must have shape (N, H), got (3, 4, 1)",
        ),
        (
            lambda: completion_logps(torch.zeros(3, 2), w, None, ids, ids, 1),
            "lm_head_weight must have shape (V, H=2), got (5, 4)",
        ),
        (
            lambda: completion_logps(torch.zeros(3, 4), w, None, ids[:2], ids, 1),
            "target_ids must have shape (N=3,) like hidden, got (2,)",
        ),
        (
            lambda: completion_logps(torch.zeros(3, 4), w, None, ids, ids.float(), 1),
            "segment_ids must hold integer ids, got dtype torch.float32",
        ),
        (
            lambda: completion_logps(torch.zeros(3, 4), w, None, ids, ids, 1, chunk_size=0),
            "chunk_size must be >= 1, got 0",
        ),
        (
            lambda: sequence_logps_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.ones(1, 2)),
            "mask must be a bool tensor, got dtype torch.float32",
        ),
        (
            lambda: sequence_logps_from_logits(
                torch.zeros(1, 2, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
            ),
            "expected logits (B, T, V), labels (B, T), mask (B, T), got (1, 2, 3), (1, 3), (1, 3)",
        ),
        (
            lambda: token_mean_nll(torch.zeros(3), torch.zeros(2, dtype=torch.long), T([0])),
            "token_logps and segment_ids must both have shape (N,), got (3,) and (2,)",
        ),
        (
            lambda: token_mean_nll(torch.zeros(2), torch.zeros(2, dtype=torch.long), T([[0]])),
            "chosen_segments must be 1-D, got shape (1, 1)",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
