"""DropoutNTP: exact-prefix truncation, dropped reproductions, and an end-to-end run on the tiny InternVL."""

from __future__ import annotations

import json
import math
import re

import pytest
from gen_fakes import FakeSampler, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo.data.demo import write_demo
from mpo.generate.dropout_ntp import DropoutNTPConfig, dropout_output_path, run_dropout_ntp, truncate_chosen
from mpo.generate.items import item_id, sample_seed
from mpo.generate.sharding import OutputLayout


@pytest.mark.parametrize("chosen, ratio, prefix", [
    ("The cat sat on the mat.", 0.5, "The cat sat"),              # 6 words -> 3
    ("The cat sat on the mat.", 0.0, ""),
    ("The cat sat on the mat.", 0.99, "The cat sat on the"),      # floor(5.94) = 5
    ("One", 0.5, ""),                                             # a one-word answer keeps nothing
    ("Step 1\nStep 2", 0.5, "Step 1"),                           # newlines separate words too
    ("  lead  space here", 0.5, "  lead"),                        # the prefix is a slice: leading space kept
    ("猫坐在垫子上。", 0.5, "猫坐在"),                             # 7 units: 6 characters + the full stop
    ("答案是 42 个苹果", 0.5, "答案是"),                           # mixed: 答 案 是 42 个 苹 果 -> 3 of 7
    ("a b c d e f g h i j", 0.3, "a b c"),                        # 10 * 0.3 = 3.0000000000000004 -> 3
])
def test_truncate_chosen_pinned(chosen, ratio, prefix):
    assert truncate_chosen(chosen, ratio) == prefix


def test_floor_survives_floating_point():
    """0.29 * 100 = 28.999999999999996 in binary floating point; the intended answer is 29 words."""
    text = " ".join(f"w{i}" for i in range(100))
    assert truncate_chosen(text, 0.29) == " ".join(f"w{i}" for i in range(29))


_UNITS = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]|"
                    r"[^\s\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]+")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t.猫坐。1")), max_size=40),
       st.floats(min_value=0.0, max_value=0.999))
def test_prefix_is_an_exact_prefix_with_floor_of_units(chosen, ratio):
    prefix = truncate_chosen(chosen, ratio)
    assert chosen.startswith(prefix)
    assert prefix == "" or not prefix[-1].isspace()
    assert len(_UNITS.findall(prefix)) == math.floor(len(_UNITS.findall(chosen)) * ratio + 1e-9)


def _cfg(tmp_path, prompt_path, **kw) -> DropoutNTPConfig:
    base = dict(checkpoint=str(tmp_path / "ckpt" / "tiny"), prompt_path=str(prompt_path),
                out_dir=str(tmp_path / "out"), progress=False, num_workers=0, batch_size=4)
    return DropoutNTPConfig(**{**base, **kw})


def test_request_is_text_only_with_the_prefix_as_an_open_assistant_turn(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"image": "missing.png", "question": "<image>\nWhat colour?", "chosen": "The shape is red."}])
    cfg = _cfg(tmp_path, path, allow_outside_root=True)
    fake = FakeSampler()
    result = run_dropout_ntp(cfg, fake, env={})
    assert result.summary["rejected_prompts"] == 1  # the image must exist: the pair is for training with it
    (tmp_path / "img.png").write_bytes(b"")  # existence is checked, decoding is not (the image is never sent)
    write_jsonl(path, [{"image": "img.png", "question": "<image>\nWhat colour?", "chosen": "The shape is red."}])
    fake = FakeSampler()
    result = run_dropout_ntp(_cfg(tmp_path, path, out_dir=str(tmp_path / "out2")), fake, env={})
    req = fake.requests[0]
    assert req.images == () and req.continue_final_message
    assert req.messages == [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "The shape"}]}]
    rec = json.loads(result.output.read_text().splitlines()[0])
    assert rec["rejected"] == "The shape" + f"s{rec['seed'] % 1_000_000}"
    assert rec["question"] == "<image>\nWhat colour?" and rec["image"] == "img.png" and rec["sample_idx"] == 0


def test_a_continuation_that_reproduces_chosen_is_dropped_counted_and_not_redone(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "Q1", "chosen": "Alpha beta gamma delta."},
                       {"question": "Q2", "chosen": "One two three four."}])

    q1 = item_id([], "Q1", "Alpha beta gamma delta.")
    echo = {sample_seed(0, q1, 0), sample_seed(0, q1, 2)}  # samples 0 and 2 of Q1 reproduce chosen

    def text(req, seed):
        return " gamma delta. " if seed in echo else " something else"

    cfg = _cfg(tmp_path, path, num_return_sequences=4)
    result = run_dropout_ntp(cfg, FakeSampler(text=text), env={})
    recs = [json.loads(line) for line in result.output.read_text().splitlines()]
    assert result.summary["dropped"] == {"reproduces_chosen": 2}
    assert result.summary["samples"] == len(recs) == 6
    assert [(r["question"], r["sample_idx"]) for r in recs][:2] == [("Q1", 1), ("Q1", 3)]
    assert recs[0]["rejected"] == "Alpha beta something else"
    fake = FakeSampler()
    run_dropout_ntp(cfg, fake, env={})
    assert fake.calls == []  # dropped samples count as done


def test_end_to_end_on_tiny_internvl_prefix_property_on_every_row(tmp_path, tiny_internvl_dir):
    demo = write_demo(tmp_path / "demo", n=20, n_heldout=4, n_prompts=6, seed=0)
    cfg = _cfg(tmp_path, demo["dropout_ntp_prompts"], checkpoint=str(tiny_internvl_dir), num_return_sequences=2,
               max_new_tokens=6, image_root=str(demo["images"]), start_ratio=0.5)
    result = run_dropout_ntp(cfg, env={})
    final = dropout_output_path(cfg)
    assert result.output == final and final.parent.name == f"{tiny_internvl_dir.parent.name}_internvl"
    rows = [json.loads(line) for line in final.read_text(encoding="utf-8").splitlines()]
    inputs = [json.loads(line) for line in demo["dropout_ntp_prompts"].read_text().splitlines()]
    assert len(rows) + result.summary["dropped"].get("reproduces_chosen", 0) == 2 * len(inputs) == 12
    for row in rows:
        prefix = truncate_chosen(row["chosen"], 0.5)
        assert prefix and row["rejected"].startswith(prefix) and row["chosen"].startswith(prefix)
        assert set(row) == {"image", "question", "chosen", "rejected", "item_id", "sample_idx", "seed",
                            "finish_reason", "num_tokens"} - ({"image"} if "image" not in row else set())
        assert row["finish_reason"] in ("stop", "length") and row["num_tokens"] <= 6
    assert OutputLayout(final).summary.exists()
