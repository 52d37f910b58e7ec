"""AppConfig: parsing, refusal of bad keys and values, and sync with pyproject.toml."""

import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from cmfl_flower.config import AppConfig, all_keys, render_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_model_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    defaults = AppConfig().to_run_config()
    assert set(flat) == set(defaults)
    for key, value in defaults.items():
        assert flat[key] == value and type(flat[key]) is type(value), key


def test_round_trip_run_config_model_run_config():
    flat = {
        **AppConfig().to_run_config(),
        "data.alpha": 0.5,
        "encoder.lora-rank": 4,
        "federation.rounds": 7,
        "output.dir": "/tmp/runs",
    }
    cfg = AppConfig.from_run_config(flat)
    assert (cfg.data.alpha, cfg.encoder.lora_rank, cfg.federation.rounds) == (0.5, 4, 7)
    assert cfg.to_run_config() == flat
    assert AppConfig.from_run_config(cfg.to_run_config()) == cfg


def test_partial_config_takes_defaults_and_int_is_accepted_for_float():
    cfg = AppConfig.from_run_config({"data.alpha": 1})
    assert cfg.data.alpha == 1.0 and isinstance(cfg.data.alpha, float)
    assert cfg.encoder == AppConfig().encoder


@pytest.mark.parametrize(
    ("flat", "named"),
    [
        ({"data.alpah": 0.1}, "data.alpah"),  # unknown key
        ({"nosection.x": 1}, "nosection.x"),
        ({"data.min_partition_size": 3}, "data.min_partition_size"),  # underscores
        ({"data": 1}, "'data'"),  # a section is not a key
        ({"data.alpha": -1.0}, "data.alpha"),  # out of range
        ({"data.test-fraction": 1.0}, "data.test-fraction"),
        ({"federation.fraction": 0.0}, "federation.fraction"),
        ({"data.alpha": "0.1"}, "data.alpha"),  # wrong type: string for float
        ({"federation.rounds": 2.5}, "federation.rounds"),  # float for int
        ({"federation.rounds": True}, "federation.rounds"),  # bool for int
        ({"backbone.preset": "huge"}, "backbone.preset"),  # not an allowed value
        ({"data.partitioner": "random"}, "data.partitioner"),
        ({"backbone.device": "gpu"}, "backbone.device"),
        ({"data.dir": "relative/dir"}, "data.dir"),
        ({"output.run-name": "a b"}, "output.run-name"),
        ({"encoder.target-modules": "c_fc,"}, "encoder.target-modules"),
        ({"strategy": "not a name"}, "strategy"),
        ({"method": "not a name"}, "method"),
    ],
)
def test_bad_key_or_value_is_refused_naming_the_key(flat, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        AppConfig.from_run_config(flat)


def test_error_names_the_value_and_the_allowed_values():
    with pytest.raises(ValueError) as err:
        AppConfig.from_run_config({"backbone.preset": "huge"})
    assert "'huge'" in str(err.value) and "'bk-sdm-v2-small'" in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match="Did you mean data.alpha"):
        AppConfig.from_run_config({"data.alpah": 0.1})


def test_config_is_frozen():
    cfg = AppConfig()
    with pytest.raises(ValueError):
        cfg.data.alpha = 3.0  # type: ignore[misc]


def test_the_docs_config_reference_is_the_generated_one():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert render_markdown() in page
    for key in all_keys():
        assert f"`{key}`" in page


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_named_experiment_is_a_valid_override(path):
    overrides = flatten_dict(tomllib.loads(path.read_text()))
    cfg = AppConfig.from_run_config({**AppConfig().to_run_config(), **overrides})
    for key, value in overrides.items():
        assert cfg.to_run_config()[key] == value
