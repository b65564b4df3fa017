"""Sampling: Ho et al.'s Algorithm 2 (ancestral DDPM), DDIM (Song et al. 2021), and two solvers of
the probability-flow ODE, DPM-Solver++(2M) and Heun's method (see ``ddpm_lib.ode_solvers``).

All samplers walk down an increasing sequence of timesteps tau_0 < ... < tau_{S-1}, stepping
from t = tau_i to s = tau_{i-1} (s = -1 after the last step: abar_{-1} = 1 means "no noise").
With all T steps, DDPM's step is exactly Algorithm 2; with fewer it is the respaced sampler of
Nichol & Dhariwal (the betas recomputed from abar along the sub-sequence).

Explained in chapter 6 (sampling).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_lib._checks import check_choice, check_int, check_real, check_tensor
from ddpm_lib._random import randn
from ddpm_lib.diffusion import EpsModel, eps_from_x0, x0_from_eps
from ddpm_lib.guidance import check_guidance_scale, check_labels, guided_eps, num_classes_of
from ddpm_lib.ode_solvers import (
    dpm_solver_2m_step,
    heun_step,
    lambda_spaced_timesteps,
    lower_order_final,
)
from ddpm_lib.schedule import NoiseSchedule, posterior_coefficients

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "heun")
VARIANCES = ("small", "large")
SPACINGS = ("uniform", "lambda")
ODE_SOLVERS = ("dpm++2m", "heun")


@dataclass
class Trajectory:
    """States recorded on the way down, oldest (noisiest) first.

    Attributes:
        timesteps: the step t of each record.
        x_t: the state entering step t, shape (K, *shape), on the CPU.
        x0_pred: the network's estimate of x_0 at step t, shape (K, *shape), on the CPU.
    """

    timesteps: list[int]
    x_t: torch.Tensor
    x0_pred: torch.Tensor


def timestep_sequence(T: int, steps: int | Sequence[int] | None) -> list[int]:
    """The increasing timesteps a sampler visits.

    ``None`` means all T steps; an int S picks S steps evenly spaced over [0, T-1], always including
    T-1 (so sampling starts from pure noise) and, when S > 1, 0; a sequence is used as given.

    Args:
        T: number of diffusion steps of the schedule.
        steps: None, an int in [1, T], or strictly increasing ints in [0, T-1].
    """
    if steps is None:
        return list(range(T))
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        S = check_int("steps", steps, low=1, high=T)
        return sorted({int(round(v)) for v in np.linspace(T - 1, 0, S)})
    if isinstance(steps, (Sequence, np.ndarray, torch.Tensor)):
        seq = [check_int("steps[i]", s, low=0, high=T - 1) for s in list(steps)]
        if not seq or any(b <= a for a, b in zip(seq, seq[1:])):
            raise ValueError(
                f"steps must be strictly increasing timesteps in [0, {T - 1}], got {seq}"
            )
        return seq
    raise TypeError(f"steps must be None, an int in [1, {T}] or a sequence of timesteps")


def _predicted_x0(x_t, eps, abar_t: float, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x_0 (optionally clipped to the data range [-1, 1]) and the eps that matches it."""
    sqrt_abar, sqrt_one_minus_abar = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    x0 = x0_from_eps(x_t, eps, sqrt_abar, sqrt_one_minus_abar)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, sqrt_abar, sqrt_one_minus_abar)
    return x0, eps


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_s: float,
    *,
    variance: str = "small",
    clip_x0: bool = True,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from t to s < t: draw x_s ~ N(posterior mean, sigma^2).

    The mean is q(x_s | x_t, x_0)'s with x_0 replaced by its prediction (Ho et al. eq. 7, written
    for any pair of steps); sigma^2 is that posterior's variance ("small") or beta ("large").

    Args:
        x_t: current state, shape (B, ...).
        eps: predicted noise at step t, shape of ``x_t``.
        abar_t: alphas_cumprod at t.
        abar_s: alphas_cumprod at s (1.0 when s = -1, the end).
        variance: "small" (posterior variance) or "large" (beta).
        clip_x0: clip the predicted x_0 to [-1, 1] before forming the mean.
        noise: standard normal z, shape of ``x_t``; required unless s is the end.

    Returns:
        ``(x_s, x0_pred)``.
    """
    x0, _ = _predicted_x0(x_t, eps, abar_t, clip_x0)
    coef_x0, coef_xt, posterior_var = posterior_coefficients(abar_t, abar_s)
    mean = coef_x0 * x0 + coef_xt * x_t
    if abar_s >= 1.0:  # the last step returns the mean: no noise is added to x_0
        return mean, x0
    # "large": beta of the (respaced) step; equals betas[t] when s = t - 1
    var = posterior_var if variance == "small" else 1.0 - abar_t / abar_s
    return mean + math.sqrt(var) * noise, x0


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_s: float,
    *,
    eta: float = 0.0,
    clip_x0: bool = True,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from t to s < t (Song et al. eq. 12).

    x_s = sqrt(abar_s) x0_pred + sqrt(1 - abar_s - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s). eta = 0 is
    deterministic; eta = 1 is DDPM's small-variance step.

    Args:
        x_t: current state, shape (B, ...).
        eps: predicted noise at step t, shape of ``x_t``.
        abar_t: alphas_cumprod at t.
        abar_s: alphas_cumprod at s (1.0 when s = -1, the end).
        eta: amount of fresh noise, >= 0.
        clip_x0: clip the predicted x_0 to [-1, 1] (eps is then recomputed to match).
        noise: standard normal z, shape of ``x_t``; required when sigma > 0.

    Returns:
        ``(x_s, x0_pred)``.
    """
    x0, eps = _predicted_x0(x_t, eps, abar_t, clip_x0)
    sigma2 = eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
    x_s = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - sigma2, 0.0)) * eps
    if sigma2 > 0:
        x_s = x_s + math.sqrt(sigma2) * noise
    return x_s, x0


def _model_device(model: EpsModel) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int | Sequence[int] | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    variance: str = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    return_trajectory: bool | int = False,
    progress: bool = True,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Generate data from pure noise: Algorithm 2 (``sampler="ddpm"``), DDIM, or an ODE solver.

    Explained in chapter 6, the ODE solvers in chapter 7; ``labels`` and ``guidance_scale`` in
    chapter 9. "dpm++2m" (DPM-Solver++(2M)) and "heun" solve the probability-flow ODE that DDIM's
    deterministic steps solve with Euler's method (``ddpm_lib.ode_solvers``): both are second
    order; DPM-Solver++(2M) calls the network once per step, Heun twice (2 steps - 1 calls in
    all). With labels, every step uses the classifier-free guided noise eps_uncond + w
    (eps_cond - eps_uncond) (see ``ddpm_lib.guidance.guided_eps``): w = 0 ignores the labels,
    w = 1 is plain conditional sampling, w > 1 guides harder. Ho & Salimans write (1 + w')
    eps_cond - w' eps_uncond, the same mix with w' = w - 1.

    Args:
        model: noise predictor called as ``model(x_t, t)``; put in eval mode while sampling.
        schedule: the schedule the model was trained with.
        shape: output shape (B, ...).
        sampler: "ddpm" (ancestral), "ddim", "dpm++2m" or "heun".
        steps: None for all T steps, an int in [1, T] of spaced steps, or increasing steps.
        spacing: how an int ``steps`` is spaced: "uniform" in t (always including T - 1 and 0),
            or "lambda", uniform in half the log signal-to-noise ratio, the ODE solvers' own
            time. None: "lambda" for "dpm++2m" and "heun" (DPM-Solver++(2M) on the digits at
            10 steps: Frechet distance 15.0 against 26.2, benchmarks/samplers.py), "uniform"
            for DDPM and DDIM.
        eta: DDIM only: 0 deterministic, 1 as random as DDPM; >= 0.
        variance: DDPM only: "small" (posterior variance) or "large" (beta_t).
        clip_x0: clip each predicted x_0 to the data range [-1, 1].
        generator: random generator for x_T and the step noises (reproducible runs).
        device: where to sample; defaults to the model's device.
        x_T: the starting noise, shape ``shape``; drawn from N(0, I) when omitted.
        return_trajectory: False; True to record every step; an int K to record K evenly spaced
            steps (the first and last included) without holding all T states in memory.
        progress: show a tqdm progress bar.
        labels: conditional models only: the class of each sample, LongTensor (B,) with values
            in [0, K-1], or -1 (``NULL_CLASS``) for no class; None samples unconditionally.
        guidance_scale: w >= 0, the classifier-free guidance scale; not 1 only with labels.

    Returns:
        The samples x_0, shape ``shape``; with ``return_trajectory``, also a ``Trajectory``.

    Raises:
        ValueError, TypeError: a bad argument (before any model call), or a model whose output
            does not have the shape of ``x_t``.
        FloatingPointError: the samples are not finite (the model predicted NaN or Inf).
    """
    # Check everything before any work.
    sampler = check_choice("sampler", sampler, SAMPLERS)
    variance = check_choice("variance", variance, VARIANCES)
    if spacing is None:
        spacing = "lambda" if sampler in ODE_SOLVERS else "uniform"
    spacing = check_choice("spacing", spacing, SPACINGS)
    eta = check_real("eta", eta, low=0)
    if sampler != "ddim" and eta != 0:
        raise ValueError(
            "eta applies to sampler='ddim' only; DDPM's noise is set by `variance`, and the ODE "
            "solvers add none"
        )
    shape = tuple(shape)
    if not shape or any(
        not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1 for d in shape
    ):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (B, ...), got {shape}")
    timesteps = _spaced_timesteps(schedule, steps, spacing)
    guidance_scale = check_guidance_scale(guidance_scale, labels)
    if labels is not None:
        labels = check_labels(labels, num_classes_of(model), shape[0])
    n_records = _record_count(return_trajectory, len(timesteps))
    device = torch.device(device) if device is not None else _model_device(model)
    if x_T is not None:
        check_tensor("x_T", x_T)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")

    # Coefficients in float64 on the CPU: abar near 1 loses digits in float32.
    abar = schedule.alphas_cumprod_float64.tolist()
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        if labels is None:
            eps = model(x, t_batch)
        else:
            eps = guided_eps(model, x, t_batch, labels, guidance_scale)
        if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:  # broadcasting hides it
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"model output must have the shape of x_t {shape}, got {got}")
        return eps.float()

    try:
        if labels is not None:
            labels = labels.to(device)
        x = (
            x_T.to(device).float()
            if x_T is not None
            else randn(shape, generator=generator, device=device)
        )
        record_at = set(np.linspace(0, len(timesteps) - 1, n_records).round().astype(int).tolist())
        recorded: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        previous = None  # DPM-Solver++(2M)'s memory: the last x_0 prediction and its abar
        loop = list(enumerate(reversed(timesteps)))
        for i, t in tqdm(loop, desc=f"{sampler} sampling", disable=not progress, leave=False):
            s = timesteps[len(timesteps) - 2 - i] if i < len(timesteps) - 1 else -1
            abar_t, abar_s = abar[t], (abar[s] if s >= 0 else 1.0)
            eps = predict(x, t)
            if sampler == "ddpm":
                z = randn(shape, generator=generator, device=device) if s >= 0 else None
                x_next, x0 = ddpm_step(
                    x, eps, abar_t, abar_s, variance=variance, clip_x0=clip_x0, noise=z
                )
            elif sampler == "ddim":
                needs_noise = s >= 0 and eta > 0
                z = randn(shape, generator=generator, device=device) if needs_noise else None
                x_next, x0 = ddim_step(x, eps, abar_t, abar_s, eta=eta, clip_x0=clip_x0, noise=z)
            elif sampler == "dpm++2m":
                x0, _ = _predicted_x0(x, eps, abar_t, clip_x0)
                last = i == len(timesteps) - 2 and lower_order_final(len(timesteps))
                x_next = dpm_solver_2m_step(x, x0, abar_t, abar_s, None if last else previous)
                previous = (x0, abar_t)
            else:  # heun

                def eps_at_s(x_s: torch.Tensor, s: int = s) -> torch.Tensor:
                    return _predicted_x0(x_s, predict(x_s, s), abar[s], clip_x0)[1]

                x0, eps = _predicted_x0(x, eps, abar_t, clip_x0)
                x_next = heun_step(x, eps, abar_t, abar_s, eps_at_s)
            if i in record_at:
                recorded.append((t, x.cpu(), x0.cpu()))
            x = x_next
    finally:
        if was_training:
            model.train()
    if not torch.isfinite(x).all():  # one device sync for the whole run
        raise FloatingPointError(
            "sample: the samples hold NaN or Inf because the model's predictions did; check the "
            "network's weights (a NaN weight spreads to every output)"
        )

    if not n_records:
        return x
    trajectory = Trajectory(
        timesteps=[r[0] for r in recorded],
        x_t=torch.stack([r[1] for r in recorded]),  # K x (B, ...) -> (K, B, ...)
        x0_pred=torch.stack([r[2] for r in recorded]),  # K x (B, ...) -> (K, B, ...)
    )
    return x, trajectory


def _spaced_timesteps(
    schedule: NoiseSchedule, steps: int | Sequence[int] | None, spacing: str
) -> list[int]:
    """The sampler's timesteps: ``timestep_sequence``, or spaced in lambda for an int."""
    if spacing == "uniform" or steps is None:
        return timestep_sequence(schedule.T, steps)
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        return lambda_spaced_timesteps(schedule, steps)
    raise ValueError("spacing='lambda' spaces an int number of steps; a sequence is used as given")


def _record_count(return_trajectory: bool | int, n_steps: int) -> int:
    if isinstance(return_trajectory, bool):
        return n_steps if return_trajectory else 0
    k = check_int("return_trajectory", return_trajectory, low=1)
    return min(k, n_steps)
