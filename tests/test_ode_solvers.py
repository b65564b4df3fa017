"""The probability-flow ODE solvers (DPM-Solver++(2M), Heun), checked against exact answers.

For Gaussian data the ODE's solution is known in closed form, and for a mixture of Gaussians the
noise predictor is (``GaussianMixture.eps_oracle``): the solvers are tested with no network, so any
error is the solver's own.
"""

import importlib.util
import math

import pytest
import torch

from ddpm_lib import GaussianMixture, NoiseSchedule, ddim_step, guided_eps, ode_solvers, sample
from ddpm_lib.ode_solvers import (
    dpm_solver_2m_step,
    half_log_snr,
    heun_step,
    lambda_spaced_timesteps,
)
from ddpm_lib.samplers import _spaced_timesteps

SCHEDULE = NoiseSchedule.linear(T=1000)
# Three 1-D components 6 standard deviations apart: a sample's component is read off its
# position (misassigned with probability about 1e-3).
SEPARATED = GaussianMixture([[-0.6], [0.0], [0.6]], [0.1, 0.1, 0.1], [0.5, 0.3, 0.2])
# Three that overlap, with unequal spreads and weights: the convergence test's ODE is not linear.
UNEVEN = GaussianMixture([[-1.0], [0.2], [0.9]], [0.15, 0.1, 0.2], [0.5, 0.2, 0.3])


def solve(oracle, x_T, sampler, steps, **kwargs):
    return sample(oracle, SCHEDULE, tuple(x_T.shape), sampler=sampler, steps=steps, x_T=x_T,
                  clip_x0=False, progress=False, **kwargs)  # fmt: skip


def noise(n, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def observed_orders(errors):
    """log2 of the error ratios when the number of steps doubles."""
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# --- single steps: identities -----------------------------------------------------------------


@pytest.mark.parametrize("t, s", [(999, 600), (400, 399), (50, 0), (0, -1)])
def test_a_first_order_dpm_solver_step_is_ddims_step(t, s):
    # Lu et al.: DPM-Solver++(1) = DDIM. In float64 the two formulas agree to rounding.
    abar = SCHEDULE.alphas_cumprod_float64
    abar_t, abar_s = abar[t].item(), (abar[s].item() if s >= 0 else 1.0)
    g = torch.Generator().manual_seed(t)
    x, eps = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g)
    eps = eps.double()
    expected, x0 = ddim_step(x, eps, abar_t, abar_s, clip_x0=False)
    got = dpm_solver_2m_step(x, x0, abar_t, abar_s, previous=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_second_order_step_equals_lu_et_als_formula_written_out():
    # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) ((1 + 1/(2r)) D0 - 1/(2r) D1), with
    # alpha, sigma, h and r computed here from the definitions, independently of the module.
    abar = SCHEDULE.alphas_cumprod_float64
    u, t, s = 700, 500, 300
    g = torch.Generator().manual_seed(1)
    x, d0, d1 = (torch.randn(10, 2, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = {k: abar[k].sqrt().item() for k in (u, t, s)}
    sigma = {k: (1 - abar[k]).sqrt().item() for k in (u, t, s)}
    lam = {k: math.log(alpha[k] / sigma[k]) for k in (u, t, s)}
    h, h_prev = lam[s] - lam[t], lam[t] - lam[u]
    r = h_prev / h
    expected = sigma[s] / sigma[t] * x - alpha[s] * (math.exp(-h) - 1) * (
        (1 + 1 / (2 * r)) * d0 - 1 / (2 * r) * d1
    )
    got = dpm_solver_2m_step(x, d0, abar[t].item(), abar[s].item(), previous=(d1, abar[u].item()))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_heun_with_equal_slopes_is_ddim_and_its_last_step_is_eulers():
    # Heun averages the slopes at both ends; when they are equal that is Euler's step, which in
    # the variables y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar) is DDIM's step.
    abar = SCHEDULE.alphas_cumprod_float64
    g = torch.Generator().manual_seed(2)
    x, eps = (torch.randn(32, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for t, s in [(800, 500), (20, -1)]:
        abar_t, abar_s = abar[t].item(), (abar[s].item() if s >= 0 else 1.0)
        expected, _ = ddim_step(x, eps, abar_t, abar_s, clip_x0=False)
        got = heun_step(x, eps, abar_t, abar_s, lambda x_s: eps)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_half_log_snr():
    assert half_log_snr(0.5) == 0.0
    assert half_log_snr(0.8) == pytest.approx(0.5 * math.log(4.0), abs=1e-15)
    assert half_log_snr(1.0) == math.inf


# --- time-step spacing -----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 200])
def test_lambda_spacing_gives_increasing_steps_from_0_to_T_minus_1(steps):
    t = lambda_spaced_timesteps(SCHEDULE, steps)
    assert len(t) == steps and t[0] == 0 and t[-1] == SCHEDULE.T - 1
    assert all(b > a for a, b in zip(t, t[1:]))


def test_lambda_spacing_is_even_in_lambda_where_rounding_allows():
    # At 10 steps the integer grid is fine enough: every gap in lambda is within 5 % of the
    # mean gap (measured: 2.6 %). Spaced uniformly in t, the step into t = 0 is 3.6 in lambda,
    # 6.5 times the shortest.
    abar = SCHEDULE.alphas_cumprod_float64
    lam = [half_log_snr(abar[t].item()) for t in lambda_spaced_timesteps(SCHEDULE, 10)]
    gaps = [a - b for a, b in zip(lam, lam[1:])]
    mean = sum(gaps) / len(gaps)
    assert max(abs(g - mean) for g in gaps) < 0.05 * mean
    lam_uniform = [half_log_snr(abar[t].item()) for t in _spaced_timesteps(SCHEDULE, 10, "uniform")]
    uniform_gaps = [a - b for a, b in zip(lam_uniform, lam_uniform[1:])]
    assert uniform_gaps[0] == max(uniform_gaps) > 6 * min(uniform_gaps)
    assert lambda_spaced_timesteps(SCHEDULE, SCHEDULE.T) == list(range(SCHEDULE.T))


def test_spacing_defaults_per_sampler_and_bad_spacing_is_refused():
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    sample(counting, SCHEDULE, (2, 1), sampler="dpm++2m", steps=10, progress=False)
    assert sorted(set(calls)) == lambda_spaced_timesteps(SCHEDULE, 10)
    calls.clear()
    sample(counting, SCHEDULE, (2, 1), sampler="ddim", steps=10, progress=False)
    assert sorted(set(calls)) == _spaced_timesteps(SCHEDULE, 10, "uniform")
    with pytest.raises(ValueError, match="spacing"):
        sample(counting, SCHEDULE, (2, 1), sampler="ddim", steps=10, spacing="log")
    with pytest.raises(ValueError, match="spacing='lambda'"):
        sample(counting, SCHEDULE, (2, 1), sampler="ddim", steps=[0, 500, 999], spacing="lambda")
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        sample(counting, SCHEDULE, (2, 1), sampler="dpm++2m", steps=10, eta=0.5)


@pytest.mark.parametrize("sampler, calls", [("dpm++2m", 10), ("heun", 19), ("ddim", 10)])
def test_network_calls_per_sampler(sampler, calls):
    # DPM-Solver++(2M) reuses its last prediction: one call per step; Heun two, but none at the
    # end (sigma = 0).
    seen = []

    def counting(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sample(counting, SCHEDULE, (2, 1), sampler=sampler, steps=10, progress=False)
    assert len(seen) == calls


# --- convergence to the ODE's solution --------------------------------------------------------


def test_orders_of_convergence_on_gaussian_data_with_the_exact_solution():
    # Data N(mu, s^2): the probability-flow ODE maps x_T to mu + s (x_T - sqrt(abar_T) mu) /
    # sqrt(abar_T s^2 + 1 - abar_T) exactly. Doubling the steps must divide the error by about
    # 2 for DDIM (Euler, order 1) and about 4 for DPM-Solver++(2M) and Heun (order 2). Measured
    # orders from 20 to 160 lambda-spaced steps: DDIM 0.98-1.04, 2M 2.1-2.8, Heun 2.2-3.4 (the
    # integer timesteps make the last steps uneven, which helps at 160 steps). We require 0.85-1.15
    # and 1.7-3.6 for each doubling.
    mu, s = 0.3, 0.4
    gaussian = GaussianMixture([[mu]], [s], [1.0])
    x_T = noise(2000)
    abar_T = SCHEDULE.alphas_cumprod_float64[-1].item()
    exact = mu + s * (x_T.double() - math.sqrt(abar_T) * mu) / math.sqrt(abar_T * s**2 + 1 - abar_T)
    oracle = gaussian.eps_oracle(SCHEDULE)
    for sampler, (low, high) in {
        "ddim": (0.85, 1.15),
        "dpm++2m": (1.7, 3.6),
        "heun": (1.7, 3.6),
    }.items():
        errors = [
            rms(solve(oracle, x_T, sampler, n, spacing="lambda"), exact) for n in (20, 40, 80, 160)
        ]
        orders = observed_orders(errors)
        assert all(low < p < high for p in orders), (sampler, errors, orders)


def test_second_order_convergence_to_the_1000_step_solution_of_a_mixture():
    # The mixture's ODE has no closed form: the reference is DPM-Solver++(2M) with all 1000
    # steps (its own error is far below the 80-step error). Measured orders, 10 to 160
    # lambda-spaced steps: DDIM 0.87, 0.80, 0.80, 0.80; 2M 1.95, 2.37, 1.86, 1.73; Heun 1.77,
    # 1.30, 3.00, 2.23 (the integer timesteps make some doublings uneven), 2.07 on average.
    # We require each DDIM doubling in 0.65-1.2, each 2M doubling in 1.6-2.6, and Heun's average
    # order (log2 of the 10-step over the 160-step error, over 4) in 1.7-2.5.
    oracle = UNEVEN.eps_oracle(SCHEDULE)
    x_T = noise(4000, seed=1)
    reference = solve(oracle, x_T, "dpm++2m", None)
    steps = (10, 20, 40, 80, 160)
    errors = {
        sampler: [rms(solve(oracle, x_T, sampler, n, spacing="lambda"), reference) for n in steps]
        for sampler in ("ddim", "dpm++2m", "heun")
    }
    assert all(0.65 < p < 1.2 for p in observed_orders(errors["ddim"])), errors
    assert all(1.6 < p < 2.6 for p in observed_orders(errors["dpm++2m"])), errors
    assert 1.7 < math.log2(errors["heun"][0] / errors["heun"][-1]) / 4 < 2.5, errors
    # and at 10 steps the second-order solvers are the closer ones (measured: 2M 0.079,
    # Heun 0.11 with 19 calls, DDIM 0.17)
    assert errors["dpm++2m"][0] < errors["ddim"][0] / 2


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_2m_recovers_the_mixture_weights_and_spreads_in_few_steps(steps):
    # n = 20000 samples: a weight's binomial standard error is at most 0.0035 and a spread's
    # s / sqrt(2 n_k) at most 0.0011. We allow 4 standard errors plus what the few steps cost,
    # set from these measurements (the largest error over the three components):
    #   steps  weight (2M / DDIM)   spread, share of s (2M / DDIM)
    #   10     0.014 / 0.082        26 % / 71 %
    #   20     0.007 / 0.034         6 % / 42 %
    # 0.01 and 30 % at 10 steps, 0.005 and 8 % at 20; and 2M's weights must beat DDIM's.
    n = 20000
    oracle, x_T = SEPARATED.eps_oracle(SCHEDULE), noise(n, seed=2)
    weight_slack, spread_slack = (0.01, 0.30) if steps == 10 else (0.005, 0.08)
    worst = {}
    for sampler in ("dpm++2m", "ddim"):
        x = solve(oracle, x_T, sampler, steps)[:, 0].double()
        component = (x.unsqueeze(1) - SEPARATED.means[:, 0]).abs().argmin(dim=1)
        shares = torch.stack([(component == k).double().mean() for k in range(3)])
        worst[sampler] = (shares - SEPARATED.weights).abs().max().item()
        if sampler == "ddim":
            break
        for k in range(3):
            w, s = SEPARATED.weights[k].item(), SEPARATED.stds[k, 0].item()
            assert abs(shares[k] - w) < 4 * math.sqrt(w * (1 - w) / n) + weight_slack, (k, shares)
            spread = x[component == k].std().item()
            assert abs(spread - s) < 4 * s / math.sqrt(2 * w * n) + spread_slack * s, (k, spread)
    assert worst["dpm++2m"] < worst["ddim"] / 2, worst


# --- the rest of sample() works with the new samplers ------------------------------------------


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
def test_guided_sampling_with_an_ode_solver_equals_a_hand_guided_model(sampler):
    oracle = SEPARATED.eps_oracle(SCHEDULE)
    labels = torch.tensor([0, 1, 2, -1] * 8)

    def hand_guided(x, t):
        return guided_eps(oracle, x, t, labels, 2.5)

    x_T = noise(32, seed=3)
    got = sample(oracle, SCHEDULE, (32, 1), sampler=sampler, steps=12, x_T=x_T, labels=labels,
                 guidance_scale=2.5, progress=False)  # fmt: skip
    expected = sample(hand_guided, SCHEDULE, (32, 1), sampler=sampler, steps=12, x_T=x_T,
                      progress=False)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_trajectory_and_clipping_with_dpm_solver():
    oracle = GaussianMixture.ring().eps_oracle(SCHEDULE)
    x, trajectory = sample(oracle, SCHEDULE, (64, 2), sampler="dpm++2m", steps=10,
                           return_trajectory=True, progress=False,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert trajectory.timesteps == lambda_spaced_timesteps(SCHEDULE, 10)[::-1]
    assert trajectory.x_t.shape == (10, 64, 2) and trajectory.x0_pred.abs().max() <= 1.0
    torch.testing.assert_close(
        trajectory.x_t[0], torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    )
    assert torch.isfinite(x).all()


def test_the_lower_order_final_switch(monkeypatch):
    # With the switch on, the step into t = 0 is DDIM's: the result then differs from the
    # default only through that one step.
    # Below 15 steps (diffusers' rule) only; from 15 steps on nothing changes.
    oracle = SEPARATED.eps_oracle(SCHEDULE)
    x_T = noise(256, seed=4)
    default10, default20 = (solve(oracle, x_T, "dpm++2m", n) for n in (10, 20))
    monkeypatch.setattr(ode_solvers, "LOWER_ORDER_FINAL_BELOW", 15)
    assert 0 < rms(default10, solve(oracle, x_T, "dpm++2m", 10)) < 0.05
    assert torch.equal(default20, solve(oracle, x_T, "dpm++2m", 20))


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_agrees_with_diffusers_dpm_solver_multistep_scheduler(steps):
    # Optional (diffusers is not a dependency): the same timesteps, the same exact noise
    # predictor, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) ends
    # where ours does, to float32 rounding (measured: at most 1e-5).
    from diffusers import DPMSolverMultistepScheduler

    oracle = GaussianMixture.ring().eps_oracle(SCHEDULE)
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    timesteps = lambda_spaced_timesteps(SCHEDULE, steps)
    ours = solve(oracle, x_T, "dpm++2m", steps)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
        final_sigmas_type="zero",
    )  # fmt: skip
    scheduler.set_timesteps(timesteps=timesteps[::-1])
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, torch.full((512,), int(t))), t, x).prev_sample
    torch.testing.assert_close(x, ours, rtol=0, atol=5e-5)
