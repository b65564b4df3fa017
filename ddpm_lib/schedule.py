"""The noise schedule: how much noise each forward step adds (Ho et al. section 2).

Explained in chapter 3 (the forward process). Time steps are 0-based: ``t = 0`` is the first noising
step and ``t = T - 1`` the last; ``alphas_cumprod[t]`` is the product of ``alphas[0..t]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from ddpm_lib._checks import check_int, check_real

SCHEDULE_KINDS = ("linear", "cosine")

# A float or a float tensor: the equation helpers serve the samplers (floats) and the schedule.
Real = TypeVar("Real", float, torch.Tensor)


class NoiseSchedule:
    """Variances beta_t of the forward process and every quantity derived from them.

    Everything is computed in float64 and stored as float32 tensors of shape (T,), as in Ho et al.'s
    code: the cumulative product over 1000 steps loses digits in float32.

    Explained in chapter 3.

    Args:
        betas: the variances beta_0 .. beta_{T-1}, each in (0, 1).
        kind: a label kept for checkpoints and printing ("linear", "cosine" or "custom").
        params: the arguments that rebuild the schedule with ``NoiseSchedule.from_dict``.
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray | torch.Tensor,
        *,
        kind: str = "custom",
        params: dict | None = None,
    ) -> None:
        betas64 = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if betas64.ndim != 1 or betas64.numel() < 1:
            raise ValueError(f"betas must be a 1-D sequence of length T >= 1, got {betas64.shape}")
        if not bool(torch.all((betas64 > 0) & (betas64 < 1))):
            bad = betas64[~((betas64 > 0) & (betas64 < 1))][0].item()
            raise ValueError(f"betas must all lie in the open interval (0, 1), found {bad}")
        self.kind = kind
        self.params = dict(params or {"betas": betas64.tolist()})

        alphas = 1.0 - betas64
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # abar_{-1} = 1: before the first step there is no noise.
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 7; its variance is 0 at t = 0.
        coef_x0, coef_xt, posterior_variance = posterior_coefficients(
            alphas_cumprod, alphas_cumprod_prev
        )
        # log(0) at t = 0 is replaced by the value at t = 1, as in Ho et al.'s code.
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            if len(betas64) > 1
            else betas64
        )

        as32 = dict(dtype=torch.float32)
        self.betas = betas64.to(**as32)
        self.alphas = alphas.to(**as32)
        self.alphas_cumprod = alphas_cumprod.to(**as32)
        # The samplers' copy: abar_t in float64 on the CPU (1 - abar_t near t = 0 keeps its
        # digits). ``to()`` leaves it on the CPU: some accelerators have no float64.
        self.alphas_cumprod_float64 = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev.to(**as32)
        self.posterior_variance = posterior_variance.to(**as32)
        self.posterior_log_variance_clipped = posterior_log_variance_clipped.to(**as32)
        # Coefficients of the posterior mean, Ho et al. eq. 7: mean = coef_x0 * x0 + coef_xt * x_t.
        self.posterior_mean_coef_x0 = coef_x0.to(**as32)
        self.posterior_mean_coef_xt = coef_xt.to(**as32)
        self.sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod).to(**as32)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod).to(**as32)
        self.signal_to_noise = (alphas_cumprod / (1.0 - alphas_cumprod)).to(**as32)

    # Constructors ---------------------------------------------------------------------------

    @classmethod
    def linear(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """Ho et al.'s schedule: betas evenly spaced from ``beta_start`` to ``beta_end``.

        Args:
            T: number of diffusion steps, >= 1.
            beta_start: the first variance, in (0, 1).
            beta_end: the last variance, in (0, 1) and >= beta_start.
        """
        T = check_int("T", T, low=1)
        beta_start = check_real(
            "beta_start", beta_start, low=0, high=1, low_open=True, high_open=True
        )
        beta_end = check_real("beta_end", beta_end, low=0, high=1, low_open=True, high_open=True)
        if beta_start > beta_end:
            raise ValueError(
                f"beta_start must be <= beta_end, got beta_start={beta_start} > beta_end={beta_end}"
            )
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        params = {"T": T, "beta_start": beta_start, "beta_end": beta_end}
        return cls(betas, kind="linear", params=params)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's schedule: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1+s) pi/2).

        Each beta is ``1 - abar(t+1) / abar(t)``, capped at ``max_beta`` so the last steps do not
        destroy the signal in a single jump (Improved DDPM, eq. 17).

        Args:
            T: number of diffusion steps, >= 1.
            s: small offset that keeps beta_0 from being vanishingly small, >= 0.
            max_beta: the cap on every beta, in (0, 1).
        """
        T = check_int("T", T, low=1)
        s = check_real("s", s, low=0)
        max_beta = check_real("max_beta", max_beta, low=0, high=1, low_open=True, high_open=True)
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
        params = {"T": T, "s": s, "max_beta": max_beta}
        return cls(betas, kind="cosine", params=params)

    @classmethod
    def from_dict(cls, spec: dict) -> NoiseSchedule:
        """Rebuild a schedule from ``to_dict()`` (used by checkpoints)."""
        kind = spec.get("kind")
        params = dict(spec.get("params", {}))
        if kind == "linear":
            return cls.linear(**params)
        if kind == "cosine":
            return cls.cosine(**params)
        if kind == "custom":
            return cls(params["betas"])
        raise ValueError(f"schedule kind must be one of 'linear', 'cosine', 'custom', got {kind!r}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params)}

    # Properties -----------------------------------------------------------------------------

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio of x_t given x_0: abar_t / (1 - abar_t), shape (T,)."""
        return self.signal_to_noise

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Return a copy whose tensors live on ``device``."""
        moved = object.__new__(NoiseSchedule)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and name != "alphas_cumprod_float64":
                value = value.to(device)
            setattr(moved, name, value)
        return moved

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "betas")
        return (
            f"NoiseSchedule.{self.kind}({args})"
            if self.kind != "custom"
            else (f"NoiseSchedule(T={self.T})")
        )


def posterior_coefficients(abar_t: Real, abar_s: Real) -> tuple[Real, Real, Real]:
    """Ho et al. eq. 7 for a step from t down to s < t, unchecked: the posterior
    q(x_s | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance).

    With s = t - 1 this is eq. 7 itself (abar_t / abar_s = alpha_t); with s further down it is the
    step of a respaced sampler (Nichol & Dhariwal). ``abar_s = 1`` means s = -1, the end (variance
    0). The one home of these formulas: ``NoiseSchedule``, ``ddpm_step`` and, through the
    schedule, ``q_posterior`` and the variational bound use it.

    Explained in chapter 4.

    Args:
        abar_t: alphas_cumprod at t: a float, or a float tensor (float64 where digits matter).
        abar_s: alphas_cumprod at s, of the same kind and shape as ``abar_t``.

    Returns:
        ``(coef_x0, coef_xt, variance)``, each of the kind and shape of ``abar_t``.
    """
    sqrt = torch.sqrt if isinstance(abar_t, torch.Tensor) else math.sqrt
    alpha = abar_t / abar_s  # the step's alpha; alphas[t] when s = t - 1
    beta = 1.0 - alpha
    coef_x0 = sqrt(abar_s) * beta / (1.0 - abar_t)
    coef_xt = sqrt(alpha) * (1.0 - abar_s) / (1.0 - abar_t)
    variance = beta * (1.0 - abar_s) / (1.0 - abar_t)
    return coef_x0, coef_xt, variance


def extract(values: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Pick ``values[t]`` for each item of a batch, shaped to broadcast against ``x_shape``.

    Args:
        values: a per-step quantity, shape (T,).
        t: timesteps, LongTensor of shape (B,).
        x_shape: the shape (B, ...) of the tensors the result multiplies.
    """
    out = values.to(t.device).gather(0, t)
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))  # (B,) -> (B, 1, ..., 1)
