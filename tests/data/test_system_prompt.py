"""The system message of rows without one: InternVL's identity line by default, as InternVL trains and serves."""

from __future__ import annotations

import pytest

from mpo.config import ConfigError, load_config
from mpo.data.encode import PairEncoder
from mpo.data.records import PreferenceRecord
from mpo.data.system import INTERNVL_SYSTEM_PROMPT, resolve_system_prompt
from mpo.models import load_processor


def _row(system_prompt=None) -> PreferenceRecord:
    return PreferenceRecord(dataset="d", line=1, question="What colour?", chosen="red", rejected="blue",
                            system_prompt=system_prompt)


def test_auto_gives_internvl_its_identity_line(tiny_internvl_dir):
    processor = load_processor(tiny_internvl_dir)
    system = resolve_system_prompt(processor, "auto")
    assert system == INTERNVL_SYSTEM_PROMPT
    encoder = PairEncoder(processor, system_prompt=system)
    assert encoder.prompt_text(_row()) == (f"<|im_start|>system\n{INTERNVL_SYSTEM_PROMPT}<|im_end|>\n"
                                           "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    # a row's own system_prompt replaces it, as in InternVL
    assert encoder.prompt_text(_row("Be brief.")).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert resolve_system_prompt(processor, "none") is None
    assert PairEncoder(processor).prompt_text(_row()).startswith("<|im_start|>user\n")
    assert resolve_system_prompt(processor, "You are a judge.") == "You are a judge."
    with pytest.raises(ValueError, match=r"^system_prompt is empty: give the text, 'none' \(no system turn\) or 'auto'$"):
        resolve_system_prompt(processor, "  ")


def test_auto_leaves_a_template_with_its_own_system_turn_alone(tiny_qwen25vl_dir):
    """Qwen2.5-VL's template writes "You are a helpful assistant." itself: auto adds nothing to it."""
    processor = load_processor(tiny_qwen25vl_dir)
    assert resolve_system_prompt(processor, "auto") is None
    text = PairEncoder(processor, system_prompt=None).prompt_text(_row())
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_the_training_config_refuses_an_empty_system_prompt():
    from mpo.train.config import RunConfig

    assert load_config(RunConfig, None, []).data.system_prompt == "auto"
    with pytest.raises(ConfigError, match=r"data\.system_prompt: empty; give the text, 'none'"):
        load_config(RunConfig, None, ["data.system_prompt="])
