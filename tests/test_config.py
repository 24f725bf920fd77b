from __future__ import annotations

import pytest

from itmatch.config import build_run_config, load_preset, parse_overrides, preset_names
from itmatch.errors import ConfigError


def test_every_preset_builds():
    for name in preset_names():
        config = build_run_config(name)
        assert config.preset == name == load_preset(name)["preset"]


def test_overrides_reach_nested_fields_with_json_values():
    overrides = parse_overrides(["model.attention.temperature=4", "model.context.slots=null", "loss.negatives=sum"])
    config = build_run_config("cmcan-official", overrides)
    assert config.model.attention.temperature == 4.0
    assert config.model.context.slots is None
    assert config.loss.negatives == "sum"


def test_paper_and_official_presets_differ_where_the_notes_say():
    paper, official = build_run_config("cmcan-paper").model, build_run_config("cmcan-official").model
    assert (paper.context.per_direction, official.context.per_direction) == (3, 1)
    assert (paper.context.slots, official.context.slots) == (None, 5)
    assert paper.attention.activation == "relu" and official.attention.activation == "leaky_relu"
    assert not paper.sim_vector.relu and official.sim_vector.relu
    assert not paper.confidence.slot_affine and official.confidence.slot_affine


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.attention.temprature=4", "unknown config key 'model.attention.temprature'.*temperature"),
        ("model.attention.activation=gelu", "must be one of"),
        ("train.epochs=ten", "must be an integer"),
        ("train.epochs=2.5", "must be an integer"),
        ("model.image_norm=1", "true or false"),
        ("nonsense=1", "unknown config key 'nonsense'"),
    ],
)
def test_bad_overrides_are_explained(assignment, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config("cmcan-official", parse_overrides([assignment]))


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="cmcan-official"):
        build_run_config("cmcan-offical")


def test_override_syntax_is_checked():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])
