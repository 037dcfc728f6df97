"""The config system: YAML + dotted overrides, typed, with errors naming the key."""

from pathlib import Path

import pytest

from dig_torchrec.config import ConfigError, config_from_dict, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_load():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "ml100k", "industrial_small", "industrial_large"} <= names
    for p in CONFIGS:
        cfg = load_config(p)
        # every shipped catalog-sized config leaves room for a collision-free tree
        assert cfg.tokenizer.num_codes ** cfg.tokenizer.num_layers >= 1000


def test_overrides_change_values_with_types():
    cfg = load_config(CONFIGS[0], ["data.batch_size=1024", "loss.recall_loss_weight=0", "tokenizer.frozen=true",
                                   "model.din_hidden=[8, 4]", "run_dir=/tmp/somewhere"])
    assert cfg.data.batch_size == 1024
    assert cfg.loss.recall_loss_weight == 0.0 and isinstance(cfg.loss.recall_loss_weight, float)
    assert cfg.tokenizer.frozen is True
    assert cfg.model.din_hidden == [8, 4]
    assert cfg.train.run_dir == "/tmp/somewhere" and cfg.run_dir == "/tmp/somewhere"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.batchsize=3"])
    msg = str(e.value)
    assert "data.batchsize" in msg and "batch_size" in msg and "negatives_per_positive" in msg
    with pytest.raises(ConfigError, match="unknown config key 'nonsense'"):
        load_config(None, ["nonsense.x=1"])


@pytest.mark.parametrize(
    "override, key",
    [("data.batch_size=abc", "data.batch_size"), ("tokenizer.frozen=3", "tokenizer.frozen"),
     ("model.din_hidden=5", "model.din_hidden"), ("loss.sem_weight=[1]", "loss.sem_weight")],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, key",
    [("data.batch_size=0", "data.batch_size"), ("u2t.inference=magic", "u2t.inference"),
     ("tokenizer.ema_decay=1.5", "tokenizer.ema_decay"), ("train.nan_policy=ignore", "train.nan_policy")],
)
def test_impossible_values_name_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_round_trip_through_dict():
    cfg = load_config(CONFIGS[0], ["data.batch_size=77"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("data.batch_size")
