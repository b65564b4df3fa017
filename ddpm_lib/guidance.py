"""Classifier-free guidance (Ho & Salimans 2022): one network, two answers, and a slider.

A conditional network ``model(x_t, t, y)`` is trained with a share of its labels replaced by
``NULL_CLASS`` ("no class"), so the same weights learn the conditional noise predictor
eps(x_t, t, y) and the unconditional one eps(x_t, t). Guided sampling mixes the two,

    eps_guided = eps_uncond + w (eps_cond - eps_uncond),

so w = 0 samples the data of every class, w = 1 samples class y, and w > 1 pushes further away
from "any class" towards what makes y recognisable. Explained in chapter 9 (guidance).
"""

from __future__ import annotations

import torch

from ddpm_lib._checks import check_int, check_real, check_tensor

NULL_CLASS = -1  # the label that asks for no class: the unconditional half of the network


def num_classes_of(model: object) -> int | None:
    """The number of classes ``model`` is conditioned on, or None for an unconditional model.

    A ``UNet`` or ``MLP`` says it in its config (``num_classes``); any other callable, such as
    ``GaussianMixture.eps_oracle``, by a ``num_classes`` attribute.
    """
    hparams = getattr(model, "hparams", None)
    if hparams is not None:
        return getattr(hparams, "num_classes", None)
    return getattr(model, "num_classes", None)


def check_labels(labels: object, num_classes: int | None, batch: int) -> torch.Tensor:
    """Check class labels for a batch: a LongTensor (B,) of classes in [0, K-1] or ``NULL_CLASS``.

    Args:
        labels: the labels to check.
        num_classes: K, the model's number of classes; None for an unconditional model (which
            accepts no labels).
        batch: B, the batch size the labels must match.

    Returns:
        The labels as int64.
    """
    check_tensor("labels", labels)
    if num_classes is None:
        raise ValueError(
            "labels were given, but the model is unconditional (trained without classes); "
            "sample it without labels, or train one with class_dropout / --conditional"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (torch.long), got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape (B,) = ({batch},), got {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < NULL_CLASS or high > num_classes - 1:
        raise ValueError(
            f"labels must be classes in [0, {num_classes - 1}] (or {NULL_CLASS} for no class), "
            f"got values in [{low}, {high}]"
        )
    return labels.long()


def check_guidance_scale(guidance_scale: object, labels: object) -> float:
    """The guidance scale w >= 0; anything but 1 needs labels to guide towards."""
    w = check_real("guidance_scale", guidance_scale, low=0.0)
    if labels is None and w != 1.0:
        raise ValueError(
            f"guidance_scale={w:g} needs labels (the classes to guide towards); without labels "
            "the model samples unconditionally and guidance_scale must stay 1"
        )
    return w


def drop_labels(labels: torch.Tensor | None, p: float | None, generator=None):
    """Label dropout: each label becomes ``NULL_CLASS`` with probability ``p``, independently.

    What teaches one network both predictors (Ho & Salimans use p = 0.1 or 0.2). The trainer
    calls it every step: an unconditional run (``p`` None, no labels) passes through, drawing
    nothing from the generator.

    Args:
        labels: class labels, LongTensor (B,); None for an unconditional run.
        p: the probability of dropping each label, in [0, 1]; None for an unconditional run.
        generator: random generator on the labels' device (reproducible, resumable runs).
    """
    if p is None:
        return labels
    p = check_real("class_dropout", p, low=0.0, high=1.0)
    if p == 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def guided_eps(
    model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Classifier-free guided noise: eps_uncond + w (eps_cond - eps_uncond).

    Ho & Salimans write the same mix as (1 + w') eps_cond - w' eps_uncond, so their w' = w - 1:
    their w' = 0 (plain conditional) is our w = 1. For w not 0 or 1 the conditional and the
    unconditional halves go through the network as one batch of 2B: one call, not two.
    Unchecked: ``sample()`` checks the arguments first.

    Args:
        model: a conditional noise predictor ``model(x_t, t, y)``.
        x_t: noisy batch, shape (B, ...).
        t: timesteps, LongTensor (B,).
        labels: classes, LongTensor (B,); ``NULL_CLASS`` items stay unconditional.
        guidance_scale: w >= 0.
    """
    if guidance_scale == 1.0:
        return model(x_t, t, labels)
    null = torch.full_like(labels, NULL_CLASS)
    if guidance_scale == 0.0:
        return model(x_t, t, null)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))  # 2B items
    eps_cond, eps_uncond = both.chunk(2)  # (2B, ...) -> two (B, ...)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def class_index(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows of a class embedding with K + 1 rows: class k is row k, ``NULL_CLASS`` is row K."""
    return torch.where(labels == NULL_CLASS, torch.full_like(labels, num_classes), labels)


def class_count(name: str, value: object) -> int | None:
    """A network config's ``num_classes``: None (unconditional) or an int >= 1."""
    return None if value is None else check_int(name, value, low=1)
