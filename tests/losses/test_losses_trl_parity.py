"""Parity with TRL 1.16's own DPOTrainer loss code (``DPOTrainer._compute_loss``).

A tiny random Qwen2 (vocab 16, word-level tokenizer where id 0 is the real token "!") is the
policy; a second one with another seed is the reference, so the log-ratios are not zero. TRL runs
its full ``_compute_loss`` (fused LM head, its collator's batch); we run the same backbone, gather
the hidden states that predict completion tokens, and call ``completion_logps`` + ``token_mean_nll``
+ ``mpo_loss_with_rewards`` (delta = 0). Everything is fp32.

Tolerances (stated once): loss and metrics within 1e-6 absolute (the loss is ~3.6); every
parameter gradient within 1e-6 absolute + 1e-5 relative (the two sides sum the same float32 terms
in a different order, so exact equality is not expected).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("trl", reason="TRL is a test dependency: pip install 'mpo[test]'")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from mpo.losses import MPOLossOutput, completion_logps, mpo_loss_with_rewards, token_mean_nll  # noqa: E402

WORDS = ["!", "<pad>", "<eos>", *"abcdefghijklm"]
MPO_TYPES = ["sigmoid", "bco_pair", "sft"]
MPO_WEIGHTS = [0.8, 0.2, 1.0]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.3,  # sharper distributions than the default 0.02: rewards of order 0.1-1
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).train()


@pytest.fixture(scope="module")
def trl_setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DPOTrainer, dict[str, torch.Tensor]]]:
    """A DPOTrainer with the MPO config and one collated batch of 3 pairs (6 rows)."""
    ds = Dataset.from_dict(
        {
            "prompt": ["a b c", "d e", "f g h i"],
            "chosen": [" ! d e", " ! ! a", " b"],
            "rejected": [" f", " g h i j k", " ! c"],
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        loss_type=list(MPO_TYPES),
        loss_weights=list(MPO_WEIGHTS),
        beta=0.1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=3,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=_model(0), ref_model=_model(1), args=args, train_dataset=ds, processing_class=_tokenizer()
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    # The batch must contain a real id-0 token inside a completion, or the test proves less.
    assert bool(((batch["input_ids"] == 0) & (batch["completion_mask"] == 1)).any())
    yield trainer, batch


def _trl_loss_and_grads(trainer: DPOTrainer, batch: dict[str, torch.Tensor]) -> tuple[float, dict, dict]:
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grads, metrics


def _our_loss(
    trainer: DPOTrainer,
    batch: dict[str, torch.Tensor],
    types: list[str],
    weights: list[float],
    chunk_size: int,
) -> tuple[MPOLossOutput, dict]:
    """Our path on the same model: gather predicting positions, then mpo.losses only."""
    trainer.model.zero_grad(set_to_none=True)
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1): position t predicts token t+1
    targets = batch["input_ids"][:, 1:][mask]
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]

    def logps(model: Qwen2ForCausalLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = model.model(**kwargs, use_cache=False).last_hidden_state[:, :-1][mask]
        head = model.get_output_embeddings()
        return completion_logps(
            hidden, head.weight, head.bias, targets, rows, mask.shape[0], chunk_size=chunk_size
        )

    sums, counts, token_logps = logps(trainer.model)
    with torch.no_grad():
        ref_sums, _, _ = logps(trainer.ref_model)
    b = mask.shape[0] // 2  # rows are [chosen..., rejected...]
    nll = token_mean_nll(token_logps, rows, torch.arange(b))
    out = mpo_loss_with_rewards(
        sums[:b],
        sums[b:],
        ref_sums[:b],
        ref_sums[b:],
        nll,
        beta=trainer.beta,
        loss_types=types,
        loss_weights=weights,
        delta=0.0,
        chosen_lengths=counts[:b],
        rejected_lengths=counts[b:],
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("chunk_size", [4096, 5])
def test_mpo_matches_trl_dpo_trainer(trl_setup: tuple[DPOTrainer, dict], chunk_size: int) -> None:
    """MPO (sigmoid/bco_pair/sft, 0.8/0.2/1.0, beta 0.1, delta 0): loss, grads, logged metrics.

    chunk_size 5 < N = 26 completion tokens also runs the checkpointed, chunked path.
    """
    trainer, batch = trl_setup
    trainer.loss_types, trainer.loss_weights = list(MPO_TYPES), list(MPO_WEIGHTS)
    trl_loss, trl_grads, trl_metrics = _trl_loss_and_grads(trainer, batch)
    ours, our_grads = _our_loss(trainer, batch, MPO_TYPES, MPO_WEIGHTS, chunk_size)

    assert abs(ours.loss.item() - trl_loss) <= 1e-6
    assert set(our_grads) == set(trl_grads) and len(trl_grads) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(ours.metrics[key] - trl_metrics[key]) <= 1e-6, key
    for key in ("logps/chosen", "logps/rejected"):  # sums of ~10 nats: 1e-6 relative
        assert abs(ours.metrics[key] - trl_metrics[key]) <= 1e-6 * abs(trl_metrics[key]), key
    # The log-ratios are far from 0, so the sigmoid/BCO terms are not at their trivial ln 2 values.
    assert abs(ours.metrics["rewards/margins"]) > 0.05


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "sigmoid", "bco_pair", "sft"])
def test_single_loss_matches_trl(trl_setup: tuple[DPOTrainer, dict], loss_type: str) -> None:
    """Each registered loss alone (weight 1) against TRL's branch of the same name."""
    trainer, batch = trl_setup
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    try:
        trl_loss, trl_grads, _ = _trl_loss_and_grads(trainer, batch)
    finally:
        trainer.loss_types, trainer.loss_weights = list(MPO_TYPES), list(MPO_WEIGHTS)
    ours, our_grads = _our_loss(trainer, batch, [loss_type], [1.0], 4096)

    assert abs(ours.loss.item() - trl_loss) <= 1e-6 * max(1.0, abs(trl_loss))
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
