"""The forward process and the training loss (chapters 3 and 5)."""

import math

import pytest
import torch

from ddpm_lib import (
    NoiseSchedule,
    diffusion_loss,
    predict_eps,
    predict_x0,
    q_sample,
    q_sample_iterative,
)

SCHEDULE = NoiseSchedule.linear()


@pytest.mark.parametrize("t", [0, 10, 100, 500, 999])
def test_one_shot_and_iterated_forward_agree_in_distribution(t):
    # 20 000 chains from one fixed x0 with three coordinates; both ways must give
    # N(sqrt(abar_t) x0, (1 - abar_t) I).
    n = 20_000
    x0 = torch.tensor([-1.0, 0.3, 0.9]).expand(n, 3)
    steps = torch.full((n,), t, dtype=torch.long)
    one_shot = q_sample(SCHEDULE, x0, steps, generator=torch.Generator().manual_seed(1)).double()
    iterated = q_sample_iterative(SCHEDULE, x0, steps, generator=torch.Generator().manual_seed(2))
    iterated = iterated.double()

    abar = SCHEDULE.alphas_cumprod.double()[t]
    mean, var = abar.sqrt() * x0[0].double(), 1 - abar
    for a in (one_shot, iterated):
        # Standard errors: of a mean sqrt(var / n); of a Gaussian sample variance var sqrt(2/(n-1)).
        assert torch.all((a.mean(0) - mean).abs() < 4 * (var / n).sqrt())
        assert torch.all((a.var(0) - var).abs() < 4 * var * math.sqrt(2 / (n - 1)))
    se_mean_diff = (one_shot.var(0) / n + iterated.var(0) / n).sqrt()
    assert torch.all((one_shot.mean(0) - iterated.mean(0)).abs() < 4 * se_mean_diff)
    se_var_diff = var * math.sqrt(2 * 2 / (n - 1))
    assert torch.all((one_shot.var(0) - iterated.var(0)).abs() < 4 * se_var_diff)


def test_iterated_forward_stops_each_item_at_its_own_step():
    # With zero betas after each item's t the state would keep moving: check t = 0 items moved once.
    x0 = torch.zeros(4, 2)
    t = torch.tensor([0, 0, 999, 999])
    g = torch.Generator().manual_seed(0)
    x = q_sample_iterative(SCHEDULE, x0, t, generator=g)
    # After one step from 0 the spread is sqrt(beta_0) = 0.01; after all steps it is ~1.
    assert x[:2].abs().max() < 0.05
    assert x[2:].abs().max() > 0.05


def test_predict_x0_and_predict_eps_invert_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = q_sample(SCHEDULE, x0, t, eps)
    assert torch.allclose(predict_x0(SCHEDULE, x_t, t, eps), x0, atol=2e-4)
    assert torch.allclose(predict_eps(SCHEDULE, x_t, t, x0), eps, atol=2e-4)


def test_loss_is_zero_for_a_model_that_predicts_the_true_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(32, 2, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def knows_x0(x_t, t):
        return predict_eps(SCHEDULE, x_t, t, x0)

    assert diffusion_loss(knows_x0, SCHEDULE, x0, t, noise).item() < 1e-6


def linear_model_and_batch(seed: int, n: int):
    """A small trainable model and a batch (x_0, t, noise) for checking the loss by hand."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(2, 2)
    x0 = torch.randn(n, 2, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return model, x0, t, torch.randn(x0.shape, generator=g)


def test_loss_matches_algorithm_1_written_out():
    model, x0, t, noise = linear_model_and_batch(seed=3, n=16)
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    by_hand = ((noise - model(x_t)) ** 2).mean()
    ours = diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise)
    assert torch.allclose(ours, by_hand, atol=1e-6)
    per_item = diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, reduction="none")
    assert per_item.shape == (16,) and torch.allclose(per_item.mean(), ours)
    ours.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_min_snr_weighting_matches_hang_et_al_written_out():
    # Each item's squared error times min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t):
    # 1 at the noisy steps (SNR <= gamma), gamma / SNR_t below 1 at the nearly clean ones.
    model, x0, t, noise = linear_model_and_batch(seed=4, n=64)
    abar = SCHEDULE.alphas_cumprod_float64[t]
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.tensor(5.0)) / snr
    x_t = abar.sqrt()[:, None].float() * x0 + (1 - abar).sqrt()[:, None].float() * noise
    by_hand = (((noise - model(x_t)) ** 2).mean(dim=1) * weight.float()).mean()
    ours = diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, min_snr_gamma=5.0)
    assert torch.allclose(ours, by_hand, rtol=1e-5)
    assert (weight[t > 300] == 1).all() and (weight[t < 20] < 0.1).all()  # where it matters
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, min_snr_gamma=0.0)


def test_p2_weighting_matches_choi_et_al_written_out():
    # Each item's squared error times 1 / (k + SNR_t)^gamma with k = 1: near 1 at pure noise,
    # about 1 / SNR_t^gamma at the clean end; gamma = 0 is L_simple itself.
    model, x0, t, noise = linear_model_and_batch(seed=5, n=64)
    abar = SCHEDULE.alphas_cumprod_float64[t]
    weight = (1 - abar) ** 0.5  # 1 / (1 + SNR)^(1/2), as 1 + SNR = 1 / (1 - abar)
    x_t = abar.sqrt()[:, None].float() * x0 + (1 - abar).sqrt()[:, None].float() * noise
    squared_error = ((noise - model(x_t)) ** 2).mean(dim=1)
    by_hand = (squared_error * weight.float()).mean()
    ours = diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, p2_gamma=0.5)
    assert torch.allclose(ours, by_hand, rtol=1e-5)
    plain = diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, p2_gamma=0.0)
    assert torch.allclose(plain, squared_error.mean(), rtol=1e-6)
    assert (weight[t > 700] > 0.95).all() and (weight[t < 20] < 0.1).all()
    for bad in (dict(p2_gamma=-1.0), dict(p2_gamma=1.0, min_snr_gamma=5.0)):
        with pytest.raises(ValueError, match="p2_gamma"):
            diffusion_loss(lambda x, _: model(x), SCHEDULE, x0, t, noise, **bad)


def test_loss_draws_uniform_steps_and_standard_noise():
    seen = []

    def zero_model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    n, D = 20_000, 4
    x0 = torch.zeros(n, D)
    loss = diffusion_loss(zero_model, SCHEDULE, x0, generator=torch.Generator().manual_seed(0))
    # A zero prediction leaves E||eps||^2 / D = 1; a mean of n*D chi-square(1) has sd sqrt(2/(nD)).
    assert abs(loss.item() - 1.0) < 4 * math.sqrt(2 / (n * D))
    t = seen[0].double()
    assert t.min() >= 0 and t.max() <= 999
    # Uniform on {0..999}: mean 499.5, sd sqrt((1000^2 - 1) / 12).
    assert abs(t.mean().item() - 499.5) < 4 * math.sqrt((1000**2 - 1) / 12 / n)


def test_loss_is_reproducible_with_a_generator():
    model = torch.nn.Linear(3, 3)
    x0 = torch.randn(8, 3)
    a = diffusion_loss(
        lambda x, _: model(x), SCHEDULE, x0, generator=torch.Generator().manual_seed(5)
    )
    b = diffusion_loss(
        lambda x, _: model(x), SCHEDULE, x0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)
