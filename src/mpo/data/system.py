"""The system message of rows that bring none (``data.system_prompt``, ``--system-prompt``).

InternVL trains and serves its chat models with a system turn that is always there: its ``internvl2_5``
conversation template (every Qwen/InternLM-based InternVL2.5/3/3.5 MPO script) and lmdeploy's chat template
both write the identity line :data:`INTERNVL_SYSTEM_PROMPT` unless a row brings its own ``system_prompt``. The
``-HF`` checkpoints' chat templates (transformers' conversion) write no system turn at all, so rendering rows
with them alone would train and sample InternVL on prompts it never saw. ``auto`` (the default) puts the line
back for such templates; a template that writes a system turn of its own (Qwen-VL's "You are a helpful
assistant.") is left alone, as is a template that is not ChatML (InternVL3.5-GPT-OSS's Harmony format, whose
system text carries dates; give it as text if you want it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["INTERNVL_SYSTEM_PROMPT", "SYSTEM_PROMPT_HELP", "resolve_system_prompt"]

INTERNVL_SYSTEM_PROMPT = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                          "多模态大语言模型。")
SYSTEM_PROMPT_HELP = ("System message of rows without their own system_prompt: auto (InternVL: its identity line, as "
                      "InternVL trains and serves with; other models: their template's default), none, or the text.")
_INTERNVL_IMAGE_TOKEN = "<IMG_CONTEXT>"


def resolve_system_prompt(processor: Any, setting: str, *, internvl: bool | None = None) -> str | None:
    """The system message for rows without one under ``setting`` (``auto`` | ``none`` | text); None: no system
    turn of ours (the chat template's own default, if it has one, still applies).

    ``processor``: the model's processor, or its tokenizer (whose chat template then renders the probe; say
    ``internvl`` then, which a processor tells by its ``<IMG_CONTEXT>`` image token).
    """
    if setting == "none":
        return None
    if setting != "auto":
        if not setting.strip():
            raise ValueError("system_prompt is empty: give the text, 'none' (no system turn) or 'auto'")
        return setting
    if internvl is None:
        internvl = getattr(processor, "image_token", None) == _INTERNVL_IMAGE_TOKEN
    if not internvl:
        return None
    content = [{"type": "text", "text": "hi"}] if hasattr(processor, "image_processor") else "hi"
    probe = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                          tokenize=False)
    if "<|im_start|>" not in probe or "<|im_start|>system" in probe:
        return None
    return INTERNVL_SYSTEM_PROMPT
