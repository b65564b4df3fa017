"""Gaussian mixtures: data whose noisy versions and perfect noise predictor are known exactly.

If x_0 follows a mixture of Gaussians N(mu_k, diag(s_k^2)) with weights w_k, then x_t follows the
mixture N(sqrt(abar_t) mu_k, diag(abar_t s_k^2 + 1 - abar_t)) with the same weights. The best noise
prediction in the mean-squared sense is E[eps | x_t] = -sqrt(1 - abar_t) grad log q(x_t) (Tweedie's
formula), which we can evaluate in closed form. This is the book's "perfect network" and the tests'
ground truth for every sampler.

Explained in chapter 4 (the reverse process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ddpm_lib._checks import check_int, check_real, check_timesteps
from ddpm_lib._random import randn
from ddpm_lib.guidance import NULL_CLASS, check_labels
from ddpm_lib.schedule import NoiseSchedule


class GaussianMixture:
    """A mixture of K Gaussians with diagonal covariances in D dimensions.

    Args:
        means: component means, shape (K, D).
        stds: component standard deviations, shape (K,) (isotropic) or (K, D) (diagonal); > 0.
        weights: mixing weights, shape (K,), non-negative, summing to 1.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | torch.Tensor,
        stds: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor,
        weights: Sequence[float] | torch.Tensor,
    ) -> None:
        means64 = torch.as_tensor(means, dtype=torch.float64)
        if means64.ndim != 2 or means64.shape[0] < 1 or means64.shape[1] < 1:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {means64.shape}")
        K, D = means64.shape
        stds64 = torch.as_tensor(stds, dtype=torch.float64)
        if stds64.shape == (K,):
            stds64 = stds64[:, None].expand(K, D)  # (K,) -> (K, D)
        if stds64.shape != (K, D):
            raise ValueError(
                f"stds must have shape (K,) or (K, D) = ({K}, {D}), got {stds64.shape}"
            )
        if not bool(torch.all(stds64 > 0)):
            raise ValueError(f"stds must all be > 0, got minimum {stds64.min().item()}")
        weights64 = torch.as_tensor(weights, dtype=torch.float64)
        if weights64.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},), got {weights64.shape}")
        if not bool(torch.all(weights64 >= 0)) or abs(weights64.sum().item() - 1.0) > 1e-6:
            raise ValueError(
                "weights must be non-negative and sum to 1 (within 1e-6), "
                f"got sum {weights64.sum().item():.6g} and minimum {weights64.min().item():.3g}"
            )
        self.means = means64
        self.stds = stds64.contiguous()
        self.weights = weights64 / weights64.sum()  # exact normalisation after float32 rounding

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 0.8, std: float = 0.05) -> GaussianMixture:
        """Equal-weight Gaussians evenly spaced on a circle: the classic mode-collapse test.

        Args:
            n_modes: number of components, >= 1.
            radius: radius of the circle, > 0.
            std: standard deviation of every component, > 0.
        """
        n_modes = check_int("n_modes", n_modes, low=1)
        radius = check_real("radius", radius, low=0, low_open=True)
        std = check_real("std", std, low=0, low_open=True)
        angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(means, torch.full((n_modes,), std), torch.full((n_modes,), 1.0 / n_modes))

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` points, shape (n, D), float32 (and their component labels, shape (n,)).

        Args:
            n: number of points, >= 1.
            generator: a CPU random generator.
            return_labels: also return which component drew each point.
        """
        n = check_int("n", n, low=1)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = randn((n, self.dim), generator=generator, dtype=torch.float64)
        x = (self.means[labels] + self.stds[labels] * z).float()
        return (x, labels) if return_labels else x

    def noised(self, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances of the components of q(x_t) for each abar_t in a batch.

        Args:
            abar: alphas_cumprod at each item's step, shape (B,).

        Returns:
            means (B, K, D) and variances (B, K, D) of the noised components.
        """
        abar = abar.to(torch.float64)[:, None, None]  # (B,) -> (B, 1, 1)
        means = abar.sqrt() * self.means.to(abar.device)
        variances = abar * self.stds.to(abar.device) ** 2 + (1.0 - abar)
        return means, variances

    def _log_components(
        self, x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor
    ) -> torch.Tensor:
        """log(w_k N(x | mean_k, variance_k)), shape (B, K)."""
        diff = x.to(torch.float64)[:, None, :] - means  # (B, D) -> (B, K, D)
        log_normal = -0.5 * (diff**2 / variances + variances.log() + math.log(2 * math.pi))
        return self.weights.to(x.device).log() + log_normal.sum(dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x_0) of each point, shape (B,), in float64.

        Args:
            x: points, shape (B, D).
        """
        var = (self.stds**2).to(x.device)[None]  # (K, D) -> (1, K, D)
        means = self.means.to(x.device)[None]  # (K, D) -> (1, K, D)
        return torch.logsumexp(self._log_components(x, means, var), dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior probability that each point came from each component, shape (B, K)."""
        var = (self.stds**2).to(x.device)[None]  # (K, D) -> (1, K, D)
        means = self.means.to(x.device)[None]  # (K, D) -> (1, K, D)
        return torch.softmax(self._log_components(x, means, var), dim=1)

    def marginal_log_prob(self, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor):
        """log q(x_t) of noisy points at their steps t, shape (B,), in float64.

        Args:
            schedule: the noise schedule.
            x_t: noisy points, shape (B, D).
            t: timesteps in [0, T-1], LongTensor of shape (B,).
        """
        t = check_timesteps(t, schedule.T, x_t.shape[0])
        means, variances = self.noised(schedule.alphas_cumprod.to(x_t.device)[t])
        return torch.logsumexp(self._log_components(x_t, means, variances), dim=1)

    def eps_oracle(self, schedule: NoiseSchedule, component: int | None = None) -> NoiseOracle:
        """The perfect noise predictor for this data: ``model(x_t, t) = E[eps | x_t]``.

        E[eps | x_t] = -sqrt(1 - abar_t) grad_x log q(x_t), and for a mixture the score is the
        responsibility-weighted score of each noised component. Labels make it the exact
        conditional predictor: ``model(x_t, t, y) = E[eps | x_t, y]``, component y's own closed
        form (y = -1: the whole mixture), which is what guided sampling needs (chapter 9).

        Explained in chapter 4.

        Args:
            schedule: the noise schedule the data are noised with.
            component: None for the mixture (a conditional model with K classes, one per
                component); k in [0, K-1] for component k alone (an unconditional model).

        Returns:
            a callable ``model(x_t, t)`` / ``model(x_t, t, y)`` taking (B, D) points, a LongTensor
            t of shape (B,) and optional labels (B,), returning (B, D) in the dtype of ``x_t``.
        """
        if component is not None:
            component = check_int("component", component, low=0, high=self.n_components - 1)
        return NoiseOracle(self, schedule, component)

    def tilted_log_density(self, x: torch.Tensor, component: int, w: float) -> torch.Tensor:
        """log of p(x | k) p(k | x)^(w - 1), unnormalised, shape (B,), in float64.

        The density that classifier-free guidance with scale w is often said to sample (its score
        is the guided score at t = 0); chapter 9 measures how far guided sampling is from it.

        Args:
            x: points, shape (B, D).
            component: the class k, in [0, K-1].
            w: the guidance scale, >= 0.
        """
        k = check_int("component", component, low=0, high=self.n_components - 1)
        w = check_real("w", w, low=0.0)
        var = (self.stds**2).to(x.device)[None]  # (K, D) -> (1, K, D)
        log_joint = self._log_components(x, self.means.to(x.device)[None], var)  # (B, K)
        log_class_given_x = log_joint[:, k] - torch.logsumexp(log_joint, dim=1)
        log_x_given_class = log_joint[:, k] - self.weights[k].log()
        return log_x_given_class + (w - 1.0) * log_class_given_x

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, D={self.dim})"


class NoiseOracle:
    """E[eps | x_t] (or E[eps | x_t, y]) of a ``GaussianMixture``: ``GaussianMixture.eps_oracle``.

    Attributes:
        num_classes: K when it answers for the mixture (labels pick a component), None when it
            answers for one fixed component.
    """

    def __init__(
        self, mixture: GaussianMixture, schedule: NoiseSchedule, component: int | None
    ) -> None:
        self.mixture, self.schedule, self.component = mixture, schedule, component
        self.num_classes = mixture.n_components if component is None else None

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        mixture, K = self.mixture, self.mixture.n_components
        if x_t.ndim != 2 or x_t.shape[1] != mixture.dim:
            raise ValueError(f"x_t must have shape (B, {mixture.dim}), got {tuple(x_t.shape)}")
        t = check_timesteps(t, self.schedule.T, x_t.shape[0])
        abar = self.schedule.alphas_cumprod.to(x_t.device)[t]
        means, variances = mixture.noised(abar)
        if self.component is not None:
            if y is not None:
                raise ValueError(f"this oracle answers for component {self.component} only: no y")
            y = torch.full((x_t.shape[0],), self.component, device=x_t.device)
        # Responsibilities p(k | x_t), replaced by certainty for the items that name a class.
        weights = torch.softmax(mixture._log_components(x_t, means, variances), dim=1)  # (B, K)
        if y is not None:
            y = check_labels(y, K, x_t.shape[0]).to(x_t.device)
            known = F.one_hot(y.clamp(min=0), K).to(weights.dtype)  # (B,) -> (B, K)
            weights = torch.where((y != NULL_CLASS)[:, None], known, weights)
        diff = x_t.to(torch.float64)[:, None, :] - means  # (B, D) -> (B, K, D)
        score = -(weights[..., None] * diff / variances).sum(dim=1)  # (B, K, D) -> (B, D)
        sigma = (1.0 - abar.to(torch.float64)).sqrt()[:, None]  # (B,) -> (B, 1)
        return (-sigma * score).to(x_t.dtype)
