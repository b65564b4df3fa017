"""The run configuration documents and checks itself: one declaration per option."""

import dataclasses

import pytest
import torch

from ddpm_lib.config import TrainConfig, default_config, option_help, option_type
from ddpm_lib.ema import EMA


def test_every_option_has_a_help_line_and_a_type():
    for f in dataclasses.fields(TrainConfig):
        assert option_help(f.name), f.name
        assert option_type(f.name) in (str, int, float, bool, dict), f.name
    assert option_type("image_size") is int and option_type("data_root") is str


def test_the_ema_decay_range_is_declared_once_and_shown_in_the_help():
    assert option_help("ema_decay").endswith("in [0, 1)")
    for decay in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"^ema_decay must be a finite number in \[0, 1\)"):
            default_config("moons", ema_decay=decay).validate()
        with pytest.raises(ValueError, match=r"^ema_decay must be a finite number in \[0, 1\)"):
            EMA(torch.nn.Linear(2, 2), decay)


def test_the_network_a_config_trains():
    assert default_config("moons").network() == ("mlp", {"dim": 2})
    name, config = default_config("digits").network()
    assert name == "unet" and config["in_channels"] == 1 and config["image_size"] == 8
    with pytest.raises(ValueError, match=r"^model 'unet' needs image data"):
        default_config("moons", model="unet").network()
