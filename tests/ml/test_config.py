from pathlib import Path

import pytest
import yaml

from schemas.training import ConfigError, TrainConfig
from snunet_cbam.config import load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_documented_yaml_is_exactly_the_defaults():
    documented = yaml.safe_load((REPO / "config" / "train_config.yaml").read_text())
    assert set(documented) == set(TrainConfig.model_fields)
    assert TrainConfig.model_validate(documented) == TrainConfig()


def test_issue_keys_are_all_there():
    required = {"epochs", "batch_size", "lr", "weight_decay", "scheduler", "base_channel", "use_attention",
                "weight_bce", "weight_dice", "crop_size", "patience", "min_delta", "seed", "device", "amp",
                "num_workers", "skip_invalid"}
    assert required <= set(TrainConfig.model_fields)


def test_a_file_gives_only_the_keys_it_changes(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 3\nbase_channel: 16\n")
    config = load_config(path, ["lr=0.01", "use_attention=false"])
    assert (config.epochs, config.base_channel, config.lr, config.use_attention) == (3, 16, 0.01, False)
    assert config.weight_decay == TrainConfig().weight_decay


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epochz'"):
        load_config(path)


@pytest.mark.parametrize("override, key", [("lr=-1", "lr"), ("scheduler=linear", "scheduler"),
                                           ("batch_size=zero", "batch_size"), ("amp=maybe", "amp")])
def test_invalid_value_is_named(override, key):
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        load_config(None, [override])


def test_cross_field_rules_are_explained():
    with pytest.raises(ConfigError, match="window_overlap must be smaller than window_size"):
        TrainConfig.from_mapping({"window_size": 64, "window_overlap": 64})


def test_malformed_files_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    assert parse_overrides(["test_split=null", "compile=auto"]) == {"test_split": None, "compile": "auto"}
