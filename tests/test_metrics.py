"""The variational bound, the Frechet distance and the sliced Wasserstein distance.

The bound is checked against exact answers: on Gaussian data with the exact noise predictor
(``GaussianMixture.eps_oracle``) every KL term has a closed form, and the true negative
log-likelihood is known. Tolerances are stated in standard errors of the Monte Carlo mean.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_lib import GaussianMixture, NoiseSchedule, load_dataset
from ddpm_lib.metrics import (
    discretized_gaussian_log_likelihood,
    frechet_distance,
    inception_fid,
    normal_kl,
    sliced_wasserstein,
    variational_bound,
)

LN2 = math.log(2.0)
STD = 0.5  # the Gaussian data: N(MEAN, STD^2 I) in 2-D
MEAN = torch.tensor([[0.3, -0.2]])
N_BOUND = 2000


def gaussian_data() -> GaussianMixture:
    return GaussianMixture(means=MEAN, stds=torch.full((1, 2), STD), weights=torch.tensor([1.0]))


@pytest.fixture(scope="module")
def gaussian_bounds():
    """The bound of N_BOUND Gaussian points: exact oracle (both variances) and a zero model."""
    schedule = NoiseSchedule.linear()
    data = gaussian_data()
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(N_BOUND, generator=g).double()
    oracle = data.eps_oracle(schedule)
    kwargs = dict(clip_x0=False, generator=g, progress=False)
    bounds = {
        variance: variational_bound(oracle, schedule, x0, variance=variance, **kwargs)
        for variance in ("small", "large")
    }
    bounds["zero"] = variational_bound(lambda x, t: torch.zeros_like(x), schedule, x0, **kwargs)
    nll_bits = -data.log_prob(x0) / (2 * LN2)  # exact -log q(x_0) in bits per dimension, (N,)
    return schedule, x0, bounds, nll_bits


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-12)


def test_normal_kl_with_equal_variances_is_the_mean_term_exactly_in_float32():
    lv = torch.full((1000,), math.log(0.0198), dtype=torch.float32)
    m1, m2 = torch.zeros(1000), torch.full((1000,), 1e-3)
    assert torch.equal(normal_kl(m1, lv, m2, lv), 0.5 * (m1 - m2) ** 2 * torch.exp(-lv))


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_gaussian_sums_to_one_over_the_levels(levels):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)[:, None]  # (K, 1)
    g = torch.Generator().manual_seed(levels)
    means = torch.rand(1, 40, generator=g, dtype=torch.float64) * 3 - 1.5  # some beyond [-1, 1]
    log_scales = torch.rand(1, 40, generator=g, dtype=torch.float64) * 6 - 5  # std 0.007 to 2.7
    log_p = discretized_gaussian_log_likelihood(grid, means, log_scales, levels)  # (K, 40)
    assert torch.allclose(log_p.exp().sum(dim=0), torch.ones(40, dtype=torch.float64), atol=1e-6)


def test_discretized_gaussian_interior_bin_is_a_cdf_difference():
    x, mean, std = torch.tensor([0.25]), torch.tensor([0.3]), torch.tensor([0.1])
    normal = torch.distributions.Normal(mean, std)
    expected = normal.cdf(x + 1 / 16) - normal.cdf(x - 1 / 16)
    got = discretized_gaussian_log_likelihood(x, mean, std.log(), 17).exp()
    assert torch.allclose(got, expected, atol=1e-6)


def test_bound_terms_match_their_closed_form_on_gaussian_data(gaussian_bounds):
    """With the exact oracle the model's mean is E[x_{t-1} | x_t], so
    E[KL_t] = 0.5 (exp(d) - 1 - d + coef_x0^2 Var(x_0 | x_t) / sigma_t^2),
    d = log(var_q / sigma_t^2), with Var(x_0 | x_t) = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t)
    for x_0 ~ N(m, s^2)."""
    schedule, _, bounds, _ = gaussian_bounds
    abar = schedule.alphas_cumprod.double()
    coef = schedule.posterior_mean_coef_x0.double()
    var_q = schedule.posterior_variance.double()
    var_x0 = STD**2 * (1 - abar) / (abar * STD**2 + 1 - abar)
    for variance, sigma2 in (
        ("small", var_q),
        ("large", torch.cat([var_q[1:2], schedule.betas.double()[1:]])),
    ):
        d = torch.log(var_q[1:] / sigma2[1:])
        expected = 0.5 * (d.exp() - 1 - d + coef[1:] ** 2 * var_x0[1:] / sigma2[1:]) / LN2  # (T-1,)
        terms = bounds[variance].terms[:, 1:]  # (N, T-1)
        for t in (1, 2, 10, 100, 500, 999):
            mean, se = (
                terms[:, t - 1].mean().item(),
                terms[:, t - 1].std().item() / math.sqrt(N_BOUND),
            )
            assert abs(mean - expected[t - 1].item()) < 4 * se + 1e-9, (
                variance,
                t,
                mean,
                expected[t - 1],
            )
        total_se = terms.sum(1).std().item() / math.sqrt(N_BOUND)
        assert abs(terms.sum(1).mean().item() - expected.sum().item()) < 4 * total_se


def test_bound_is_above_the_exact_nll_and_close_with_the_large_variance(gaussian_bounds):
    """Bound >= -log q(x_0) on average (a paired test: > 3 standard errors above). With the large
    variance, which is the true reverse variance at small t for data this spread, it is within
    0.3 bits/dim (measured: 0.18); the small variance pays ~0.85 bits/dim at the first steps."""
    _, _, bounds, nll = gaussian_bounds
    for variance, most in (("small", 1.2), ("large", 0.3)):
        gap = bounds[variance].total - nll  # (N,)
        se = gap.std().item() / math.sqrt(N_BOUND)
        assert gap.mean().item() > 3 * se, (variance, gap.mean(), se)
        assert gap.mean().item() < most, (variance, gap.mean())
    assert bounds["large"].total.mean() < bounds["small"].total.mean()


def test_a_model_that_predicts_no_noise_is_worse_than_the_oracle(gaussian_bounds):
    _, _, bounds, _ = gaussian_bounds
    zero, oracle = bounds["zero"].summary(), bounds["small"].summary()
    assert zero["bpd"] > oracle["bpd"] + 5 * (zero["standard_error"] + oracle["standard_error"])
    assert bounds["zero"].mse.mean() > 5 * bounds["small"].mse.mean()


def test_prior_term_is_the_closed_form_kl_to_a_standard_normal(gaussian_bounds):
    schedule, x0, bounds, _ = gaussian_bounds
    abar_T = schedule.alphas_cumprod[-1].double()
    per_dim = 0.5 * (abar_T * x0**2 + (1 - abar_T) - 1 - torch.log(1 - abar_T))  # (N, 2)
    assert torch.allclose(
        bounds["small"].prior.double(), per_dim.mean(1) / LN2, rtol=1e-3, atol=1e-9
    )


def test_bound_on_discrete_data_has_no_negative_term_and_summary_adds_up():
    """On K-level data each part is a KL or -log of a probability, so none can be negative."""
    schedule = NoiseSchedule.linear(T=50, beta_start=1e-3, beta_end=0.2)
    x0 = load_dataset("digits", split="test").tensors[0][:16]  # on the 17-level grid
    vb = variational_bound(
        lambda x, t: torch.zeros_like(x), schedule, x0, levels=17, batch_size=5, progress=False
    )
    assert vb.terms.shape == (16, 50) and vb.prior.shape == (16,)
    assert (vb.terms >= 0).all() and (vb.prior >= 0).all()
    s = vb.summary()
    assert math.isclose(s["bpd"], s["prior"] + s["decoder"] + s["kl_terms"], rel_tol=1e-5)
    assert s["n"] == 16


def test_bound_does_not_depend_on_how_steps_share_a_network_call():
    """Grouping steps into one call (batch_size a multiple of the chunk) draws the same noise in
    the same order: the terms equal those of one step per call, up to float32 rounding."""
    schedule = NoiseSchedule.linear(T=40, beta_start=1e-3, beta_end=0.2)
    x0 = load_dataset("digits", split="test").tensors[0][:6]
    calls = []

    def model(x, t):  # a network that sees t, so a step mixed up with another would show
        calls.append(len(x))
        return 0.1 * x + 0.01 * t.view(-1, 1, 1, 1).float().sin()

    bounds = {}
    for batch_size in (6, 18, 500):  # 1, 3 and 40 (all) steps per call
        calls.clear()
        bounds[batch_size] = variational_bound(
            model, schedule, x0, levels=17, batch_size=batch_size,
            generator=torch.Generator().manual_seed(0), progress=False,
        )  # fmt: skip
        assert max(calls) <= batch_size and len(calls) == math.ceil(40 / (batch_size // 6))
    for grouped in (bounds[18], bounds[500]):
        torch.testing.assert_close(grouped.terms, bounds[6].terms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grouped.mse, bounds[6].mse, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(levels=1), "levels"),
        (dict(levels=16), "x0"),  # the digits sit on 17 levels, not 16
        (dict(variance="tiny"), "variance"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bound_rejects_bad_input_before_calling_the_model(kwargs, name):
    calls = []
    x0 = load_dataset("digits", split="test").tensors[0][:4]
    with pytest.raises((ValueError, TypeError)) as info:
        variational_bound(
            lambda x, t: calls.append(1), NoiseSchedule.linear(T=10), x0, progress=False, **kwargs
        )
    assert str(info.value).startswith(name)
    assert not calls


def _frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula with scipy's general matrix square root: an independent implementation."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_scipy_and_is_zero_for_a_set_with_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(300, 6, generator=g) * 0.7 + 0.2
    assert math.isclose(
        frechet_distance(a, b), _frechet_scipy(a.double().numpy(), b.double().numpy()), rel_tol=1e-6
    )
    assert math.isclose(frechet_distance(a, b), frechet_distance(b, a), rel_tol=1e-6)
    assert frechet_distance(a, a) < 1e-8


def test_frechet_distance_of_two_gaussians_with_diagonal_covariances():
    """For diagonal covariances FD = |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2 = 1 + 4 * 0.25 = 2 here.
    With n = 200 000 per set the sample means and variances are within ~0.01 of the truth."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(200_000, 4, generator=g, dtype=torch.float64) * 1.5 + torch.tensor(
        [1.0, 0, 0, 0]
    )
    assert abs(frechet_distance(a, b) - 2.0) < 0.05


def test_sliced_wasserstein_of_a_shifted_set_is_the_projected_shift():
    """b = a + m: on direction u the sorted projections differ by u.m exactly, so SW^2 is the mean
    of (u.m)^2 over directions, |m|^2 / 2 in 2-D; with 4096 directions its standard error is
    |m|^2 sqrt(1/8 / 4096) = 0.0055 |m|^2."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g)
    m = torch.tensor([0.6, -0.8])  # |m| = 1
    sw = sliced_wasserstein(a, a + m, projections=4096, generator=g)
    assert abs(sw**2 - 0.5) < 4 * 0.0055
    assert sliced_wasserstein(a, a, generator=g) == 0.0


def test_sliced_wasserstein_separates_distributions_beyond_the_sampling_baseline():
    ring = GaussianMixture.ring()
    g = torch.Generator().manual_seed(0)
    a, b = ring.sample(2000, generator=g), ring.sample(1500, generator=g)  # unequal sizes
    wider = ring.sample(2000, generator=g) * 1.5  # radius 1.2 instead of 0.8
    baseline = sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(1))
    other = sliced_wasserstein(a, wider, generator=torch.Generator().manual_seed(1))
    # Measured over seeds: baseline 0.03-0.06 at these sizes (mode shares vary by sampling);
    # the wider ring is ~0.3 away (radius 0.4 further, projected: 0.4 / sqrt(2)).
    assert baseline < 0.08 and other > 4 * baseline


@pytest.mark.parametrize(
    "fn, args, name",
    [
        (frechet_distance, (torch.zeros(1, 3), torch.zeros(5, 3)), "features_a"),
        (frechet_distance, (torch.zeros(5, 3), torch.zeros(5, 4)), "features_b"),
        (sliced_wasserstein, (torch.zeros(5, 2), torch.zeros(5, 3)), "b"),
    ],
)
def test_distances_reject_bad_shapes(fn, args, name):
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert str(info.value).startswith(name)


@pytest.mark.skipif(
    importlib.util.find_spec("torchmetrics") is not None, reason="torchmetrics installed"
)
def test_inception_fid_says_how_to_install_its_package():
    with pytest.raises(ImportError, match=r'pip install "torchmetrics\[image\]"'):
        inception_fid(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))


def test_metrics_knows_no_classifier():
    # metrics.py imports no network; the digits' features live next to the classifier.
    import ddpm_lib.metrics

    tree = ast.parse(Path(ddpm_lib.metrics.__file__).read_text())
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported == {
        "__future__",
        "dataclasses",
        "tqdm.auto",
        "ddpm_lib._checks",
        "ddpm_lib.diffusion",
        "ddpm_lib.schedule",
    }
    assert not hasattr(ddpm_lib.metrics, "digits_features")
