"""The noise schedules against their definitions (chapter 3)."""

import math

import numpy as np
import pytest
import torch

from ddpm_lib import NoiseSchedule, extract


def test_linear_schedule_is_float32_linspace():
    s = NoiseSchedule.linear(T=1000, beta_start=1e-4, beta_end=0.02)
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    assert s.betas.dtype == torch.float32 and s.betas.shape == (1000,)
    assert torch.max((s.betas - expected).abs()).item() <= 1e-7
    assert s.T == 1000


def test_cosine_schedule_follows_nichol_dhariwal_with_its_cap():
    T, off, cap = 1000, 0.008, 0.999
    s = NoiseSchedule.cosine(T=T, s=off, max_beta=cap)

    # Independent evaluation of Improved DDPM eq. 17, one step at a time in python floats.
    def f(t):
        return math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2

    expected = [min(1 - f(t + 1) / f(t), cap) for t in range(T)]
    assert np.allclose(s.betas.numpy(), np.array(expected, dtype=np.float32), rtol=1e-6, atol=0)
    # The cap bites at the end (f(T) = 0 would make beta = 1) and nowhere is it exceeded.
    assert s.betas.max().item() == pytest.approx(cap, abs=1e-7)
    assert s.betas[-1].item() == pytest.approx(cap, abs=1e-7)
    # Without the cap abar(t) = f(t) / f(0): check it where the cap does not bite.
    abar = np.array([f(t + 1) / f(0) for t in range(T)])
    uncapped = np.array(expected) < cap
    first_capped = int(np.argmin(uncapped))
    assert np.allclose(
        s.alphas_cumprod.numpy()[:first_capped], abar[:first_capped], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(), NoiseSchedule.cosine()])
def test_derived_quantities(schedule):
    betas = schedule.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert torch.all(schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1])
    assert torch.allclose(schedule.alphas.double(), 1 - betas, atol=1e-7, rtol=0)
    assert torch.allclose(schedule.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-9)
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    assert torch.allclose(schedule.alphas_cumprod_prev.double(), abar_prev, rtol=1e-5, atol=1e-9)
    # posterior variance = beta_t (1 - abar_{t-1}) / (1 - abar_t), with abar_{-1} = 1
    expected = betas * (1 - abar_prev) / (1 - abar)
    assert schedule.posterior_variance[0].item() == 0.0
    assert torch.allclose(schedule.posterior_variance.double(), expected, rtol=1e-5, atol=1e-12)
    # it never exceeds beta_t: knowing x_0 can only reduce the uncertainty
    assert torch.all(schedule.posterior_variance <= schedule.betas)
    snr = schedule.snr().double()
    assert torch.allclose(snr, abar / (1 - abar), rtol=1e-4)
    assert torch.all(snr[1:] < snr[:-1])
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef_x0"):
        assert getattr(schedule, name).dtype == torch.float32


def test_the_linear_schedule_ends_in_almost_pure_noise():
    s = NoiseSchedule.linear()
    # abar_{T-1} ~ 4e-5: x_T keeps 0.6 % of the signal's amplitude
    assert 1e-5 < s.alphas_cumprod[-1].item() < 1e-4


def test_to_dict_roundtrip_and_device_copy():
    for s in (NoiseSchedule.linear(T=50), NoiseSchedule.cosine(T=60, s=0.01)):
        again = NoiseSchedule.from_dict(s.to_dict())
        assert torch.equal(again.betas, s.betas) and again.kind == s.kind
    custom = NoiseSchedule([0.1, 0.2, 0.3])
    assert torch.equal(NoiseSchedule.from_dict(custom.to_dict()).betas, custom.betas)
    moved = custom.to("cpu")
    assert moved is not custom and torch.equal(moved.alphas_cumprod, custom.alphas_cumprod)


def test_extract_broadcasts_per_item_values():
    values = torch.arange(10.0)
    t = torch.tensor([3, 7])
    out = extract(values, t, torch.Size([2, 1, 4, 4]))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 7.0]
