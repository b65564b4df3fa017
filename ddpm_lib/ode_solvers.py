"""Solvers of the probability-flow ODE: DPM-Solver++(2M) and Heun's method.

Song et al. (2021) show that a deterministic process carries pure noise to data through the same
marginals q(x_t) as DDPM's random one. Written with y = x_t / sqrt(abar_t) and the noise-to-signal
ratio sigma_t = sqrt((1 - abar_t) / abar_t), that process is the ordinary differential equation

    dy / dsigma = eps_theta(x_t, t),

and every step of a deterministic sampler is one numerical method for it. DDIM (eta = 0) is
Euler's method (Karras et al. 2022, eq. 4 and appendix). Heun's method (Karras et al.'s sampler)
follows the slope at both ends of a step: second order, two network calls per step.
DPM-Solver++(2M) (Lu et al. 2022) integrates the part of the equation that is linear in x_t
exactly in lambda = log(sqrt(abar) / sqrt(1 - abar)) (half the log signal-to-noise ratio), and
reuses the previous step's x_0 prediction to make the rest second order at one network call per
step.

All coefficients are computed in float64 from alphas_cumprod; the states stay in the caller's
dtype. Explained in chapter 7 (evaluation), section 7.7.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm_lib._checks import check_int
from ddpm_lib.schedule import NoiseSchedule

# The step into t = 0 is second order like the others: diffusers' DPMSolverMultistepScheduler
# drops it to first order ("lower_order_final") below 15 steps, because with timesteps spaced
# uniformly in t it is by far the longest in lambda. With lambda spacing (the default here) no
# step is longer than another, and on the digits the first-order last step was no better at 8-20
# steps and much worse at 5 (Frechet distance 51 against 25; benchmarks/samplers.py measures it
# again). Set this to N to take that step with first order whenever there are fewer than N steps.
LOWER_ORDER_FINAL_BELOW = 0


def lower_order_final(n_steps: int) -> bool:
    """Whether DPM-Solver++(2M) takes its step into t = 0 with first order (see above)."""
    return n_steps < LOWER_ORDER_FINAL_BELOW


def half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2; +inf for abar = 1 (clean data)."""
    return math.inf if abar >= 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))


def lambda_spaced_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` increasing timesteps from 0 to T - 1, evenly spaced in lambda rather than in t.

    The linear schedule changes lambda fastest near t = 0: ten steps spaced in t end with a step
    of 3.6 in lambda, 6.5 times the shortest; spaced in lambda, every step is about 1.07.
    Timesteps are rounded to integers (the network knows only those) and pushed apart where the
    rounding would merge two of them.

    Args:
        schedule: the noise schedule of the model.
        steps: number of timesteps, in [1, T].
    """
    T = schedule.T
    steps = check_int("steps", steps, low=1, high=T)
    if steps == 1:
        return [T - 1]
    abar = schedule.alphas_cumprod_float64.numpy()
    lambdas = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
    targets = np.linspace(lambdas[0], lambdas[-1], steps)  # from t = 0 to t = T - 1
    # lambdas is decreasing: interpolate t as a function of -lambda, which increases.
    t = np.interp(-targets, -lambdas, np.arange(T)).round().astype(int).tolist()
    for i in range(1, steps):  # strictly increasing: t[i] >= i ...
        t[i] = max(t[i], t[i - 1] + 1)
    t[-1] = T - 1
    for i in range(steps - 2, -1, -1):  # ... and below the next one, down from T - 1
        t[i] = min(t[i], t[i + 1] - 1)
    return t


def dpm_solver_2m_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    abar_t: float,
    abar_s: float,
    previous: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """One step of DPM-Solver++(2M) from t to s < t (Lu et al. 2022, Algorithm 2).

    With lambda = log(alpha / sigma) and h = lambda_s - lambda_t,

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - exp(-h)) D,

    where D = x0 gives first order (exactly DDIM's step) and
    D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev, r = h_prev / h, gives second order from the
    previous step's prediction x0_prev made at the noisier timestep u (h_prev = lambda_t -
    lambda_u). The step into clean data (abar_s = 1, lambda_s = inf) is x0 itself.

    Args:
        x_t: current state, shape (B, ...).
        x0: the x_0 predicted at t (clipped or not, as the caller chose), shape of ``x_t``.
        abar_t: alphas_cumprod at t.
        abar_s: alphas_cumprod at s (1.0 for the end).
        previous: ``(x0_prev, abar_u)`` for a second-order step; None for first order.

    Returns:
        x_s.
    """
    if abar_s >= 1.0:
        return x0
    lambda_t, lambda_s = half_log_snr(abar_t), half_log_snr(abar_s)
    h = lambda_s - lambda_t
    d = x0
    if previous is not None:
        x0_prev, abar_u = previous
        r = (lambda_t - half_log_snr(abar_u)) / h
        d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    sigma_ratio = math.sqrt((1.0 - abar_s) / (1.0 - abar_t))
    return sigma_ratio * x_t + math.sqrt(abar_s) * (-math.expm1(-h)) * d


def noise_to_signal(abar: float) -> float:
    """sigma of the ODE's variable y = x / sqrt(abar): sqrt((1 - abar) / abar)."""
    return math.sqrt((1.0 - abar) / abar)


def heun_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_s: float,
    eps_at_s,
) -> torch.Tensor:
    """One step of Heun's method on dy/dsigma = eps from t to s < t (Karras et al., Algorithm 1).

    Euler's step (DDIM's) proposes x_s; the network's slope there, averaged with the slope at t,
    makes the step second order. The step into clean data stays Euler's: there is no network to
    call at sigma = 0.

    Args:
        x_t: current state, shape (B, ...).
        eps: the slope at t: the noise predicted at t (matching a clipped x_0, if clipped).
        abar_t: alphas_cumprod at t.
        abar_s: alphas_cumprod at s (1.0 for the end).
        eps_at_s: callable ``x_s -> eps`` predicting the noise at s (one network call).

    Returns:
        x_s.
    """
    sigma_t, sigma_s = noise_to_signal(abar_t), noise_to_signal(abar_s)
    y_t = x_t / math.sqrt(abar_t)
    y_euler = y_t + (sigma_s - sigma_t) * eps
    if abar_s >= 1.0:
        return y_euler
    eps_s = eps_at_s(math.sqrt(abar_s) * y_euler)
    return math.sqrt(abar_s) * (y_t + (sigma_s - sigma_t) * 0.5 * (eps + eps_s))
