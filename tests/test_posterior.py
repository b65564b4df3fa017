"""q(x_{t-1} | x_t, x_0) checked by simulating the forward chain (chapter 4)."""

import numpy as np
import pytest
import torch

from ddpm_lib import NoiseSchedule, ddpm_step, predict_x0, q_posterior

SCHEDULE = NoiseSchedule.linear()


@pytest.mark.parametrize("t", [1, 10, 100, 500, 999])
def test_posterior_matches_a_regression_on_simulated_chains(t):
    # Draw x0 ~ U(-1, 1), x_{t-1} ~ q(x_{t-1} | x0) and x_t ~ q(x_t | x_{t-1}). Regressing x_{t-1}
    # on (x0, x_t) must give the posterior's coefficients, and the residual variance its variance.
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    abar_prev = SCHEDULE.alphas_cumprod.double()[t - 1]
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    beta = SCHEDULE.betas.double()[t]
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )

    design = np.column_stack([np.ones(n), x0.numpy()[:, 0], x_t.numpy()[:, 0]])
    target = x_prev.numpy()[:, 0]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    resid_var = resid.var(ddof=3)
    # Standard errors of OLS coefficients: sqrt(diag((X^T X)^-1) * resid_var).
    se = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * resid_var)

    t_batch = torch.tensor([t])
    mean_if_x0_1, var = q_posterior(SCHEDULE, torch.ones(1, 1), torch.zeros(1, 1), t_batch)
    mean_if_xt_1, _ = q_posterior(SCHEDULE, torch.zeros(1, 1), torch.ones(1, 1), t_batch)
    expected = [0.0, mean_if_x0_1.item(), mean_if_xt_1.item()]
    assert np.all(np.abs(coef - expected) < 5 * se), (coef, expected, se)
    # Gaussian residuals: the sample variance has relative standard error sqrt(2 / n).
    assert abs(resid_var / var.item() - 1) < 5 * np.sqrt(2 / n)


def test_posterior_at_step_zero_returns_x0_exactly():
    x0 = torch.randn(5, 3)
    x_t = torch.randn(5, 3)
    mean, var = q_posterior(SCHEDULE, x0, x_t, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(mean, x0) and torch.all(var == 0)


def test_posterior_mean_in_terms_of_eps_is_ho_eq_11():
    # mu(x_t, x0(x_t, eps)) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(100, 2, generator=g)
    eps = torch.randn(100, 2, generator=g)
    t = torch.randint(0, 1000, (100,), generator=g)
    mean, _ = q_posterior(SCHEDULE, predict_x0(SCHEDULE, x_t, t, eps), x_t, t)
    b, a, abar = (
        SCHEDULE.betas[t, None],
        SCHEDULE.alphas[t, None],
        SCHEDULE.alphas_cumprod[t, None],
    )
    eq_11 = (x_t - b / (1 - abar).sqrt() * eps) / a.sqrt()
    assert torch.allclose(mean, eq_11, atol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 5, 50, 500, 999])
def test_the_ddpm_step_is_the_posterior_with_predicted_x0(t):
    g = torch.Generator().manual_seed(t)
    x_t, eps, z = (torch.randn(50, 3, generator=g) for _ in range(3))
    tt = torch.full((50,), t, dtype=torch.long)
    abar = SCHEDULE.alphas_cumprod.double()
    abar_s = abar[t - 1].item() if t > 0 else 1.0
    mean, var = q_posterior(SCHEDULE, predict_x0(SCHEDULE, x_t, tt, eps), x_t, tt)
    for variance, sigma2 in (("small", var), ("large", SCHEDULE.betas[t] * (t > 0))):
        x_s, _ = ddpm_step(
            x_t, eps, abar[t].item(), abar_s, variance=variance, clip_x0=False, noise=z
        )
        assert torch.allclose(x_s, mean + torch.as_tensor(sigma2).sqrt() * z, atol=2e-4, rtol=1e-4)
