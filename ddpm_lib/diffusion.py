"""The forward process, its tractable posterior, and the training loss (Ho et al. sections 2-3).

Explained in chapters 3 (forward), 4 (reverse) and 5 (training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddpm_lib._checks import check_batch, check_real, check_same_shape, check_timesteps
from ddpm_lib._random import randint, randn
from ddpm_lib.schedule import NoiseSchedule, extract

# A noise-prediction network: model(x_t, t) -> eps, with t a LongTensor of shape (B,).
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def q_sample(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in one step: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    Explained in chapter 3.

    Args:
        schedule: the noise schedule.
        x0: clean data, shape (B, ...).
        t: timesteps in [0, T-1], LongTensor of shape (B,).
        noise: the standard normal eps, shape of ``x0``; drawn when omitted.
        generator: random generator used when ``noise`` is drawn.
    """
    x0 = check_batch("x0", x0)
    t = check_timesteps(t, schedule.T, x0.shape[0])
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    check_same_shape("noise", noise, "x0", x0)
    return _noised(schedule, x0, t, noise)


def _noised(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """q_sample without the checks, for callers that have checked (or drawn) t themselves."""
    # Ho et al. eq. 4
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_sample_iterative(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t by running the forward chain step by step (for teaching; O(t) instead of O(1)).

    Each step is x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps_s (Ho et al. eq. 2), for
    s = 0 .. t; items of the batch stop at their own t.

    Explained in chapter 3.

    Args:
        schedule: the noise schedule.
        x0: clean data, shape (B, ...).
        t: timesteps in [0, T-1], LongTensor of shape (B,).
        generator: random generator for the T step noises.
    """
    x0 = check_batch("x0", x0)
    t = check_timesteps(t, schedule.T, x0.shape[0])
    x = x0.clone()
    alphas, betas = schedule.alphas.to(x0.device), schedule.betas.to(x0.device)
    for s in range(int(t.max()) + 1 if t.numel() else 0):
        eps = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        stepped = alphas[s].sqrt() * x + betas[s].sqrt() * eps
        still_running = (t >= s).reshape(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
        x = torch.where(still_running, stepped, x)
    return x


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0), the reverse step that knowing x_0 makes exact.

    At t = 0 the "previous" state is x_0 itself: mean x_0, variance 0.

    Explained in chapter 4.

    Args:
        schedule: the noise schedule.
        x0: clean data, shape (B, ...).
        x_t: the noisy data at step t, shape of ``x0``.
        t: timesteps in [0, T-1], LongTensor of shape (B,).

    Returns:
        ``(mean, variance)``: the mean has the shape of ``x0``; the variance has shape
        (B, 1, ..., 1), ready to broadcast.
    """
    x0 = check_batch("x0", x0)
    check_same_shape("x_t", x_t, "x0", x0)
    t = check_timesteps(t, schedule.T, x0.shape[0])
    mean = posterior_mean(schedule, x0, x_t, t)
    variance = extract(schedule.posterior_variance, t, x0.shape)
    return mean, variance


def posterior_mean(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """``q_posterior``'s mean without the checks, for callers whose t is in range by construction
    (the variational bound). Ho et al. eq. 7, coefficients from ``posterior_coefficients``."""
    return (
        extract(schedule.posterior_mean_coef_x0, t, x0.shape) * x0
        + extract(schedule.posterior_mean_coef_xt, t, x0.shape) * x_t
    )


def predict_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Invert the forward closed form: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    Explained in chapter 4.

    Args:
        schedule: the noise schedule.
        x_t: noisy data, shape (B, ...).
        t: timesteps in [0, T-1], LongTensor of shape (B,).
        eps: the (predicted) noise, shape of ``x_t``.
    """
    x_t = check_batch("x_t", x_t)
    check_same_shape("eps", eps, "x_t", x_t)
    t = check_timesteps(t, schedule.T, x_t.shape[0])
    return x0_from_eps(x_t, eps, *_sqrt_abar(schedule, t, x_t.shape))


def predict_eps(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """The inverse of ``predict_x0``: the noise that turns ``x0`` into ``x_t`` at step t.

    Explained in chapter 4.

    Args:
        schedule: the noise schedule.
        x_t: noisy data, shape (B, ...).
        t: timesteps in [0, T-1], LongTensor of shape (B,).
        x0: the (predicted) clean data, shape of ``x_t``.
    """
    x_t = check_batch("x_t", x_t)
    check_same_shape("x0", x0, "x_t", x_t)
    t = check_timesteps(t, schedule.T, x_t.shape[0])
    return eps_from_x0(x_t, x0, *_sqrt_abar(schedule, t, x_t.shape))


def x0_from_eps(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    sqrt_abar: float | torch.Tensor,
    sqrt_one_minus_abar: float | torch.Tensor,
) -> torch.Tensor:
    """Ho et al. eq. 4 solved for x_0, unchecked: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    The one home of this formula: ``predict_x0``, the samplers and the variational bound use it.
    The coefficients are floats (the samplers' float64 numbers) or tensors that broadcast against
    ``x_t``.
    """
    return (x_t - sqrt_one_minus_abar * eps) / sqrt_abar


def eps_from_x0(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sqrt_abar: float | torch.Tensor,
    sqrt_one_minus_abar: float | torch.Tensor,
) -> torch.Tensor:
    """Ho et al. eq. 4 solved for eps, unchecked: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

    The inverse of ``x0_from_eps``, used by ``predict_eps`` and by the samplers after clipping x_0.
    """
    return (x_t - sqrt_abar * x0) / sqrt_one_minus_abar


def _sqrt_abar(
    schedule: NoiseSchedule, t: torch.Tensor, x_shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) of each item, shaped (B, 1, ..., 1) for ``x_shape``."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_shape),
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_shape),
    )


def diffusion_loss(
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    p2_gamma: float | None = None,
) -> torch.Tensor:
    """Ho et al.'s Algorithm 1: the simple loss || eps - eps_theta(x_t, t) ||^2.

    Draws t uniformly from {0, ..., T-1} and eps from N(0, I) unless given, builds x_t in closed
    form, and compares the network's prediction with the true noise.

    Explained in chapter 5.

    Args:
        model: the noise predictor, called as ``model(x_t, t)``.
        schedule: the noise schedule.
        x0: a batch of clean data, shape (B, ...).
        t: timesteps, LongTensor of shape (B,); uniform over [0, T-1] when omitted.
        noise: the eps added, shape of ``x0``; standard normal when omitted.
        generator: random generator for t and noise.
        reduction: "mean" for a scalar, "none" for one loss per item, shape (B,).
        labels: for a conditional model, the classes (B,) it is told, -1 for "no class"
            (chapter 9); the model is then called as ``model(x_t, t, labels)``.
        min_snr_gamma: None for L_simple; gamma > 0 weights each item by min(SNR_t, gamma) / SNR_t
            (Hang et al. 2023, "min-SNR-gamma", for eps-prediction): the nearly clean steps, whose
            noise is hard to see and easy to overfit, count less; steps with SNR <= gamma keep 1.
        p2_gamma: None for L_simple; gamma >= 0 weights each item by 1 / (1 + SNR_t)^gamma
            (Choi et al. 2022, "P2" with k = 1): a smooth fall from 1 at pure noise towards 0 at
            the clean end, where min-SNR-gamma cuts off at a threshold. Not with min_snr_gamma.
    """
    x0 = check_batch("x0", x0)
    if min_snr_gamma is not None:
        min_snr_gamma = check_real("min_snr_gamma", min_snr_gamma, low=0, low_open=True)
    if p2_gamma is not None:
        p2_gamma = check_real("p2_gamma", p2_gamma, low=0)
        if min_snr_gamma is not None:
            raise ValueError("give min_snr_gamma or p2_gamma, not both: each is a whole weighting")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if t is None:  # drawn in range: no need for check_timesteps' device syncs every step
        t = randint(schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    else:
        t = check_timesteps(t, schedule.T, x0.shape[0])
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    check_same_shape("noise", noise, "x0", x0)
    x_t = _noised(schedule, x0, t, noise)
    eps_pred = model(x_t, t) if labels is None else model(x_t, t, labels)
    check_same_shape("model output", eps_pred, "x0", x0)
    per_item = F.mse_loss(eps_pred.float(), noise.float(), reduction="none")
    per_item = per_item.reshape(x0.shape[0], -1).mean(dim=1)  # (B, ...) -> (B,)
    if min_snr_gamma is not None:
        snr = schedule.signal_to_noise.to(t.device)[t]
        per_item = per_item * snr.clamp(max=min_snr_gamma) / snr
    if p2_gamma is not None:
        snr = schedule.signal_to_noise.to(t.device)[t]
        per_item = per_item / (1 + snr) ** p2_gamma
    return per_item.mean() if reduction == "mean" else per_item
