"""Samplers checked against the exact oracle of a Gaussian mixture (chapter 6)."""

import math

import pytest
import torch

from ddpm_lib import GaussianMixture, NoiseSchedule, ddim_step, ddpm_step, sample, timestep_sequence

SCHEDULE = NoiseSchedule.linear()
# Three components with unequal weights, well inside the data range [-1, 1].
MEANS = torch.tensor([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.5]])
STD = 0.08
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
GMM = GaussianMixture(MEANS, [STD] * 3, WEIGHTS)
N = 10_000


# Per sampler: the tolerance on component means (beyond 5 standard errors) and the accepted range
# of the ratio of sampled to true spread. Measured with seed 0: DDPM-1000 "small" gives spreads
# 0.94-1.00 of the truth (the posterior variance is a lower bound on the true reverse variance),
# "large" 0.99-1.05 (an upper bound); DDIM's deterministic steps shrink the spread (0.80-0.92 at
# 50 steps, 0.87-0.95 at 100) and move means by up to 0.014 at 50 steps, 0.008 at 100: its
# discretisation error, which vanishes as steps grow (0.004 at 200).
SAMPLER_CASES = {
    "ddpm-small-1000": (dict(sampler="ddpm", variance="small"), 0.005, (0.92, 1.03)),
    "ddpm-large-1000": (dict(sampler="ddpm", variance="large"), 0.005, (0.97, 1.08)),
    "ddim-50": (dict(sampler="ddim", steps=50), 0.02, (0.75, 1.0)),
    "ddim-100": (dict(sampler="ddim", steps=100), 0.012, (0.82, 1.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_sampling_the_exact_oracle_recovers_the_mixture(case):
    kwargs, mean_bias, (spread_low, spread_high) = SAMPLER_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = sample(GMM.eps_oracle(SCHEDULE), SCHEDULE, (N, 2), generator=g, progress=False, **kwargs)
    labels = GMM.responsibilities(x).argmax(1)
    shares = torch.bincount(labels, minlength=3).double() / N
    # Weights within 2 percentage points (4 standard errors of a share near 0.5 is 0.02).
    assert torch.all((shares - WEIGHTS.double()).abs() < 0.02), shares
    for k in range(3):
        points = x[labels == k].double()
        tol = 5 * STD / math.sqrt(len(points)) + mean_bias
        assert torch.all((points.mean(0) - MEANS[k].double()).abs() < tol), (k, points.mean(0))
        spread = points.std(0) / STD
        assert torch.all((spread > spread_low) & (spread < spread_high)), (k, spread)


def test_ddim_with_eta_one_is_the_ddpm_small_variance_step():
    abar = torch.cumprod(1 - SCHEDULE.betas.double(), 0)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in [0, 1, 2, 10, 100, 500, 998, 999]:
        x_t, eps, z = (torch.randn(256, 2, generator=g) for _ in range(3))
        abar_s = abar[t - 1].item() if t > 0 else 1.0
        for clip in (False, True):
            a, _ = ddpm_step(
                x_t, eps, abar[t].item(), abar_s, variance="small", clip_x0=clip, noise=z
            )
            b, _ = ddim_step(x_t, eps, abar[t].item(), abar_s, eta=1.0, clip_x0=clip, noise=z)
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-5


def test_ddim_eta_one_over_all_steps_reproduces_ddpm_given_the_same_noise():
    oracle = GMM.eps_oracle(SCHEDULE)
    kw = dict(shape=(500, 2), progress=False)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    a = sample(oracle, SCHEDULE, x_T=x_T, generator=torch.Generator().manual_seed(2), **kw)
    b = sample(
        oracle,
        SCHEDULE,
        sampler="ddim",
        eta=1.0,
        steps=1000,
        x_T=x_T,
        generator=torch.Generator().manual_seed(2),
        **kw,
    )
    assert (a - b).abs().max().item() < 1e-4


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    oracle = GMM.eps_oracle(SCHEDULE)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    runs = [
        sample(
            oracle,
            SCHEDULE,
            (64, 2),
            sampler="ddim",
            steps=20,
            x_T=x_T,
            progress=False,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (1, 2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_same_generator_seed_gives_the_same_samples():
    oracle = GMM.eps_oracle(SCHEDULE)
    a, b = (
        sample(
            oracle,
            SCHEDULE,
            (32, 2),
            steps=50,
            progress=False,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "T,S", [(1000, 1), (1000, 2), (1000, 10), (1000, 50), (1000, 1000), (7, 7)]
)
def test_timestep_sequences_span_the_whole_schedule(T, S):
    seq = timestep_sequence(T, S)
    assert len(seq) == S and seq[-1] == T - 1
    assert all(b > a for a, b in zip(seq, seq[1:]))
    if S > 1:
        assert seq[0] == 0
    assert timestep_sequence(T, None) == list(range(T))
    assert timestep_sequence(T, [0, 3, T - 1]) == [0, 3, T - 1]


def test_trajectory_records_only_what_is_asked():
    oracle = GMM.eps_oracle(SCHEDULE)
    kw = dict(steps=50, progress=False)
    plain = sample(oracle, SCHEDULE, (8, 2), generator=torch.Generator().manual_seed(0), **kw)
    x, traj = sample(
        oracle,
        SCHEDULE,
        (8, 2),
        generator=torch.Generator().manual_seed(0),
        return_trajectory=5,
        **kw,
    )
    assert torch.equal(x, plain)
    assert traj.x_t.shape == (5, 8, 2) and traj.x0_pred.shape == (5, 8, 2)
    assert traj.timesteps[0] == 999 and traj.timesteps[-1] == 0
    assert traj.timesteps == sorted(traj.timesteps, reverse=True)
    # The last predicted x0 is the output: the final step returns x0_pred itself.
    assert torch.allclose(traj.x0_pred[-1], x)
    _, full = sample(oracle, SCHEDULE, (8, 2), return_trajectory=True, **kw)
    assert len(full.timesteps) == 50


def test_clipping_keeps_predicted_x0_in_range():
    def wild(x_t, t):  # predicts a huge noise, so the predicted x0 leaves [-1, 1]
        return -50 * torch.ones_like(x_t)

    x, traj = sample(wild, SCHEDULE, (4, 2), steps=10, return_trajectory=True, progress=False)
    assert traj.x0_pred.abs().max() <= 1.0 and x.abs().max() <= 1.0
    x, traj = sample(
        wild, SCHEDULE, (4, 2), steps=10, clip_x0=False, return_trajectory=True, progress=False
    )
    assert traj.x0_pred.abs().max() > 1.0


def test_a_module_is_sampled_in_eval_mode_and_restored():
    modes = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            modes.append(self.training)
            return self.lin(x)

    net = Probe().train()
    sample(net, SCHEDULE, (3, 2), steps=3, progress=False)
    assert modes == [False] * 3 and net.training
