"""Loading by path: the right Auto class per family, and a clear ModelLoadError for everything else."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mpo.models import ModelLoadError, is_vision_model, load_model, load_processor, model_family, model_info


def _write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REMOTE_INTERNVL = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
                   "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                                "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
                   "vision_config": {"model_type": "intern_vit_6b"}, "llm_config": {"model_type": "qwen3"}}


@pytest.mark.parametrize(("config", "family", "vision"), [
    ({"model_type": "internvl", "vision_config": {}, "text_config": {}}, "internvl", True),
    ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl", True),
    ({"model_type": "qwen2_vl"}, "qwen2_vl", True),
    ({"model_type": "llama"}, "text", False),
    ({"model_type": "qwen3"}, "text", False),
    (REMOTE_INTERNVL, "internvl_chat", True),
    ({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}, "llava", True),
])
def test_family_and_vision_from_config_dicts(config, family, vision):
    assert (model_family(config), is_vision_model(config)) == (family, vision)


def test_family_from_paths_and_configs(tiny_internvl_dir, tiny_qwen25vl_dir, tiny_qwen2_dir):
    assert [model_family(p) for p in (tiny_internvl_dir, tiny_qwen25vl_dir, tiny_qwen2_dir)] == [
        "internvl", "qwen2_5_vl", "text"]
    model = load_model(tiny_qwen2_dir)
    assert (model_family(model.config), is_vision_model(model.config)) == ("text", False)


def test_load_classes_dtype_and_attention(tiny_internvl_dir, tiny_qwen25vl_dir, tiny_qwen2_dir):
    got = []
    for path in (tiny_internvl_dir, tiny_qwen25vl_dir, tiny_qwen2_dir):
        model = load_model(path, dtype="bfloat16")
        assert next(model.parameters()).dtype == torch.bfloat16
        assert model.config._attn_implementation == "sdpa"
        got.append((type(model).__name__, type(load_processor(path)).__name__))
    assert got == [("InternVLForConditionalGeneration", "InternVLProcessor"),
                   ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
                   ("Qwen2ForCausalLM", "Qwen2Tokenizer")]
    assert next(load_model(tiny_qwen2_dir, dtype=torch.float16).parameters()).dtype == torch.float16


@pytest.mark.parametrize("loader", [load_model, load_processor])
def test_remote_code_internvl_points_to_hf_repository(tmp_path, loader):
    path = _write_config(tmp_path / "InternVL3_5-8B-Instruct", REMOTE_INTERNVL)
    expected = (f"{path}: this is a remote-code InternVL checkpoint (config.json model_type 'internvl_chat' with "
                "auto_map); its InternVLChatModel class needs trust_remote_code, and mpo does not train it anyway. "
                "Use the matching transformers-native -HF repository instead (e.g. OpenGVLab/InternVL3_5-8B-HF), "
                "or convert this checkpoint with transformers' own InternVL conversion script "
                "(src/transformers/models/internvl/convert_internvl_weights_to_hf.py).")
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        loader(path)


def test_remote_code_internvl_with_trust_remote_code_still_refused(tmp_path):
    path = _write_config(tmp_path / "InternVL3-2B", REMOTE_INTERNVL)
    with pytest.raises(ModelLoadError, match=r"InternVLChatModel class is not supported even with trust_remote_code\."
                                             r" Use the matching transformers-native -HF repository instead "
                                             r"\(e\.g\. OpenGVLab/InternVL3-2B-hf\)"):
        load_model(path, trust_remote_code=True)


def test_other_remote_code_model_needs_the_flag(tmp_path):
    path = _write_config(tmp_path / "m", {"model_type": "my_vlm", "auto_map": {"AutoModel": "modeling.MyVLM"}})
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(path))}: model_type 'my_vlm' is defined by Python code "
                                             r"shipped with the checkpoint \(config\.json auto_map\); pass "
                                             r"trust_remote_code=True \(--trust-remote-code\) only if you trust it$"):
        load_processor(path)


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such model folder$"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: not a model folder: no config\.json \(expected a checkpoint "
                                             r"written by save_pretrained\)$"):
        load_model(tmp_path / "empty")
    (tmp_path / "adapter").mkdir()  # a LoRA run's checkpoint-N/model or final/adapter
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"adapter: a LoRA adapter \(adapter_config\.json, no config\.json\), "
                                             r"not a whole model: give the run's final/"):
        load_model(tmp_path / "adapter")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"file\.bin: not a model folder \(it is a file\)$"):
        load_processor(tmp_path / "file.bin")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{\n  "model_type": "qwen2",\n  oops\n}')
    with pytest.raises(ModelLoadError, match=r"bad/config\.json:3: invalid JSON: Expecting property name enclosed "
                                             r"in double quotes$"):
        load_model(tmp_path / "bad")
    _write_config(tmp_path / "unknown", {"model_type": "not_a_model"})
    with pytest.raises(ModelLoadError, match=r"unknown: config\.json: model_type: 'not_a_model' is not a model type "
                                             r"known to the installed transformers$"):
        load_model(tmp_path / "unknown")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"^mpo-tests-nobody/no-such-model: no such folder, and not loadable as "
                                             r"a Hugging Face Hub model \(offline, not cached, or no such repository\)"):
        load_model("mpo-tests-nobody/no-such-model")


def test_folder_with_config_but_no_weights(tmp_path, tiny_qwen2_dir):
    folder = _write_config(tmp_path / "cfg-only", json.loads((tiny_qwen2_dir / "config.json").read_text()))
    with pytest.raises(ModelLoadError, match=r"cfg-only: cannot load as AutoModelForCausalLM: "):
        load_model(folder)


def test_bad_dtype(tiny_qwen2_dir):
    with pytest.raises(ModelLoadError, match=r"^dtype must be one of float32, bfloat16, float16, got 'fp8'$"):
        load_model(tiny_qwen2_dir, dtype="fp8")


def test_model_info_counts_parameters_without_weights(tiny_internvl_dir, tiny_qwen2_dir):
    info = model_info(tiny_internvl_dir)
    model = load_model(tiny_internvl_dir)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (info["family"], info["image_tokens_per_tile"], info["chat_template"]) == ("internvl", 16, True)
    assert model_info(tiny_qwen2_dir)["image_tokens_per_tile"] is None
