"""Noise-predicting networks epsilon_theta(x_t, t): a U-Net for images, an MLP for points.

Explained in chapter 5 (training). Every model is called as ``model(x_t, t)`` with ``t`` a
LongTensor of shape (B,) of 0-based timesteps, and returns a tensor of the shape of ``x_t``. Its
hyperparameters are a frozen dataclass that checks them (``UNetConfig``, ``MLPConfig``), kept as
``model.hparams``; ``model.config`` is the same as a dict of JSON values (what checkpoints store),
so ``type(model)(**model.config)`` rebuilds it; ``model.item_shape`` is the shape of one input
item, e.g. (1, 8, 8) for the digits' U-Net or (2,) for the 2-D MLP.
"""

from __future__ import annotations

from torch import nn

from ddpm_lib.models.embedding import TimeEmbedding, timestep_embedding
from ddpm_lib.models.mlp import MLP, MLPConfig
from ddpm_lib.models.unet import UNet, UNetConfig

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": MLP}
MODEL_CONFIGS: dict[str, type] = {"unet": UNetConfig, "mlp": MLPConfig}

__all__ = [
    "MLP",
    "MODELS",
    "MODEL_CONFIGS",
    "MLPConfig",
    "TimeEmbedding",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "timestep_embedding",
]


def build_model(name: str, config: object = None, /, **kwargs: object) -> nn.Module:
    """Build a model by name, e.g. ``build_model("unet", **DIGITS_UNET)``.

    Args:
        name: one of ``MODELS`` ("unet", "mlp").
        config: the model's config dataclass (``MODEL_CONFIGS[name]``); or leave it out and
            pass its fields as keyword arguments (a checkpoint's ``model_config`` dict).
        **kwargs: the config's fields.

    Returns:
        The new model, in training mode, on the CPU.
    """
    if name not in MODELS:
        accepted = ", ".join(repr(n) for n in MODELS)
        raise ValueError(f"name must be one of {accepted}, got {name!r}")
    return MODELS[name](config, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``model`` (only those that require grad, unless told otherwise).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
