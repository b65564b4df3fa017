"""The noise-predicting U-Net epsilon_theta(x_t, t) for images, after Ho et al. (appendix B).

Explained in chapter 5 (training). The shape is Ho et al.'s (and lucidrains'): a stack of residual
blocks that halves the resolution level by level, a middle block with self-attention, and a mirrored
stack that doubles it back, fed by skip connections from the way down. Every residual block is told
the timestep through a learned embedding. Leaner than the original: optional attention levels, a
scale-shift time conditioning and a zero-initialised output, so an untrained model predicts eps = 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lib._checks import (
    check_config,
    check_int,
    check_int_sequence,
    check_model_input,
    check_real,
    config_to_dict,
)
from ddpm_lib.guidance import class_count
from ddpm_lib.models.embedding import TimeEmbedding, add_class, class_embedding_or_none


def group_count(channels: int, num_groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``num_groups`` (GroupNorm needs one)."""
    return max(g for g in range(1, min(channels, num_groups) + 1) if channels % g == 0)


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the timestep injected as a scale and shift.

    The second conv starts at zero, so every block starts as the identity (a well-behaved deep net).
    """

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, dropout: float, num_groups: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_channels, num_groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(group_count(out_channels, num_groups), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # (B, time_dim) -> (B, 2C, 1, 1) -> two (B, C, 1, 1): broadcast over the pixels
        scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, with a residual connection.

    Lets distant pixels talk at low resolution, where a 3x3 conv sees only a small neighbourhood.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(group_count(channels, num_groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        # (B, 3C, H, W) -> (B, 3, heads, C / heads, HW) -> (3, B, heads, HW, C / heads)
        qkv = qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).permute(1, 0, 2, 4, 3)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, HW, C / heads)
        h = h.transpose(2, 3).reshape(B, C, H, W)  # (B, heads, C / heads, HW) -> (B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (Ho et al.)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv to smooth it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, block: ResidualBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.block = block
        self.attention = attention if attention is not None else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attention(self.block(x, temb))


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's hyperparameters, checked when made (like nanoGPT's ``GPTConfig``).

    Explained in chapter 5 (training). Levels run from ``image_size`` down to
    ``image_size / 2**(len(channel_mult) - 1)``; level i has ``base_channels * channel_mult[i]``
    channels. ``UNetConfig(**model.config)`` rebuilds the config a checkpoint stores as a dict.

    Args:
        in_channels: channels of the images (1 for grey, 3 for colour).
        image_size: side of the square images, divisible by 2**(len(channel_mult) - 1).
        base_channels: channels of the first level.
        channel_mult: channel multiplier of each level; its length is the number of levels.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (in pixels) whose levels apply self-attention.
        dropout: dropout probability inside the residual blocks, in [0, 1).
        num_groups: GroupNorm groups, reduced to a divisor of each channel count.
        num_heads: attention heads; must divide the channel count of each attention level.
        num_classes: None (unconditional) or K >= 1: a conditional network ``model(x_t, t, y)``
            whose class embedding is added to the time embedding (chapter 9).
    """

    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (14,)
    dropout: float = 0.1
    num_groups: int = 32
    num_heads: int = 1
    num_classes: int | None = None

    def __post_init__(self) -> None:
        fix = functools.partial(object.__setattr__, self)  # frozen: normalise each value once
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks"):
            fix(name, check_int(name, getattr(self, name), low=1))
        fix("dropout", check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True))
        fix("num_groups", check_int("num_groups", self.num_groups, low=1))
        fix("num_heads", check_int("num_heads", self.num_heads, low=1))
        fix("num_classes", class_count("num_classes", self.num_classes))
        fix(
            "channel_mult",
            check_int_sequence("channel_mult", self.channel_mult, low=1, nonempty=True),
        )
        fix(
            "attention_resolutions",
            check_int_sequence("attention_resolutions", self.attention_resolutions, low=1),
        )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            accepted = [s for s in range(factor, 4 * factor + 1, factor)]
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**(len(channel_mult) - 1) = "
                f"{factor} for channel_mult={self.channel_mult}; accepted image sizes are "
                f"multiples of {factor} (e.g. {accepted}), or use fewer levels in channel_mult"
            )
        unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions={self.attention_resolutions} holds {unknown}, which "
                f"is no resolution of this U-Net; accepted values are {self.resolutions} "
                f"(image_size={self.image_size}, channel_mult={self.channel_mult})"
            )
        for res, channels in zip(self.resolutions, self.channels, strict=True):
            if res in self.attention_resolutions and channels % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the {channels} channels of the "
                    f"attention level at resolution {res}"
                )
        if self.channels[-1] % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the {self.channels[-1]} "
                "channels of the middle block"
            )

    @property
    def resolutions(self) -> list[int]:
        """The side in pixels of each level, from ``image_size`` down."""
        return [self.image_size // 2**i for i in range(len(self.channel_mult))]

    @property
    def channels(self) -> list[int]:
        """The channels of each level: ``base_channels * channel_mult[i]``."""
        return [self.base_channels * mult for mult in self.channel_mult]

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """The shape of one image, (in_channels, image_size, image_size)."""
        return (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        """The fields as JSON values: what checkpoints store (see ``config_to_dict``)."""
        return config_to_dict(self)


class UNet(nn.Module):
    """U-Net that predicts the noise eps in x_t, called as ``model(x_t, t)``.

    Explained in chapter 5 (training); with ``num_classes``, ``model(x_t, t, y)`` in chapter 9.
    See ``UNetConfig`` for the levels and the arguments. The middle block (lowest resolution)
    always has self-attention, as in Ho et al.

    Args:
        config: a ``UNetConfig``; or leave it out and pass its fields as keyword arguments,
            e.g. ``UNet(**DIGITS_UNET)`` or ``UNet(**model.config)`` (a checkpoint's dict).

    Attributes:
        hparams: the ``UNetConfig``.
        config: the same as a dict of JSON values, which rebuilds it: ``UNet(**model.config)``.
        item_shape: the shape of one input image, (in_channels, image_size, image_size).
    """

    def __init__(self, config: UNetConfig | None = None, /, **kwargs: object) -> None:
        super().__init__()
        self.hparams = check_config(UNetConfig, config, kwargs)
        cfg = self.hparams
        base_channels, dropout = cfg.base_channels, cfg.dropout
        num_groups, num_heads = cfg.num_groups, cfg.num_heads
        resolutions = cfg.resolutions
        self._input_described = f"in_channels={cfg.in_channels}, image_size={cfg.image_size}"

        time_dim = 4 * base_channels  # Ho et al.: the embedding is 4x the base width
        self.time_embedding = TimeEmbedding(base_channels, time_dim)
        self.class_embedding = class_embedding_or_none(cfg.num_classes, time_dim)
        self.input_conv = nn.Conv2d(cfg.in_channels, base_channels, 3, padding=1)

        def level(c_in: int, c_out: int, res: int) -> _Level:
            block = ResidualBlock(c_in, c_out, time_dim, dropout, num_groups)
            attend = res in cfg.attention_resolutions
            return _Level(block, AttentionBlock(c_out, num_heads, num_groups) if attend else None)

        # Way down: remember the channels of every output that is passed across as a skip.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for i, channels in enumerate(cfg.channels):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level(ch, channels, resolutions[i]))
                ch = channels
                skip_channels.append(ch)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_block1 = ResidualBlock(ch, ch, time_dim, dropout, num_groups)
        self.mid_attention = AttentionBlock(ch, num_heads, num_groups)
        self.mid_block2 = ResidualBlock(ch, ch, time_dim, dropout, num_groups)

        # Way up: each block takes one skip, so there is one block more per level than down.
        self.up = nn.ModuleList()
        for i, channels in reversed(list(enumerate(cfg.channels))):
            for _ in range(cfg.num_res_blocks + 1):
                c_in = ch + skip_channels.pop()
                self.up.append(level(c_in, channels, resolutions[i]))
                ch = channels
            if i > 0:
                self.up.append(Upsample(ch))

        self.output = nn.Sequential(
            nn.GroupNorm(group_count(ch, num_groups), ch),
            nn.SiLU(),
            _zero_init(nn.Conv2d(ch, cfg.in_channels, 3, padding=1)),
        )

    @property
    def config(self) -> dict:
        """The constructor arguments as JSON values: ``UNet(**model.config)`` rebuilds the net."""
        return self.hparams.to_dict()

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """The shape of one input image, (in_channels, image_size, image_size)."""
        return self.hparams.item_shape

    @property
    def in_channels(self) -> int:
        return self.hparams.in_channels

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in ``x``.

        Args:
            x: noisy images x_t of shape (B, in_channels, image_size, image_size).
            t: 0-based timesteps of shape (B,) (a single step of shape () is broadcast).
            y: conditional networks only: classes, LongTensor (B,), ``NULL_CLASS`` (-1) for no
                class; None asks every item for no class.

        Returns:
            The predicted eps, of the shape of ``x``.
        """
        t = check_model_input(x, t, self.item_shape, self._input_described)

        temb = add_class(self.time_embedding(t), self.class_embedding, y)  # (B, 4 * base)
        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, _Level) else layer(h)
            skips.append(h)
        h = self.mid_block1(h, temb)
        h = self.mid_attention(h)
        h = self.mid_block2(h, temb)
        for layer in self.up:
            if isinstance(layer, _Level):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)  # concat along channels
            else:
                h = layer(h)
        return self.output(h)
