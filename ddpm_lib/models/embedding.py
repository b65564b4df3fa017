"""Sinusoidal timestep embedding: how the network is told which step t it is denoising.

Explained in chapter 5 (training). The same sines and cosines as the position encoding of
"Attention is all you need", as used by Ho et al.: one network serves all T steps because t is
one of its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddpm_lib._checks import check_int, check_real, check_tensor
from ddpm_lib.guidance import NULL_CLASS, class_index


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed integer timesteps as sines and cosines of geometrically spaced frequencies.

    Explained in chapter 5. Frequencies go from 1 down to 1 / max_period, so nearby steps get close
    vectors and distant steps different ones. The first half of the output holds the sines, the
    second half the cosines (Ho et al.'s order); an odd ``dim`` gets one zero column at the end.

    Args:
        t: timesteps of shape (B,), integer or float.
        dim: size of the embedding, >= 1.
        max_period: the slowest period, > 1 (10000 in Ho et al.).

    Returns:
        A float32 tensor of shape (B, dim) on the device of ``t``.
    """
    check_tensor("t", t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    dim = check_int("dim", dim, low=1)
    max_period = check_real("max_period", max_period, low=1.0, low_open=True)

    half = dim // 2
    # Ho et al. divide by (half - 1) so that the last frequency is exactly 1 / max_period.
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, 1) * (1, half) -> (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))  # (B, dim - 1) -> (B, dim)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a small MLP (sinusoid -> Linear -> SiLU -> Linear).

    Explained in chapter 5. The MLP learns which features of t matter to the layers.

    Args:
        dim: size of the sinusoidal embedding.
        out_dim: size of the output; defaults to ``dim``.
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, low=1)
        out_dim = self.dim if out_dim is None else check_int("out_dim", out_dim, low=1)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Map timesteps of shape (B,) to embeddings of shape (B, out_dim)."""
        return self.mlp(timestep_embedding(t, self.dim))


class ClassEmbedding(nn.Module):
    """A learned vector per class and one for "no class", added to the time embedding.

    Explained in chapter 9 (guidance). Row k is class k; row K is ``NULL_CLASS``, the
    unconditional case, which label dropout trains and ``y=None`` asks for. The table starts at
    zero, so an untrained conditional network is the unconditional one.

    Args:
        num_classes: K, the number of classes, >= 1.
        dim: size of each vector (the time embedding's size).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.table = nn.Embedding(self.num_classes + 1, check_int("dim", dim, low=1))
        nn.init.zeros_(self.table.weight)

    def forward(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Map labels of shape (B,) (or None: no class for all) to vectors of shape (B, dim).

        Values are not range-checked here (that would cost a device sync per call); ``sample``
        and the trainer check them before any work, and the table refuses out-of-range rows.
        """
        if y is None:
            y = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=self.table.weight.device)
        check_tensor("y", y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor (torch.long), got dtype {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
        return self.table(class_index(y.long(), self.num_classes))


def class_embedding_or_none(num_classes: int | None, dim: int) -> ClassEmbedding | None:
    """A ``ClassEmbedding`` for a conditional network; None for an unconditional one."""
    return None if num_classes is None else ClassEmbedding(num_classes, dim)


def add_class(temb: torch.Tensor, embedding: ClassEmbedding | None, y: torch.Tensor | None):
    """The time embedding plus the class's vector; an unconditional network refuses labels."""
    if embedding is not None:
        return temb + embedding(y, temb.shape[0])
    if y is not None:
        raise ValueError(
            "y (class labels) was given, but this network is unconditional (num_classes=None)"
        )
    return temb
