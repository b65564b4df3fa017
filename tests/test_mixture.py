"""The exact noise predictor of a Gaussian mixture, the book's "perfect network" (chapter 4)."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ddpm_lib import GaussianMixture, NoiseSchedule

SCHEDULE = NoiseSchedule.linear()


@pytest.mark.parametrize("t", [0, 20, 300, 999])
def test_oracle_of_a_single_gaussian_is_the_closed_form(t):
    # x0 ~ N(mu, s^2 I)  =>  x_t ~ N(sqrt(a) mu, a s^2 + 1 - a) and
    # E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    mu, s = torch.tensor([0.3, -0.2]), 0.4
    oracle = GaussianMixture(mu[None], [s], [1.0]).eps_oracle(SCHEDULE)
    x_t = torch.randn(500, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    a = SCHEDULE.alphas_cumprod.double()[t]
    expected = (1 - a).sqrt() * (x_t - a.sqrt() * mu.double()) / (a * s**2 + 1 - a)
    got = oracle(x_t, torch.full((500,), t, dtype=torch.long))
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("t", [0, 5, 50, 400, 999])
def test_oracle_of_a_mixture_is_minus_sigma_times_the_score(t):
    means = torch.tensor([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.5]])
    stds = torch.tensor([[0.1, 0.2], [0.15, 0.05], [0.08, 0.08]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    gmm = GaussianMixture(means, stds, weights)
    # Independent density of q(x_t) with torch.distributions, differentiated by autograd.
    a = SCHEDULE.alphas_cumprod.double()[t]
    q_t = MixtureSameFamily(
        Categorical(probs=weights.double()),
        Independent(Normal(a.sqrt() * means.double(), (a * stds.double() ** 2 + 1 - a).sqrt()), 1),
    )
    x_t = torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t.requires_grad_(True)
    (score,) = torch.autograd.grad(q_t.log_prob(x_t).sum(), x_t)
    expected = -(1 - a).sqrt() * score
    got = gmm.eps_oracle(SCHEDULE)(x_t.detach(), torch.full((400,), t, dtype=torch.long))
    assert torch.allclose(got, expected, atol=1e-5)
    # the marginal density agrees too
    ours = gmm.marginal_log_prob(SCHEDULE, x_t.detach(), torch.full((400,), t, dtype=torch.long))
    assert torch.allclose(ours, q_t.log_prob(x_t.detach()), rtol=1e-9, atol=1e-9)


def test_oracle_keeps_the_input_dtype_and_is_the_minimum_of_the_loss():
    gmm = GaussianMixture.ring(n_modes=4, radius=0.7, std=0.1)
    oracle = gmm.eps_oracle(SCHEDULE)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = gmm.sample(n, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = SCHEDULE.alphas_cumprod[t, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    pred = oracle(x_t, t)
    assert pred.dtype == torch.float32
    oracle_loss = ((pred - noise) ** 2).mean().item()
    # A slightly perturbed predictor does worse (the conditional mean minimises squared error).
    worse = (((pred * 1.05) - noise) ** 2).mean().item()
    assert oracle_loss < worse < 1.0


def test_sample_has_the_mixture_statistics():
    gmm = GaussianMixture([[-1.0, 0.0], [2.0, 1.0]], [0.5, 0.2], [0.25, 0.75])
    n = 40_000
    x, labels = gmm.sample(n, generator=torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    share = labels.double().mean().item()
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    first = x[labels == 0].double()
    assert torch.all((first.mean(0) - torch.tensor([-1.0, 0.0]).double()).abs() < 4 * 0.5 / 100)
    r = gmm.responsibilities(x)
    assert torch.allclose(r.sum(1), torch.ones(n, dtype=torch.float64))
    # Well separated: the responsibilities recover the labels almost always.
    assert (r.argmax(1) == labels).double().mean() > 0.99


def test_ring_is_equal_weight_on_a_circle():
    ring = GaussianMixture.ring(n_modes=6, radius=0.5, std=0.02)
    assert ring.n_components == 6 and ring.dim == 2
    assert torch.allclose(ring.means.norm(dim=1), torch.full((6,), 0.5, dtype=torch.float64))
    assert torch.allclose(ring.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
