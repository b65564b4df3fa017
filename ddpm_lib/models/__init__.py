"""Noise-predicting networks epsilon_theta(x_t, t): a U-Net for images, an MLP for points.

Explained in chapter 5 (training). Every model is called as ``model(x_t, t)`` with ``t`` a
LongTensor of shape (B,) of 0-based timesteps, returns a tensor of the shape of ``x_t``, and keeps
its constructor arguments in ``model.config`` so that ``type(model)(**model.config)`` rebuilds it.
"""

from __future__ import annotations

from torch import nn

from ddpm_lib.models.embedding import TimeEmbedding, timestep_embedding
from ddpm_lib.models.mlp import MLP
from ddpm_lib.models.unet import DIGITS_UNET, UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": MLP}

__all__ = [
    "DIGITS_UNET",
    "MLP",
    "MODELS",
    "TimeEmbedding",
    "UNet",
    "build_model",
    "count_parameters",
    "timestep_embedding",
]


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by name, e.g. ``build_model("unet", **DIGITS_UNET)``.

    Args:
        name: one of ``MODELS`` ("unet", "mlp").
        **kwargs: the model's constructor arguments (its ``config``).

    Returns:
        The new model, in training mode, on the CPU.
    """
    if name not in MODELS:
        accepted = ", ".join(repr(n) for n in MODELS)
        raise ValueError(f"name must be one of {accepted}, got {name!r}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``model`` (only those that require grad, unless told otherwise).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
