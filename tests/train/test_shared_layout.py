"""The shared layout (prompt once per pair, packed, block mask) is exact: same log-probs, losses and gradients as
the plain two-sequence layout, on text-only, single-image, multi-image and mixed batches (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from mpo.data.encode import PairEncoder
from mpo.data.meta import read_meta
from mpo.data.mixture import PreferenceMixture
from mpo.losses import mpo_loss
from mpo.models import load_model, load_processor
from mpo.train.attention import language_config
from mpo.train.batch import collate_naive
from mpo.train.data import EncodedPairs
from mpo.train.forward import PairScorer, backbone_of
from mpo.train.shared import collate_shared, pack_pairs


@pytest.fixture(scope="module")
def encoded(demo_data, demo_model):
    processor = load_processor(demo_model)
    mixture = PreferenceMixture(read_meta(demo_data / "meta.json"), max_dynamic_patch=4)
    ds = EncodedPairs(mixture, PairEncoder(processor, max_length=512))
    by_task = {}
    for i in range(len(ds)):
        pair = ds[i]
        by_task.setdefault(pair.dataset, []).append(pair)
    return by_task, processor.tokenizer.pad_token_id


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, demo_model):
    m = load_model(demo_model, attn_implementation=request.param)
    m.eval()
    return m, request.param


def _scores_and_grads(model, batch):
    model.zero_grad()
    scores = PairScorer(model)(batch)
    loss, _ = mpo_loss(scores.chosen_logps, scores.rejected_logps, scores.chosen_logps.detach() * 0.9,
                       scores.rejected_logps.detach() * 1.1, scores.chosen_nll, delta=0.05)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores, loss.detach(), grads


@pytest.mark.parametrize("mix", [("text_arith",), ("shape_colour",), ("pair_colour",),
                                 ("text_arith", "shape_colour", "pair_colour")], ids=["text", "single", "multi", "mixed"])
@pytest.mark.parametrize("pack_length", [None, 400], ids=["row_per_pair", "packed"])
def test_shared_equals_naive(encoded, model, mix, pack_length):
    by_task, pad_id = encoded
    m, attn = model
    pairs = [p for task in mix for p in by_task[task][:3]]
    naive, nl, ng = _scores_and_grads(m, collate_naive(pairs, pad_id))
    shared_batch = collate_shared(pairs, pad_id, pack_length=pack_length, attn_implementation=attn)
    if pack_length:
        assert shared_batch.input_ids.shape[0] < len(pairs)  # pairs really were packed together
    shared, sl, sg = _scores_and_grads(m, shared_batch)
    if attn == "sdpa":  # the pair attention ran, on the language model only
        assert shared_batch.spans is not None
        assert language_config(backbone_of(m))._attn_implementation == "mpo_pairs"
        assert m.config.vision_config._attn_implementation == "sdpa"
    torch.testing.assert_close(shared.chosen_logps, naive.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.rejected_logps, naive.rejected_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.chosen_nll, naive.chosen_nll, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sl, nl, atol=1e-5, rtol=1e-5)
    assert sg.keys() == ng.keys()
    for name in ng:
        torch.testing.assert_close(sg[name], ng[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_layout_tokens_and_positions(encoded):
    by_task, pad_id = encoded
    pairs = by_task["shape_colour"][:2]
    batch = collate_shared(pairs, pad_id, pack_length=10_000, attn_implementation="eager")
    assert batch.input_ids.shape[0] == 1  # both pairs in one row, no padding
    n0 = len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) + len(pairs[0].rejected_ids)
    assert batch.input_ids.shape[1] == n0 + sum(len(t) for t in (pairs[1].prompt_ids, pairs[1].chosen_ids,
                                                                 pairs[1].rejected_ids))
    p, c = len(pairs[0].prompt_ids), len(pairs[0].chosen_ids)
    assert batch.position_ids[0, p + c].item() == p  # rejected restarts after the prompt
    assert batch.position_ids[0, n0].item() == 0  # the next pair starts at 0
    mask = batch.attention_mask[0, 0] == 0  # eager: additive mask, 0 = may attend
    assert not mask[p + c, p:p + c].any()  # rejected never sees chosen
    assert mask[p + c, :p].all()
    assert not mask[n0, :n0].any()  # no attention across pairs
    flat = batch.input_ids.reshape(-1)
    # every predicted target follows its predicting position, except each answer's first token (after the prompt)
    assert batch.target_ids.numel() == sum(len(x.chosen_ids) + len(x.rejected_ids) for x in pairs)
    assert batch.model_inputs["pixel_values"].shape[0] == sum(x.image_inputs["pixel_values"].shape[0] for x in pairs)
    assert flat[batch.predict_index[0] + 1] == batch.target_ids[0]


def test_pack_pairs_first_fit_decreasing():
    assert pack_pairs([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    assert pack_pairs([9, 1], 5) == [[0], [1]]  # too long for a row: a row of its own, never split
    assert pack_pairs([1, 2], None) == [[0], [1]]


def test_unsupported_attention_is_refused(encoded):
    by_task, pad_id = encoded
    with pytest.raises(ValueError, match="pair_layout=shared supports attn_implementation sdpa, eager, mpo_pairs, not "
                                         "'flash_attention_2'"):
        collate_shared(by_task["text_arith"][:1], pad_id, attn_implementation="flash_attention_2")


@pytest.fixture(scope="module")
def qwen_encoded(demo_data, tmp_path_factory):
    from mpo.data.demo import demo_corpus
    from mpo.models.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("qwen") / "q", "qwen2_5_vl", corpus=demo_corpus(demo_data))
    processor = load_processor(path)
    mixture = PreferenceMixture(read_meta(demo_data / "meta.json"))
    ds = EncodedPairs(mixture, PairEncoder(processor, max_length=512))
    by_task = {}
    for i in range(len(ds)):
        pair = ds[i]
        by_task.setdefault(pair.dataset, []).append(pair)
    model = load_model(path)
    model.eval()
    return by_task, processor.tokenizer.pad_token_id, model


@pytest.mark.parametrize("mix", [("text_arith",), ("shape_colour",), ("pair_colour",),
                                 ("text_arith", "shape_colour", "pair_colour")], ids=["text", "single", "multi", "mixed"])
def test_shared_equals_naive_qwen2_5_vl_3d_positions(qwen_encoded, mix):
    """Qwen2.5-VL's M-RoPE: the rejected restart must happen on all three rotary axes."""
    by_task, pad_id, m = qwen_encoded
    pairs = [p for task in mix for p in by_task[task][:2]]
    naive, nl, ng = _scores_and_grads(m, collate_naive(pairs, pad_id))
    shared, sl, sg = _scores_and_grads(m, collate_shared(pairs, pad_id, pack_length=600))
    torch.testing.assert_close(shared.chosen_logps, naive.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.rejected_logps, naive.rejected_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl, nl, atol=1e-5, rtol=1e-5)
    for name in ng:
        torch.testing.assert_close(sg[name], ng[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_layout_is_one_flat_row_without_a_mask(encoded):
    """SDPA: every pair of the batch in one row (no padding, pack_length does not apply), no (L, L) mask."""
    by_task, pad_id = encoded
    pairs = by_task["shape_colour"][:2] + by_task["text_arith"][:2]
    batch = collate_shared(pairs, pad_id, pack_length=100)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert batch.input_ids.shape == (1, sum(lengths))
    assert batch.attention_mask.shape == (1, 1, 1, 1)
    assert batch.spans.shapes == [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


def _dense_reference(q, k, v, shapes):
    """The block-mask computation the pair attention replaces: one (N, N) boolean mask over the flat row."""
    n = q.shape[2]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for n_p, n_c, *rest in shapes:
        end = start + n_p + n_c + sum(rest)
        block = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        at = n_p + n_c
        for n_r in rest:  # each later answer sees the prompt and itself
            block[at:at + n_r, n_p:at] = False
            at += n_r
        allowed[start:end, start:end] = block
        start = end
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)


@pytest.mark.parametrize("shapes", [[(5, 3, 4)], [(5, 3, 4), (5, 3, 4), (2, 1, 1)], [(1, 1, 1), (7, 2, 6), (7, 2, 6)],
                                    [(5, 3, 4, 2, 6), (5, 3), (2, 1, 1), (5, 3, 4, 2, 6)]],
                         ids=["one", "same_shapes_batched", "mixed", "questions"])
def test_pair_attention_equals_the_block_mask(shapes):
    """Values and gradients of q, k, v equal the dense block-mask SDPA, with grouped-query heads (4 q, 2 kv)."""
    from types import SimpleNamespace

    from mpo.train.attention import PairSpans, pair_attention_forward

    torch.manual_seed(0)
    n = sum(map(sum, shapes))
    q, k, v = (torch.randn(1, h, n, 8, requires_grad=True) for h in (4, 2, 2))
    module = SimpleNamespace(num_key_value_groups=2)
    out, _ = pair_attention_forward(module, q, k, v, None, mpo_pair_spans=PairSpans(shapes))
    want = _dense_reference(q, k, v, shapes)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(out)
    got_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_pair_attention_refuses_a_row_that_does_not_match(encoded):
    from types import SimpleNamespace

    from mpo.train.attention import PairSpans, pair_attention_forward

    q = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match=r"does not match the pair spans \(1 row of 12 tokens\)"):
        pair_attention_forward(SimpleNamespace(), q, q, q, None, mpo_pair_spans=PairSpans([(6, 3, 3)]))


def test_pair_attention_under_gradient_checkpointing(encoded, demo_model):
    """Recomputed layers get the pair spans again (they travel as a forward kwarg, not as global state)."""
    by_task, pad_id = encoded
    pairs = by_task["shape_colour"][:2] + by_task["text_arith"][:1]
    plain = load_model(demo_model).train()
    _, nl, ng = _scores_and_grads(plain, collate_naive(pairs, pad_id))
    m = load_model(demo_model).train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, sl, sg = _scores_and_grads(m, collate_shared(pairs, pad_id))
    torch.testing.assert_close(sl, nl, atol=1e-5, rtol=1e-5)
    for name in ng:
        torch.testing.assert_close(sg[name], ng[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sliding_window_models_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mpo.train.attention import use_pair_attention

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    assert "sliding_attention" in model.config.layer_types
    with pytest.raises(ValueError, match="sliding-window attention layers.*use train.pair_layout=naive"):
        use_pair_attention(backbone_of(model))


def _vision_grads(model, batch, vision_first):
    model.zero_grad()
    scores = PairScorer(model, vision_first=vision_first)(batch)
    (scores.chosen_logps.sum() - scores.rejected_logps.sum() + scores.chosen_nll).backward()
    return scores, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("family", "attn"), [("internvl", "sdpa"), ("internvl", "eager"), ("internvl", "eager_split"),
                                            ("qwen2_5_vl", "sdpa")])
def test_vision_first_and_the_filler_change_no_value(encoded, qwen_encoded, demo_model, family, attn, monkeypatch):
    """Several processes: the vision modules run before the backbone (``vision_first``) and a micro-batch without
    images runs a blank filler image through them. Image batches: the same log-probs and gradients as the plain
    forward. Text batches: the same log-probs and gradients, and every vision parameter has a gradient (zeros):
    DDP's buckets and ZeRO-3's reduce-scatter then see the same parameters on every rank."""
    from mpo.train.data import Collator, vision_filler

    if attn == "eager_split":  # the eager layout's one-forward-per-row path (taken when padding would waste > 20 %)
        monkeypatch.setattr("mpo.train.forward._pays_to_split", lambda batch: True)
        attn = "eager"
    if family == "internvl":
        (by_task, pad_id), m = encoded, load_model(demo_model, attn_implementation=attn)
        processor = load_processor(demo_model)
    else:
        by_task, pad_id, m = qwen_encoded
        processor = load_processor(m.name_or_path)
    filler = vision_filler(PairEncoder(processor, max_length=512))
    collate = Collator(pad_id, "shared", attn_implementation=attn, vision_filler=filler)
    images, _ = collate(by_task["shape_colour"][:2] + by_task["pair_colour"][:1])
    text, _ = collate(by_task["text_arith"][:3])
    assert images.vision_filler is None and text.vision_filler is not None
    vision = [n for n, _ in m.named_parameters() if "vision" in n or "visual" in n or "projector" in n]
    assert vision
    for batch in (images, text):
        plain, plain_grads = _vision_grads(m, batch, vision_first=False)
        first, first_grads = _vision_grads(m, batch, vision_first=True)
        torch.testing.assert_close(first.chosen_logps, plain.chosen_logps, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(first.rejected_logps, plain.rejected_logps, atol=1e-6, rtol=1e-6)
        for name, grad in first_grads.items():
            if batch is text and name in vision:
                assert grad is not None and not grad.any(), name  # present, and zero
            else:
                torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def _question(pairs: list) -> list:
    """Pairs of one question made from ``pairs[0]``'s prompt and images (the same tensors, one group, as
    ``EncodedPairs.question`` encodes them) and answers of the others; its chosen answer recurs in two pairs."""
    from dataclasses import replace

    head, *others = pairs
    head = replace(head, group=id(head))
    siblings = [replace(head, chosen_ids=head.chosen_ids, rejected_ids=o.rejected_ids) for o in others]
    siblings.append(replace(head, chosen_ids=others[0].chosen_ids, rejected_ids=head.rejected_ids))
    return [head, *siblings]


@pytest.mark.parametrize("family_attn", ["internvl_sdpa", "internvl_eager", "qwen2_5_vl_sdpa"])
def test_a_questions_pairs_in_one_span_equal_the_plain_layout(encoded, qwen_encoded, demo_model, family_attn):
    """The precompute's grouped layout: a question's pairs share one span (prompt and images once, each distinct
    answer once), and each pair's log-probs equal the plain two-sequence forward's; with a text question, a
    multi-image question and an ungrouped pair in the same batch."""
    family, attn = family_attn.rsplit("_", 1)
    if family == "internvl":
        by_task, pad_id = encoded
        m = load_model(demo_model, attn_implementation=attn).eval()
    else:
        by_task, pad_id, m = qwen_encoded
    spans = [_question(by_task["shape_colour"][:3]), _question(by_task["text_arith"][:2]), by_task["shape_colour"][3:4],
             _question(by_task["pair_colour"][:2])]
    pairs = [p for span in spans for p in span]
    grouped = collate_shared(pairs, pad_id, pack_length=4000, attn_implementation=attn, group_prompts=True)
    distinct = [{tuple(a.tolist()) for p in span for a in (p.chosen_ids, p.rejected_ids)} for span in spans]
    assert len(grouped.segments) == 4 and grouped.num_answers == sum(map(len, distinct)) < 2 * len(pairs)
    assert grouped.num_tokens == sum(len(span[0].prompt_ids) + sum(map(len, d)) for span, d in zip(spans, distinct))
    with torch.no_grad():
        got = PairScorer(m)(grouped)
        want = PairScorer(m)(collate_naive(pairs, pad_id))
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.chosen_nll, want.chosen_nll, atol=1e-6, rtol=1e-5)
