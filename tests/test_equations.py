"""Each paper equation has one home; each home matches an independent float64 computation.

Ho et al. eq. 4 solved for x_0 (``x0_from_eps``) and for eps (``eps_from_x0``), and eq. 7's
posterior (``posterior_coefficients``), checked against formulas written out here in numpy float64;
then the samplers and the bound that use them, against golden numbers of the code before the
refactoring (issue 13) and against a float64 loop written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianMixture, NoiseSchedule, predict_eps, predict_x0, q_posterior, sample
from ddpm_lib.diffusion import eps_from_x0, posterior_mean, x0_from_eps
from ddpm_lib.metrics import variational_bound
from ddpm_lib.schedule import posterior_coefficients

SCHEDULES = {
    "linear": (NoiseSchedule.linear(), np.linspace(1e-4, 0.02, 1000, dtype=np.float64)),
    "cosine": (NoiseSchedule.cosine(T=200), None),
}


def betas64(name: str) -> np.ndarray:
    schedule, betas = SCHEDULES[name]
    if betas is None:  # Nichol & Dhariwal's cosine schedule, written out again
        steps = np.arange(schedule.T + 1, dtype=np.float64) / schedule.T
        f = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return betas


@pytest.mark.parametrize("name", SCHEDULES)
def test_float64_alphas_cumprod_is_the_exact_product(name):
    schedule = SCHEDULES[name][0]
    abar = np.cumprod(1 - betas64(name))
    kept = schedule.alphas_cumprod_float64
    assert kept.dtype == torch.float64 and kept.device.type == "cpu"
    np.testing.assert_allclose(kept.numpy(), abar, rtol=1e-13, atol=0)
    # float32 rounding of abar loses most digits of 1 - abar near t = 0; the float64 copy does not
    np.testing.assert_allclose(1 - kept.numpy()[:5], 1 - abar[:5], rtol=1e-10)
    moved = schedule.to("meta")  # tensors move; the samplers' float64 copy stays on the CPU
    assert moved.betas.device.type == "meta" and moved.alphas_cumprod_float64.device.type == "cpu"


@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_coefficients_match_eq_7(name):
    betas = betas64(name)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    expected = (  # Ho et al. eq. 7 as printed, with beta_t and alpha_t themselves
        betas * np.sqrt(abar_prev) / (1 - abar),
        np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar),
        betas * (1 - abar_prev) / (1 - abar),
    )
    got = posterior_coefficients(torch.from_numpy(abar), torch.from_numpy(abar_prev))
    schedule = SCHEDULES[name][0]
    stored = (
        schedule.posterior_mean_coef_x0,
        schedule.posterior_mean_coef_xt,
        schedule.posterior_variance,
    )
    for want, have, kept in zip(expected, got, stored):
        assert have.dtype == torch.float64
        np.testing.assert_allclose(have.numpy(), want, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(kept.numpy(), want, rtol=1e-6, atol=1e-12)
    # Python floats (the samplers' path) give the same numbers as float64 tensors
    for t in (0, 1, 17, len(betas) - 1):
        floats = posterior_coefficients(float(abar[t]), float(abar_prev[t]))
        for value, tensor in zip(floats, got):
            assert isinstance(value, float)
            assert math.isclose(value, tensor[t].item(), rel_tol=1e-15, abs_tol=1e-300)


def test_posterior_coefficients_of_a_skipped_step_are_bayes_rule():
    # Independently: x_t | x_s ~ N(sqrt(a) x_s, 1 - a) with a = abar_t / abar_s, and
    # x_s | x_0 ~ N(sqrt(abar_s) x_0, 1 - abar_s); the product of the two Gaussians in x_s.
    abar = np.cumprod(1 - betas64("linear"))
    for t, s in [(999, 979), (500, 250), (10, 0), (1, 0)]:
        a = abar[t] / abar[s]
        precision = 1 / (1 - abar[s]) + a / (1 - a)
        variance = 1 / precision
        coef_x0 = variance * math.sqrt(abar[s]) / (1 - abar[s])
        coef_xt = variance * math.sqrt(a) / (1 - a)
        got = posterior_coefficients(float(abar[t]), float(abar[s]))
        np.testing.assert_allclose(got, (coef_x0, coef_xt, variance), rtol=1e-9)
    assert posterior_coefficients(0.3, 1.0) == pytest.approx((1.0, 0.0, 0.0))  # s = -1: x_0


def test_x0_and_eps_helpers_invert_eq_4_in_float64():
    abar = np.cumprod(1 - betas64("linear"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 6, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 1, 10, 300, 998, 999])
    a = torch.from_numpy(abar)[t][:, None]  # (B,) -> (B, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # Ho et al. eq. 4, written here
    torch.testing.assert_close(x0_from_eps(x_t, eps, a.sqrt(), (1 - a).sqrt()), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, a.sqrt(), (1 - a).sqrt()), eps)
    for i, step in enumerate(t.tolist()):  # float coefficients, the samplers' path
        root, rest = math.sqrt(abar[step]), math.sqrt(1 - abar[step])
        torch.testing.assert_close(x0_from_eps(x_t[i], eps[i], root, rest), x0[i])
    # The checked public functions are the helpers plus checks (float32 schedule coefficients).
    schedule = SCHEDULES["linear"][0]
    x_t32, eps32, x032 = x_t.float(), eps.float(), x0.float()
    torch.testing.assert_close(predict_x0(schedule, x_t32, t, eps32), x032, atol=2e-3, rtol=0)
    torch.testing.assert_close(predict_eps(schedule, x_t32, t, x032), eps32, atol=2e-3, rtol=0)
    mean, _ = q_posterior(schedule, x032, x_t32, t)
    torch.testing.assert_close(posterior_mean(schedule, x032, x_t32, t), mean, atol=0, rtol=0)


# --- the samplers and the bound that use them ------------------------------------------------

# float32-exact betas: the old code's float64 product of float32 betas and the schedule's float64
# copy agree, so these numbers, written by the code before issue 13, must come out again.
GOLD_BETAS = np.linspace(1e-4, 0.05, 100, dtype=np.float32)
GOLD_X_T = torch.tensor([[1.5, -0.3], [-0.7, 0.2], [0.1, 2.0]])
GOLD_MIXTURE = GaussianMixture([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.5]], [0.08] * 3, [0.5, 0.3, 0.2])
GOLDEN = {
    "ddpm": (
        dict(sampler="ddpm"),
        [[0.29185531, -0.41632381], [-0.39062351, -0.45305780], [-0.01663454, 0.57054818]],
    ),
    "ddpm-large-10": (
        dict(sampler="ddpm", variance="large", steps=10),
        [[-0.10519898, -0.45904240], [-0.54372716, -0.55450082], [-0.29784676, 0.12128936]],
    ),
    "ddim-10": (
        dict(sampler="ddim", steps=10),
        [[0.53255314, -0.39797723], [-0.49812078, -0.36930820], [0.00087968, 0.55035794]],
    ),
    "ddim-eta1-noclip": (
        dict(sampler="ddim", steps=10, eta=1.0, clip_x0=False),
        [[-0.44361502, -0.42690802], [-0.53026420, -0.41312355], [-0.49240336, -0.36031616]],
    ),
}


def reference_sampler(oracle, betas, x_T, generator, *, steps, ddim, eta, variance, clip):
    """DDPM / DDIM written out in float64 from the betas: Ho et al. Algorithm 2 with a respaced
    sub-sequence, and Song et al. eq. 12. Draws its noises in the library's order."""
    abar = np.cumprod(1 - betas.astype(np.float64))
    T = len(betas)
    seq = (
        list(range(T))
        if steps is None
        else sorted({round(v) for v in np.linspace(T - 1, 0, steps)})
    )
    x = x_T.double()
    for i, t in enumerate(reversed(seq)):
        s = seq[len(seq) - 2 - i] if i < len(seq) - 1 else None
        a_t, a_s = abar[t], (abar[s] if s is not None else 1.0)
        eps = oracle(x.float(), torch.full((x.shape[0],), t)).double()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        z = None
        if s is not None and (not ddim or eta > 0):
            z = torch.randn(x.shape, generator=generator).double()
        if ddim:
            sigma2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma2) * eps
            x = x + math.sqrt(sigma2) * z if z is not None else x
        else:
            beta = 1 - a_t / a_s
            mean = (
                beta * math.sqrt(a_s) / (1 - a_t) * x0
                + (1 - a_s) * math.sqrt(1 - beta) / (1 - a_t) * x
            )
            sigma2 = beta * (1 - a_s) / (1 - a_t) if variance == "small" else beta
            x = mean + math.sqrt(sigma2) * z if z is not None else mean
    return x


@pytest.mark.parametrize("case", GOLDEN)
def test_samplers_give_the_numbers_of_before_and_of_a_float64_loop(case):
    kwargs, golden = GOLDEN[case]
    schedule = NoiseSchedule(GOLD_BETAS.tolist())
    oracle = GOLD_MIXTURE.eps_oracle(schedule)
    x = sample(
        oracle,
        schedule,
        (3, 2),
        x_T=GOLD_X_T,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        **kwargs,
    )
    torch.testing.assert_close(x, torch.tensor(golden), atol=2e-7, rtol=0)
    reference = reference_sampler(
        oracle,
        GOLD_BETAS,
        GOLD_X_T,
        torch.Generator().manual_seed(0),
        steps=kwargs.get("steps"),
        ddim=kwargs["sampler"] == "ddim",
        eta=kwargs.get("eta", 0.0),
        variance=kwargs.get("variance", "small"),
        clip=kwargs.get("clip_x0", True),
    )
    torch.testing.assert_close(x.double(), reference, atol=1e-5, rtol=0)


def test_the_bound_uses_the_posterior_of_eq_7():
    # A fixed "network" eps = x_t / 2, five steps: every KL term recomputed here in float64.
    T, levels = 5, None
    schedule = NoiseSchedule.linear(T=T, beta_start=0.05, beta_end=0.3)
    x0 = torch.tensor([[0.3, -0.2], [-0.6, 0.9], [0.1, 0.1]])

    def model(x_t, t):
        return 0.5 * x_t

    bound = variational_bound(
        model,
        schedule,
        x0,
        levels=levels,
        clip_x0=False,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    betas = np.linspace(0.05, 0.3, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    log_var = np.log(np.concatenate([var[1:2], var[1:]]))
    g = torch.Generator().manual_seed(3)
    x = x0.double()
    for t in range(T - 1, 0, -1):  # the bound draws its noise from step T-1 down
        noise = torch.randn(x0.shape, generator=g).double()
        x_t = math.sqrt(abar[t]) * x + math.sqrt(1 - abar[t]) * noise
        x0_pred = (x_t - math.sqrt(1 - abar[t]) * 0.5 * x_t) / math.sqrt(abar[t])

        def mean(start, t=t, x_t=x_t):
            return (
                betas[t] * math.sqrt(abar_prev[t]) * start
                + (1 - abar_prev[t]) * math.sqrt(1 - betas[t]) * x_t
            ) / (1 - abar[t])

        # KL of two Gaussians with the same variance: (difference of means)^2 / (2 var), in nats
        kl = (mean(x) - mean(x0_pred)).pow(2) / (2 * math.exp(log_var[t]))
        bits = kl.sum(1) / (2 * math.log(2))  # per dimension, in bits
        torch.testing.assert_close(bound.terms[:, t].double(), bits, atol=1e-5, rtol=1e-4)
