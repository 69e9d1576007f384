"""Every shipped YAML loads and validates; config errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo.config import ConfigError, load_config
from mpo.train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# run configs (mpo train); the other YAMLs under configs/ are accelerate launcher configs
YAMLS = sorted([CONFIGS / "demo.yaml", *(CONFIGS / "internvl3_5").glob("*.yaml")])
LAUNCHER_YAMLS = sorted(set(CONFIGS.rglob("*.yaml")) - set(YAMLS))


def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in YAMLS}
    expected = {f"internvl3_5/{k}_mpo.yaml" for k in ("1b", "2b", "4b", "8b", "14b", "38b", "30b_a3b", "241b_a28b")}
    assert expected | {"demo.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_yaml_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.loss.loss_types == ["sigmoid", "bco_pair", "sft"]
    assert cfg.loss.loss_weights == [0.8, 0.2, 1.0]
    assert cfg.loss.beta == 0.1
    if path.parent.name == "internvl3_5":
        # the seed's InternVL3.5 hyperparameters (seed_training.md §10.1)
        t = cfg.train
        assert (t.learning_rate, t.global_batch_size, t.per_device_batch_size) == (2e-7, 256, 1)
        assert (t.lr_scheduler, t.warmup_ratio, t.weight_decay, t.num_train_epochs) == ("cosine", 0.03, 0.05, 1.0)
        assert (cfg.data.max_length, cfg.data.max_dynamic_patch) == (16384, 12)
        assert cfg.model.path.startswith("OpenGVLab/InternVL3_5-") and cfg.model.path.endswith("-HF")
        assert (CONFIGS.parent / t.deepspeed).is_file()
        size = path.name.split("_mpo")[0]
        expected_dp = {"1b": 0.0, "2b": 0.0, "4b": 0.0, "8b": 0.1, "14b": 0.1, "30b_a3b": 0.1, "38b": 0.4,
                       "241b_a28b": 0.4}[size]
        assert cfg.model.drop_path_rate == expected_dp


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_launcher_yamls_are_accelerate_configs(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    assert "distributed_type" in data, f"{path} is neither a run config nor an accelerate config"


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'; did you mean 'learning_rate'"):
        load_config(RunConfig, None, ["train.learning_rat=1e-5"])


def test_unknown_section(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trian:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(RunConfig, y)


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", r"train.learning_rate: must be > 0.0 \(got -1.0\)"),
    ("train.lr_scheduler=step", r"train.lr_scheduler: must be one of 'cosine', 'linear', 'constant' \(got 'step'\)"),
    ("train.per_device_batch_size=two", r"train.per_device_batch_size: expected an integer, got 'two'"),
    ("model.freeze_llm=maybe", r"model.freeze_llm: expected true or false, got 'maybe'"),
    ("loss.loss_weights=[0.8,0.2]", r"loss.loss_weights: 2 weights for 3 loss_types"),
    ("data.on_bad_row=ignore", r"data.on_bad_row: must be one of 'skip', 'error'"),
    ("loss.loss_types=[sigmoid,foo,sft]", r"loss.loss_types / loss.loss_weights: unknown loss type\(s\) \['foo'\]"),
    ("loss.loss_weights=[0.8,-1,1]", r"loss.loss_types / loss.loss_weights: .*-1"),
])
def test_bad_values_name_the_key_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_overrides_and_yaml_scalars():
    cfg = load_config(RunConfig, None, ["train.learning_rate=1e-5", "train.report_to=[tensorboard]",
                                        "model.lora.r=8", "loss.loss_types=sigmoid,sft", "loss.loss_weights=[1,1]"])
    assert cfg.train.learning_rate == 1e-5
    assert cfg.train.report_to == ["tensorboard"]
    assert cfg.model.lora.r == 8
    assert cfg.loss.loss_types == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 1.0]


def test_required_paths_checked_at_run_time():
    cfg = load_config(RunConfig, None, [])
    with pytest.raises(ConfigError, match="model.path: required"):
        cfg.require_paths()


def test_malformed_override():
    with pytest.raises(ConfigError, match="is not of the form key.sub=value"):
        load_config(RunConfig, None, ["train.seed"])


def test_a_key_given_twice_in_the_yaml_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``train:`` section silently dropped the first's values."""
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learning_rate: 1.0e-5\n  save_steps: 50\nmodel:\n  dtype: float32\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 6: 'train' is given twice in one mapping \(first on line "
                                          r"1\); the second would replace the first$"):
        load_config(RunConfig, y)
    y.write_text("train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: 'seed' is given twice in one mapping \(first on line 2\)"):
        load_config(RunConfig, y)
