"""How good is a diffusion model? Its likelihood bound and the distance of its samples to data.

- ``variational_bound``: Ho et al.'s variational bound (eq. 5) on the negative log-likelihood, in
  bits per dimension, term by term: the prior term L_T, the KL terms L_{t-1} and the decoder L_0,
  a discretised Gaussian for data on K levels (256 for 8-bit images, 17 for the digits).
- ``frechet_distance``: the distance between two Gaussians fitted to two sets of features (FID's
  formula); ``classifier.digits_frechet_distance`` feeds it the digits classifier's features.
- ``sliced_wasserstein``: a sample distance for low-dimensional data such as the 2-D toy sets.
- ``inception_fid``: FID for image users, through torchmetrics (optional, downloads its weights).

Explained in chapter 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_lib._checks import check_choice, check_int, check_tensor
from ddpm_lib.diffusion import posterior_mean, predict_x0, q_sample
from ddpm_lib.schedule import NoiseSchedule, extract

LN2 = math.log(2.0)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.

    Args broadcast against each other; the result has their broadcast shape.
    """
    # expm1(d) - d rather than exp(d) - 1 - d: the two variances are often equal, and float32
    # rounding of the naive form would then leave a spurious 1e-7 nats per element.
    diff = logvar1 - logvar2
    return 0.5 * (torch.expm1(diff) - diff + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """log P(x) per element for data on ``levels`` evenly spaced values in [-1, 1].

    Each value owns the bin of half-width 1 / (levels - 1) around it; the two end values own
    everything beyond -1 and 1, so the probabilities of all levels sum to one (Ho et al. eq. 13).

    Args:
        x: data on the grid, any shape.
        mean: decoder mean, broadcastable to ``x``.
        log_scale: log of the decoder's standard deviation, broadcastable to ``x``.
        levels: number of values, >= 2.
    """
    half_bin = 1.0 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_scale  # standardised bin edges
    lower = (x - mean - half_bin) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # P(lower < z < upper), computed in the tail where it is not a difference of two numbers near 1.
    mass = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(mass.clamp_min(1e-12))
    edge = 1e-3 * half_bin  # x sits exactly on a level; this only guards float rounding
    return torch.where(
        x < -1.0 + edge, log_cdf_upper, torch.where(x > 1.0 - edge, log_survival_lower, log_mass)
    )


@dataclass
class VariationalBound:
    """Ho et al.'s bound L = L_T + sum_t L_{t-1} + L_0 for each example, in bits per dimension.

    Attributes:
        prior: L_T = KL(q(x_T | x_0) || N(0, I)) per example, shape (N,).
        terms: shape (N, T); column 0 is the decoder's -log p(x_0 | x_1) (L_0), column t >= 1 is
            KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (L_{t-1}), with 0-based t.
        mse: the squared error of the predicted noise, shape (N, T), for comparison with the loss.
    """

    prior: torch.Tensor
    terms: torch.Tensor
    mse: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The bound on -log p(x_0) of each example in bits per dimension, shape (N,)."""
        return self.prior + self.terms.sum(dim=1)

    def summary(self) -> dict:
        """Mean bound, its standard error over examples, and the mean of each part, in bits/dim."""
        n = self.total.shape[0]
        return {
            "bpd": self.total.mean().item(),
            "standard_error": (self.total.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
            "prior": self.prior.mean().item(),
            "decoder": self.terms[:, 0].mean().item(),
            "kl_terms": self.terms[:, 1:].sum(dim=1).mean().item(),
            "n": n,
        }


def _model_variance(schedule: NoiseSchedule, variance: str) -> torch.Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t), shape (T,). At t = 0 both choices use the posterior
    variance of t = 1, as Ho et al.'s code does (beta_0 itself would make the decoder too sharp)."""
    if variance == "small":
        return schedule.posterior_log_variance_clipped
    return torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))


@torch.no_grad()
def variational_bound(
    model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    levels: int | None = None,
    variance: str = "small",
    clip_x0: bool = True,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> VariationalBound:
    """Every term of the variational bound for each example of ``x0``: T network calls per example.

    Like Ho et al.'s ``calc_bpd_loop``: at each step t, draw x_t ~ q(x_t | x_0) with fresh noise and
    compare the model's reverse step with the exact one (chapter 4). The sum is an upper bound on
    -log p(x_0); averaged over data it bounds the model's cross-entropy.

    Explained in chapter 7.

    Args:
        model: noise predictor ``model(x_t, t)``; it is put in eval mode.
        schedule: the noise schedule the model was trained with.
        x0: data in [-1, 1], shape (N, ...). With ``levels`` it must lie on the level grid.
        levels: number of values each dimension takes (256 for 8-bit images, 17 for the digits);
            None for continuous data, where the decoder is a Gaussian density (the bound may then
            be negative).
        variance: the reverse process's fixed variance, "small" (posterior) or "large" (beta).
        clip_x0: clip the predicted x_0 to [-1, 1] before forming the reverse mean, as the
            sampler does (set False for data that are not in [-1, 1]).
        batch_size: examples per network call, >= 1.
        generator: random generator of the noise.
        progress: show a progress bar over the T steps.

    Returns:
        a ``VariationalBound`` with per-example, per-step terms in bits per dimension.
    """
    x0 = check_tensor("x0", x0)
    if x0.ndim < 2 or x0.shape[0] == 0 or not x0.dtype.is_floating_point:
        raise ValueError(
            f"x0 must be a float tensor of shape (N, ...) with N >= 1, got {tuple(x0.shape)}"
        )
    if levels is not None:
        levels = check_int("levels", levels, low=2)
        on_grid = (x0 + 1.0) * (levels - 1) / 2.0  # level index, e.g. 0..16 for the digits
        if (
            (on_grid - on_grid.round()).abs().max() > 1e-3
            or x0.min() < -1.0 - 1e-6
            or x0.max() > 1.0 + 1e-6
        ):
            raise ValueError(
                f"x0 must lie on the {levels} levels evenly spaced in [-1, 1] "
                f"when levels={levels}; pass levels=None for continuous data"
            )
    variance = check_choice("variance", variance, ("small", "large"))
    batch_size = check_int("batch_size", batch_size, low=1)
    if isinstance(model, torch.nn.Module):
        model.eval()

    T, device = schedule.T, x0.device
    schedule = schedule.to(device)
    log_var = _model_variance(schedule, variance)
    dims = x0[0].numel()
    prior, terms, mse = [], [], []
    bar = tqdm(total=T * math.ceil(x0.shape[0] / batch_size), desc="bound", disable=not progress)
    for chunk in x0.split(batch_size):
        B = chunk.shape[0]
        chunk_terms = torch.empty(B, T, device=device)
        chunk_mse = torch.empty(B, T, device=device)
        # Several steps share one network call, up to batch_size examples: a network called on a
        # few examples costs nearly as much as on hundreds. The noise is drawn step by step in
        # the same order as one step at a time, so the result does not depend on the grouping.
        steps_per_call = max(1, batch_size // B)
        for first in range(T - 1, -1, -steps_per_call):
            steps = list(range(first, max(first - steps_per_call, -1), -1))
            repeated = chunk.repeat(len(steps), *([1] * (chunk.ndim - 1)))  # (k B, ...)
            t = torch.tensor(steps, device=device).repeat_interleave(B)
            noise = torch.cat(
                [
                    torch.randn(chunk.shape, generator=generator, device=device, dtype=chunk.dtype)
                    for _ in steps
                ]
            )
            x_t = q_sample(schedule, repeated, t, noise)
            eps = model(x_t, t)
            x0_pred = predict_x0(schedule, x_t, t, eps)
            if clip_x0:
                x0_pred = x0_pred.clamp(-1.0, 1.0)
            # The model's reverse mean is the posterior mean with x_0 replaced by its prediction
            # (Ho et al. eq. 7 and 11).
            model_mean = posterior_mean(schedule, x0_pred, x_t, t)
            model_log_var = extract(log_var, t, repeated.shape)
            # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1 ...
            true_mean = posterior_mean(schedule, repeated, x_t, t)
            true_log_var = extract(schedule.posterior_log_variance_clipped, t, repeated.shape)
            term = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
            if steps[-1] == 0:  # ... and L_0 = -log p(x_0 | x_1) for the last B rows
                mean_0, log_var_0 = model_mean[-B:], model_log_var[-B:]
                if levels is None:
                    term[-B:] = 0.5 * (
                        math.log(2 * math.pi) + log_var_0 + (chunk - mean_0) ** 2 / log_var_0.exp()
                    )
                else:
                    term[-B:] = -discretized_gaussian_log_likelihood(
                        chunk, mean_0, 0.5 * log_var_0, levels
                    )
            bits = term.flatten(1).sum(dim=1) / (dims * LN2)  # nats -> bits/dim, (k B,)
            mse_per_item = (eps - noise).flatten(1).pow(2).mean(dim=1)
            chunk_terms[:, steps] = bits.view(len(steps), B).T.to(chunk_terms.dtype)
            chunk_mse[:, steps] = mse_per_item.view(len(steps), B).T.to(chunk_mse.dtype)
            bar.update(len(steps))
        # L_T = KL(q(x_T | x_0) || N(0, I)); no parameters, but it says how much signal is left.
        t_last = torch.full((B,), T - 1, device=device, dtype=torch.long)
        mean_T = extract(schedule.sqrt_alphas_cumprod, t_last, chunk.shape) * chunk
        log_var_T = torch.log(extract(1.0 - schedule.alphas_cumprod, t_last, chunk.shape))
        kl_T = normal_kl(mean_T, log_var_T, torch.zeros_like(mean_T), torch.zeros_like(mean_T))
        prior.append(kl_T.flatten(1).sum(dim=1) / (dims * LN2))
        terms.append(chunk_terms)
        mse.append(chunk_mse)
    bar.close()
    return VariationalBound(
        prior=torch.cat(prior).cpu(), terms=torch.cat(terms).cpu(), mse=torch.cat(mse).cpu()
    )


def _check_features(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {tuple(x.shape)}")
    return x.to(torch.float64)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (negative rounding -> 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Squared Frechet distance between Gaussians fitted to two sets of features.

    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the formula of FID. It is biased
    upwards for small sets, so compare only values computed with the same set sizes.

    Explained in chapter 7.

    Args:
        features_a: shape (N_a, D), N_a >= 2.
        features_b: shape (N_b, D), N_b >= 2.
    """
    a = _check_features("features_a", features_a)
    b = _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_b must have D = {a.shape[1]} columns like features_a, got {b.shape[1]}"
        )
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(value.item(), 0.0)


def sliced_wasserstein(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 2-Wasserstein distance between two point sets.

    Project both sets on random directions; in one dimension the optimal transport matches sorted
    values (quantiles); average the squared distances over directions and take the root.

    Explained in chapter 7.

    Args:
        a: points, shape (N_a, D).
        b: points, shape (N_b, D).
        projections: number of random directions, >= 1.
        generator: random generator of the directions.
    """
    a = _check_features("a", a)
    b = _check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b must have D = {a.shape[1]} columns like a, got {b.shape[1]}")
    projections = check_int("projections", projections, low=1)
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (D, P) unit columns
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values  # (N, P)
    if pa.shape[0] != pb.shape[0]:  # compare the quantile functions on a common grid
        n = max(pa.shape[0], pb.shape[0])
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa, pb = torch.quantile(pa, levels, dim=0), torch.quantile(pb, levels, dim=0)
    return (pa - pb).pow(2).mean().sqrt().item()


def inception_fid(
    real: torch.Tensor, fake: torch.Tensor, *, device=None, batch_size: int = 100
) -> float:
    """FID with torchmetrics' Inception network, for images in [-1, 1] of shape (N, 1 or 3, H, W).

    Optional: needs ``pip install "torchmetrics[image]"``, which downloads the Inception weights on
    first use. Use it on a GPU with thousands of images; the book's CPU chapters use
    ``digits_frechet_distance`` instead.
    """
    try:
        # An optional dependency that downloads weights: imported only when asked for.
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise ImportError(
            "inception_fid needs torchmetrics with its image extras: "
            'pip install "torchmetrics[image]"'
        ) from error
    for name, x in (("real", real), ("fake", fake)):
        x = check_tensor(name, x)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{name} must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    batch_size = check_int("batch_size", batch_size, low=1)
    metric = FrechetInceptionDistance(normalize=True).to(device or "cpu")
    for x, is_real in ((real, True), (fake, False)):
        for chunk in x.split(batch_size):
            chunk = ((chunk.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)  # [-1, 1] -> [0, 1], RGB
            metric.update(chunk.to(metric.device), real=is_real)
    return metric.compute().item()
