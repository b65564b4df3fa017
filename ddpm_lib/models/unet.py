"""The noise-predicting U-Net epsilon_theta(x_t, t) for images, after Ho et al. (appendix B).

Explained in chapter 5 (training). The shape is Ho et al.'s (and lucidrains'): a stack of residual
blocks that halves the resolution level by level, a middle block with self-attention, and a mirrored
stack that doubles it back, fed by skip connections from the way down. Every residual block is told
the timestep through a learned embedding. Leaner than the original: optional attention levels, a
scale-shift time conditioning and a zero-initialised output, so an untrained model predicts eps = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lib._checks import check_int, check_real, check_tensor
from ddpm_lib.models.embedding import TimeEmbedding

# A U-Net for scikit-learn's 8x8 digits that trains usefully in 10 minutes on two CPU cores:
# two levels (8x8 and 4x4), attention at 4x4 and in the middle, 0.76 M parameters.
DIGITS_UNET = dict(
    in_channels=1,
    image_size=8,
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    num_groups=8,
    num_heads=1,
)


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


class UNet(nn.Module):
    """U-Net that predicts the noise eps in x_t, called as ``model(x_t, t)``.

    Explained in chapter 5 (training). Levels run from ``image_size`` down to
    ``image_size / 2**(len(channel_mult) - 1)``; level i has ``base_channels * channel_mult[i]``
    channels. The middle block (lowest resolution) always has self-attention, as in Ho et al.

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
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (14,),
        dropout: float = 0.1,
        num_groups: int = 32,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, low=1)
        image_size = check_int("image_size", image_size, low=1)
        base_channels = check_int("base_channels", base_channels, low=1)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, low=1)
        dropout = check_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        num_groups = check_int("num_groups", num_groups, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        if isinstance(channel_mult, (str, bytes)) or not isinstance(channel_mult, Sequence):
            raise TypeError(f"channel_mult must be a sequence of ints, got {channel_mult!r}")
        if len(channel_mult) == 0:
            raise ValueError("channel_mult must hold at least one positive int, got ()")
        channel_mult = [check_int("channel_mult[i]", m, low=1) for m in channel_mult]
        if isinstance(attention_resolutions, (str, bytes)) or not isinstance(
            attention_resolutions, Sequence
        ):
            raise TypeError(
                f"attention_resolutions must be a sequence of ints, got {attention_resolutions!r}"
            )
        attention_resolutions = [
            check_int("attention_resolutions[i]", r, low=1) for r in attention_resolutions
        ]

        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            accepted = [s for s in range(factor, 4 * factor + 1, factor)]
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**(len(channel_mult) - 1) = "
                f"{factor} for channel_mult={tuple(channel_mult)}; accepted image sizes are "
                f"multiples of {factor} (e.g. {accepted}), or use fewer levels in channel_mult"
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions={tuple(attention_resolutions)} holds {unknown}, which "
                f"is no resolution of this U-Net; accepted values are {resolutions} "
                f"(image_size={image_size}, channel_mult={tuple(channel_mult)})"
            )
        for res, mult in zip(resolutions, channel_mult, strict=True):
            if res in attention_resolutions and (base_channels * mult) % num_heads:
                raise ValueError(
                    f"num_heads={num_heads} must divide the {base_channels * mult} channels of the "
                    f"attention level at resolution {res}"
                )
        if (base_channels * channel_mult[-1]) % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the {base_channels * channel_mult[-1]} "
                "channels of the middle block"
            )

        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions),
            dropout=dropout,
            num_groups=num_groups,
            num_heads=num_heads,
        )
        self.in_channels = in_channels
        self.image_size = image_size

        time_dim = 4 * base_channels  # Ho et al.: the embedding is 4x the base width
        self.time_embedding = TimeEmbedding(base_channels, time_dim)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def level(c_in: int, c_out: int, res: int) -> _Level:
            block = ResidualBlock(c_in, c_out, time_dim, dropout, num_groups)
            attend = res in attention_resolutions
            return _Level(block, AttentionBlock(c_out, num_heads, num_groups) if attend else None)

        # Way down: remember the channels of every output that is passed across as a skip.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level(ch, base_channels * mult, resolutions[i]))
                ch = base_channels * mult
                skip_channels.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_block1 = ResidualBlock(ch, ch, time_dim, dropout, num_groups)
        self.mid_attention = AttentionBlock(ch, num_heads, num_groups)
        self.mid_block2 = ResidualBlock(ch, ch, time_dim, dropout, num_groups)

        # Way up: each block takes one skip, so there is one block more per level than down.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                c_in = ch + skip_channels.pop()
                self.up.append(level(c_in, base_channels * mult, resolutions[i]))
                ch = base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))

        self.output = nn.Sequential(
            nn.GroupNorm(group_count(ch, num_groups), ch),
            nn.SiLU(),
            _zero_init(nn.Conv2d(ch, in_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x``.

        Args:
            x: noisy images x_t of shape (B, in_channels, image_size, image_size).
            t: 0-based timesteps of shape (B,) (a single step of shape () is broadcast).

        Returns:
            The predicted eps, of the shape of ``x``.
        """
        check_tensor("x", x)
        check_tensor("t", t)
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")

        temb = self.time_embedding(t)  # (B, 4 * base_channels)
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
