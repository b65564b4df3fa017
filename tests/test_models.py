"""The noise predictors: shapes, configs, input checks and the GPU code paths, run on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ddpm_lib.config import DIGITS_UNET
from ddpm_lib.models import (
    MLP,
    MODEL_CONFIGS,
    MODELS,
    MLPConfig,
    TimeEmbedding,
    UNet,
    UNetConfig,
    build_model,
    count_parameters,
    timestep_embedding,
)

SMALL_UNET = dict(
    in_channels=3,
    image_size=16,
    base_channels=12,  # not a multiple of num_groups: GroupNorm must adapt
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    dropout=0.0,
    num_groups=32,
    num_heads=2,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised layers would hide bugs behind a zero output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def batch(config: dict, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    c, s = config["in_channels"], config["image_size"]
    return torch.randn(n, c, s, s, generator=generator), torch.randint(
        0, 1000, (n,), generator=generator
    )


# --- timestep embedding -----------------------------------------------------------------------


def test_timestep_embedding_matches_the_formula():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    freqs = torch.tensor(
        [10000 ** (-i / 3) for i in range(4)]
    )  # Ho et al.: log(10000) / (half - 1)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert torch.all(emb[0, :4] == 0) and torch.all(emb[0, 4:] == 1)  # t = 0: sin 0, cos 0


def test_timestep_embedding_odd_dim_and_distinct_steps():
    emb = timestep_embedding(torch.arange(1000), 7)
    assert emb.shape == (1000, 7)
    assert torch.all(emb[:, -1] == 0)  # the padding column
    assert torch.cdist(emb, emb).add(torch.eye(1000)).min() > 1e-3  # every step has its own code
    assert timestep_embedding(torch.tensor([5]), 1).shape == (1, 1)


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.arange(3), 0)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 2), 4)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        timestep_embedding([1, 2], 4)
    with pytest.raises(ValueError, match="max_period"):
        timestep_embedding(torch.arange(3), 4, max_period=1.0)


def test_time_embedding_module():
    module = TimeEmbedding(16, 64)
    assert module(torch.arange(5)).shape == (5, 64)


# --- U-Net ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        SMALL_UNET,
        DIGITS_UNET,
        dict(
            SMALL_UNET,
            in_channels=1,
            image_size=12,
            channel_mult=(1, 1, 2),
            num_res_blocks=2,
            attention_resolutions=(),
            num_groups=4,
            num_heads=1,
        ),
    ],
    ids=["rgb16", "digits", "grey12-3levels"],
)
def test_unet_predicts_eps_of_the_input_shape(config):
    model = randomize(UNet(**config)).eval()
    x, t = batch(config)
    eps = model(x, t)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all() and eps.std() > 0


def test_unet_starts_by_predicting_zero():
    x, t = batch(SMALL_UNET)
    assert torch.all(UNet(**SMALL_UNET)(x, t) == 0)  # zero-initialised output conv


def test_unet_depends_on_t_and_on_every_sample_alone():
    model = randomize(UNet(**SMALL_UNET)).eval()
    x, t = batch(SMALL_UNET)
    assert not torch.allclose(model(x, t), model(x, t + 1))
    # Per-sample independence (GroupNorm, not BatchNorm): a sample's output ignores its neighbours.
    torch.testing.assert_close(model(x[:1], t[:1]), model(x, t)[:1], atol=1e-5, rtol=1e-5)


def test_unet_scalar_t_is_broadcast():
    model = randomize(UNet(**SMALL_UNET)).eval()
    x, _ = batch(SMALL_UNET)
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.full((4,), 7)))


def test_unet_config_rebuilds_it():
    model = randomize(UNet(**SMALL_UNET)).eval()
    assert json.loads(json.dumps(model.config)) == model.config  # plain JSON values
    clone = type(model)(**model.config).eval()
    clone.load_state_dict(model.state_dict())
    x, t = batch(SMALL_UNET)
    torch.testing.assert_close(clone(x, t), model(x, t))
    assert UNet().config["channel_mult"] == [1, 2, 2]


def test_unet_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = UNet(**DIGITS_UNET)
    x, t = batch(DIGITS_UNET, n=16)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_unet_dropout_is_active_only_in_training():
    model = randomize(UNet(**dict(SMALL_UNET, dropout=0.5)))
    x, t = batch(SMALL_UNET)
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_unet_channels_last_gives_the_same_result():
    model = randomize(UNet(**SMALL_UNET)).eval()
    x, t = batch(SMALL_UNET)
    expected = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_unet_runs_under_bf16_autocast_with_gradients():
    model = randomize(UNet(**SMALL_UNET))
    x, t = batch(SMALL_UNET)
    with torch.no_grad():
        expected = model.eval()(x, t)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
        loss = out.float().square().mean()
    loss.backward()
    assert out.shape == x.shape
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unet_compiles_into_one_graph():
    # aot_eager traces forward and backward like inductor does, without the slow C++ build.
    torch._dynamo.reset()
    model = randomize(UNet(**SMALL_UNET)).eval()
    x, t = batch(SMALL_UNET)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, t)
    out.square().mean().backward()
    torch.testing.assert_close(out, model(x, t))


@pytest.mark.slow
def test_unet_compiles_with_inductor():
    torch._dynamo.reset()
    config = dict(DIGITS_UNET, base_channels=8)
    model = randomize(UNet(**config)).eval()
    x, t = batch(config)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x, t), model(x, t), atol=1e-4, rtol=1e-4)


def test_unet_rejects_an_image_size_the_levels_cannot_halve():
    with pytest.raises(
        ValueError, match=r"image_size=30.*channel_mult=\(1, 2, 2\).*multiples of 4"
    ):
        UNet(image_size=30, attention_resolutions=())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(in_channels=0), "in_channels"),
        (dict(base_channels=-1), "base_channels"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(num_groups=0), "num_groups"),
        (dict(attention_resolutions=(5,)), r"attention_resolutions.*accepted.* \[28, 14, 7\]"),
        (dict(num_heads=3), "num_heads"),
    ],
)
def test_unet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_unet_rejects_bad_argument_types():
    with pytest.raises(TypeError, match="channel_mult"):
        UNet(channel_mult=2)
    with pytest.raises(TypeError, match="base_channels"):
        UNet(base_channels=32.0)


def test_unet_forward_names_the_expected_shape():
    model = UNet(**SMALL_UNET)
    x, t = batch(SMALL_UNET)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 16, 16\).*image_size=16"):
        model(x[:, :, :8, :8], t)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(x[:, :1], t)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(4,\)"):
        model(x, t[:2])


def test_digits_unet_is_small():
    assert 0.3e6 < count_parameters(UNet(**DIGITS_UNET)) < 2e6


# --- MLP --------------------------------------------------------------------------------------


def test_mlp_predicts_eps_of_the_input_shape_and_starts_at_zero():
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (32,))
    model = MLP()
    assert torch.all(model(x, t) == 0)
    out = randomize(model)(x, t)
    assert out.shape == (32, 2) and out.std() > 0
    assert MLP(dim=5, depth=1)(torch.randn(3, 5), torch.tensor(4)).shape == (3, 5)


def test_mlp_learns_a_fixed_target():
    torch.manual_seed(0)
    model = MLP(hidden=64, depth=2)
    x, t = torch.randn(64, 2), torch.randint(0, 1000, (64,))
    target = torch.sin(3 * x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


def test_mlp_config_and_checks():
    model = randomize(MLP(dim=3, hidden=16, depth=2, time_dim=9))
    assert model.config == dict(dim=3, hidden=16, depth=2, time_dim=9)
    clone = type(model)(**model.config)
    clone.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 3), torch.arange(4)
    torch.testing.assert_close(clone(x, t), model(x, t))
    with pytest.raises(ValueError, match="depth"):
        MLP(depth=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        model(torch.randn(4, 2), t)


# --- registry ---------------------------------------------------------------------------------


def test_build_model_and_count_parameters():
    assert set(MODELS) == {"unet", "mlp"}
    model = build_model("mlp", hidden=8, depth=1, time_dim=4)
    assert isinstance(model, MLP)
    time_mlp, first = (4 * 8 + 8) + (8 * 8 + 8), 2 * 8 + 8
    block = 2 * 8 + 3 * (8 * 8 + 8)  # LayerNorm, then fc1, time_proj and fc2
    last = 2 * 8 + (8 * 2 + 2)  # LayerNorm, then the output layer
    expected = time_mlp + first + block + last
    assert count_parameters(model) == expected
    model.input.weight.requires_grad_(False)
    assert count_parameters(model) == expected - 16
    assert count_parameters(model, trainable_only=False) == expected
    assert isinstance(build_model("unet", **DIGITS_UNET), UNet)
    with pytest.raises(ValueError, match=r"name must be one of 'unet', 'mlp', got 'resnet'"):
        build_model("resnet")


def test_unet_parameter_count_grows_with_width():
    small = count_parameters(UNet(**DIGITS_UNET))
    wide = count_parameters(UNet(**dict(DIGITS_UNET, base_channels=64)))
    assert math.isclose(wide / small, 4, rel_tol=0.1)  # conv weights scale with width squared


# --- configs: frozen dataclasses that check themselves (issue 13) ------------------------------


def test_unet_config_checks_normalises_and_is_frozen():
    config = UNetConfig(**dict(SMALL_UNET, channel_mult=[1, np.int64(2)], dropout=0))
    assert config.channel_mult == (1, 2) and type(config.channel_mult[1]) is int
    assert config.dropout == 0.0 and isinstance(config.dropout, float)
    assert config.resolutions == [16, 8] and config.channels == [12, 24]
    assert config.item_shape == (3, 16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_size = 32
    assert hash(config) == hash(UNetConfig(**SMALL_UNET)) and config == UNetConfig(**SMALL_UNET)
    with pytest.raises(ValueError, match=r"num_heads=5 must divide the 24 channels.*resolution 8"):
        UNetConfig(**dict(SMALL_UNET, num_heads=5))
    with pytest.raises(ValueError, match="in_channels must be an integer in"):
        UNetConfig(in_channels=0)
    with pytest.raises(TypeError, match="attention_resolutions must be a sequence of ints"):
        UNetConfig(attention_resolutions=14)


def test_a_model_is_built_from_its_config_or_from_an_old_checkpoint_dict():
    # The dict as checkpoints written before issue 13 store it: JSON lists, every field named.
    old_dict = json.loads(
        '{"in_channels": 1, "image_size": 8, "base_channels": 32, "channel_mult": [1, 2], '
        '"num_res_blocks": 1, "attention_resolutions": [4], "dropout": 0.0, "num_groups": 8, '
        '"num_heads": 1}'
    )
    from_dict = build_model("unet", **old_dict)
    from_config = build_model("unet", UNetConfig(**old_dict))
    assert from_dict.config == old_dict == from_config.config
    assert from_dict.hparams == from_config.hparams == UNetConfig(**DIGITS_UNET)
    assert from_config.state_dict().keys() == from_dict.state_dict().keys()
    mlp = build_model("mlp", MLPConfig(dim=3, hidden=8))
    assert mlp.config == dict(dim=3, hidden=8, depth=3, time_dim=64) and mlp.dim == 3
    with pytest.raises(TypeError, match="not both"):
        UNet(UNetConfig(), image_size=8)
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet(MLPConfig())
    assert MODEL_CONFIGS == {"unet": UNetConfig, "mlp": MLPConfig}


def test_models_expose_their_item_shape():
    unet, mlp = UNet(**SMALL_UNET), MLP(dim=5)
    assert unet.item_shape == (3, 16, 16) and mlp.item_shape == (5,)
    assert (unet.in_channels, unet.image_size) == (3, 16)
    for model in (unet, mlp):  # a batch of the item shape is what forward accepts
        x = torch.zeros(2, *model.item_shape)
        assert model(x, torch.tensor([0, 1])).shape == x.shape


def test_both_networks_share_one_input_check():
    unet, mlp = UNet(**SMALL_UNET), MLP(dim=3)
    messages = []
    for model, x in ((unet, torch.zeros(2, 3, 8, 8)), (mlp, torch.zeros(2, 4))):
        with pytest.raises(ValueError) as info:
            model(x, torch.tensor([0, 1]))
        messages.append(str(info.value))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            model(x.tolist(), torch.tensor([0, 1]))
    assert messages == [
        "x must have shape (B, 3, 16, 16) (in_channels=3, image_size=16), got (2, 3, 8, 8)",
        "x must have shape (B, 3) (dim=3), got (2, 4)",
    ]
