"""A residual MLP epsilon_theta(x_t, t) for low-dimensional data such as the 2-D toy sets.

Explained in chapter 5 (training). The images' U-Net is overkill for points in the plane: a few
residual blocks of fully connected layers, each told the timestep, learn the noise of a 2-D mixture
in seconds on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lib._checks import check_int, check_tensor
from ddpm_lib.models.embedding import TimeEmbedding


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


class MLP(nn.Module):
    """Residual MLP that predicts the noise eps in points x_t of shape (B, dim): ``model(x_t, t)``.

    Explained in chapter 5 (training).

    Args:
        dim: dimension of the data points (2 for the toy sets).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        time_dim: size of the sinusoidal timestep embedding.
    """

    def __init__(
        self, *, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 64
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim, low=1)
        hidden = check_int("hidden", hidden, low=1)
        depth = check_int("depth", depth, low=1)
        time_dim = check_int("time_dim", time_dim, low=1)
        self.config = dict(dim=dim, hidden=hidden, depth=depth, time_dim=time_dim)
        self.dim = dim

        self.time_embedding = TimeEmbedding(time_dim, hidden)
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, dim)
        # Start by predicting eps = 0, the mean of the target: the first steps are not wasted.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x``.

        Args:
            x: noisy points x_t of shape (B, dim).
            t: 0-based timesteps of shape (B,) (a single step of shape () is broadcast).

        Returns:
            The predicted eps, of shape (B, dim).
        """
        check_tensor("x", x)
        check_tensor("t", t)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"x must have shape (B, {self.dim}) (dim={self.dim}), got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")

        temb = self.time_embedding(t)  # (B, hidden)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.output(F.silu(self.norm(h)))
