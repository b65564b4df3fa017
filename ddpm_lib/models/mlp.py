"""A residual MLP epsilon_theta(x_t, t) for low-dimensional data such as the 2-D toy sets.

Explained in chapter 5 (training). The images' U-Net is overkill for points in the plane: a few
residual blocks of fully connected layers, each told the timestep, learn the noise of a 2-D mixture
in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lib._checks import check_config, check_int, check_model_input, config_to_dict
from ddpm_lib.guidance import class_count
from ddpm_lib.models.embedding import TimeEmbedding, add_class, class_embedding_or_none


class ResidualMLPBlock(nn.Module):
    """LayerNorm -> SiLU -> Linear, add the time embedding, SiLU -> Linear, plus the input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.time_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.time_proj(F.silu(temb))
        return h + self.fc2(F.silu(z))


@dataclass(frozen=True)
class MLPConfig:
    """The MLP's hyperparameters, checked when made (like nanoGPT's ``GPTConfig``).

    Args:
        dim: dimension of the data points (2 for the toy sets).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        time_dim: size of the sinusoidal timestep embedding.
        num_classes: None (unconditional) or K >= 1: a conditional network ``model(x_t, t, y)``
            (chapter 9).
    """

    dim: int = 2
    hidden: int = 128
    depth: int = 3
    time_dim: int = 64
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "depth", "time_dim"):  # frozen: normalise each value once
            object.__setattr__(self, name, check_int(name, getattr(self, name), low=1))
        object.__setattr__(self, "num_classes", class_count("num_classes", self.num_classes))

    @property
    def item_shape(self) -> tuple[int]:
        """The shape of one point, (dim,)."""
        return (self.dim,)

    def to_dict(self) -> dict:
        """The fields as JSON values: what checkpoints store (see ``config_to_dict``)."""
        return config_to_dict(self)


class MLP(nn.Module):
    """Residual MLP that predicts the noise eps in points x_t of shape (B, dim): ``model(x_t, t)``.

    Explained in chapter 5 (training); with ``num_classes``, ``model(x_t, t, y)`` in chapter 9.

    Args:
        config: an ``MLPConfig``; or leave it out and pass its fields (dim, hidden, depth,
            time_dim, num_classes) as keyword arguments, e.g. ``MLP(**model.config)`` (a
            checkpoint's dict).

    Attributes:
        hparams: the ``MLPConfig``.
        config: the same as a dict, which rebuilds it: ``MLP(**model.config)``.
        item_shape: the shape of one input point, (dim,).
    """

    def __init__(self, config: MLPConfig | None = None, /, **kwargs: object) -> None:
        super().__init__()
        self.hparams = check_config(MLPConfig, config, kwargs)
        dim, hidden = self.hparams.dim, self.hparams.hidden

        self.time_embedding = TimeEmbedding(self.hparams.time_dim, hidden)
        self.class_embedding = class_embedding_or_none(self.hparams.num_classes, hidden)
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden) for _ in range(self.hparams.depth))
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, dim)
        # Start by predicting eps = 0, the mean of the target: the first steps are not wasted.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self._input_described = f"dim={dim}"

    @property
    def config(self) -> dict:
        """The constructor arguments: ``MLP(**model.config)`` rebuilds the network."""
        return self.hparams.to_dict()

    @property
    def item_shape(self) -> tuple[int]:
        """The shape of one input point, (dim,)."""
        return self.hparams.item_shape

    @property
    def dim(self) -> int:
        return self.hparams.dim

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in ``x``.

        Args:
            x: noisy points x_t of shape (B, dim).
            t: 0-based timesteps of shape (B,) (a single step of shape () is broadcast).
            y: conditional networks only: classes, LongTensor (B,), ``NULL_CLASS`` (-1) for no
                class; None asks every item for no class.

        Returns:
            The predicted eps, of shape (B, dim).
        """
        t = check_model_input(x, t, self.item_shape, self._input_described)

        temb = add_class(self.time_embedding(t), self.class_embedding, y)  # (B, hidden)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.output(F.silu(self.norm(h)))
