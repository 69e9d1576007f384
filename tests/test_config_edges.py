"""Config values that were taken silently with another meaning, and YAML that was refused or crashed."""

from __future__ import annotations

import pytest

from mpo.config import ConfigError, load_config
from mpo.train.config import RunConfig

PRESET = "configs/internvl3_5/8b_mpo.yaml"


def _load(*overrides, path=None):
    return load_config(RunConfig, path, list(overrides))


def test_a_section_given_whole_merges_into_the_presets_section():
    cfg = _load("train={learning_rate: 1.0e-6}", path=PRESET)
    assert cfg.train.learning_rate == 1e-6
    assert (cfg.train.global_batch_size, cfg.train.deepspeed) == (256, "configs/deepspeed/zero3.json")  # kept
    assert _load("model={path: /x}", path=PRESET).model.dtype == "bfloat16"


@pytest.mark.parametrize("text,value", [("010", 10), ("0200", 200), ("1_000", 1000), ("-3", -3)])
def test_integers_are_decimal(text, value):
    """YAML 1.1 read 010 as 8 (octal) and 0200 as 128."""
    assert _load(f"train.max_steps={text}").train.max_steps == value


@pytest.mark.parametrize("text", ["0x10", "1:30"])
def test_other_integer_forms_are_refused_by_name(text):
    with pytest.raises(ConfigError, match=rf"^train\.max_steps: expected an integer, got '{text}'$"):
        _load(f"train.max_steps={text}")


def test_a_file_reads_integers_the_same_way(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  save_steps: 0200\n")
    assert _load(path=tmp_path / "c.yaml").train.save_steps == 200


def test_a_hash_inside_an_override_value_is_part_of_it():
    assert _load("data.meta_path=/data/run #3/meta.json").data.meta_path == "/data/run #3/meta.json"


@pytest.mark.parametrize("override", ["train.learning_rate=inf", "loss.beta=.nan", "train.num_train_epochs=inf"])
def test_infinite_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number, got "):
        _load(override)


def test_a_key_in_the_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.beta'; did you mean 'loss\.beta'\?"):
        _load("train.beta=0.2")


def test_yaml_merge_keys_and_empty_sections(tmp_path):
    (tmp_path / "m.yaml").write_text("data: &d\n  seed: 7\ntrain:\n  <<: *d\n  max_steps: 3\nloss:\n")
    cfg = _load(path=tmp_path / "m.yaml")
    assert (cfg.train.seed, cfg.train.max_steps, cfg.loss.beta) == (7, 3, 0.1)


def test_yaml_errors_are_one_line_with_the_file_and_position(tmp_path):
    (tmp_path / "tab.yaml").write_text("train:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        _load(path=tmp_path / "tab.yaml")
    assert str(err.value) == (f"{tmp_path / 'tab.yaml'}:2:1: not valid YAML: found character '\\t' that cannot start "
                              "any token")
    (tmp_path / "key.yaml").write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match=r"key\.yaml: line 1: a mapping key must be a name, not a list$"):
        _load(path=tmp_path / "key.yaml")


@pytest.mark.parametrize("override,message", [
    ("model.lora.alpha=0", r"^model\.lora\.alpha: must be > 0 \(got 0\)$"),
    ("data.seed=-1", r"^data\.seed: must be >= 0 \(got -1\)$"),
    ("train.output_dir=", r"^train\.output_dir: empty; name the run's folder$"),
])
def test_values_that_meant_something_else_are_refused(override, message):
    """LoRA alpha 0 became 2·r, a negative seed failed after the model loaded, an empty output_dir wrote the run
    into the current folder."""
    with pytest.raises(ConfigError, match=message):
        _load(override)


def test_an_accumulation_that_the_global_batch_would_override_is_refused():
    from mpo.train.accelerator import TrainingError, _derive_accumulation

    cfg = _load("train.per_device_batch_size=4", "train.global_batch_size=8", "train.gradient_accumulation_steps=5")
    with pytest.raises(TrainingError, match=r"^train\.gradient_accumulation_steps=5 disagrees with "
                                            r"train\.global_batch_size=8, which gives 2 for 4 pairs per device on 1 "
                                            r"processes: set train\.global_batch_size=0"):
        _derive_accumulation(cfg, 1)
    cfg = _load("train.per_device_batch_size=4", "train.global_batch_size=8")
    _derive_accumulation(cfg, 1)
    assert cfg.train.gradient_accumulation_steps == 2


@pytest.mark.parametrize("beta", [-0.1, 0.0, float("nan")])
def test_eval_refuses_a_beta_that_flips_or_breaks_the_rewards(beta):
    from mpo.train.evaluate import run_eval

    with pytest.raises(ValueError, match=r"^beta must be a finite number > 0, got "):
        run_eval("unused-model", "unused-meta.json", beta=beta)


def test_generation_and_postprocess_flags_that_cannot_mean_anything(tmp_path):
    from mpo.generate.correctness import CorrectnessConfig
    from mpo.generate.postprocess import PostprocessConfig

    with pytest.raises(ValueError, match=r"^--device gpu: expected auto, cpu, cuda or cuda:N$"):
        CorrectnessConfig(checkpoint="m", prompt_path="p", device="gpu").check_backend()
    with pytest.raises(ValueError, match=r"^--temperature inf: expected a finite number > 0$"):
        CorrectnessConfig(checkpoint="m", prompt_path="p", temperature=float("inf")).check_backend()
    with pytest.raises(ValueError, match=r"^--timeout: must be > 0, got nan$"):
        PostprocessConfig(data_dir=str(tmp_path), save_dir=str(tmp_path / "s"), timeout=float("nan"))
