"""Random draws that honour an optional generator living on another device than the data."""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws on ``device``; drawn on the generator's device, then moved."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def randint(
    high: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform integers in [0, high) on ``device``, drawn on the generator's device."""
    source = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=source).to(device)
