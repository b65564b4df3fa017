"""Classifier-free guidance, checked against exact answers: on a mixture of Gaussians the
conditional and unconditional noise predictors are known in closed form, so guided sampling can be
tested with no network at all; then the conditional networks, their training and the CLI."""

import math

import pytest
import torch
from PIL import Image

from ddpm_lib import (
    NULL_CLASS,
    GaussianMixture,
    NoiseSchedule,
    drop_labels,
    guided_eps,
    load_checkpoint,
    model_from_checkpoint,
    sample,
)
from ddpm_lib.cli import main
from ddpm_lib.config import DIGITS_UNET, default_config
from ddpm_lib.image_sets import ImageFolderDataset, folder_classes
from ddpm_lib.models import MLP, UNet
from ddpm_lib.training import Trainer

SCHEDULE = NoiseSchedule.linear(T=1000)
# Three well-separated 1-D components (6 standard deviations apart): a sample's component is
# read off its position with a misassignment chance of about 1e-3.
SEPARATED = GaussianMixture([[-0.6], [0.0], [0.6]], [0.1, 0.1, 0.1], [0.5, 0.3, 0.2])
# The same three, overlapping (3.3 standard deviations apart): where guidance has work to do.
OVERLAPPING = GaussianMixture([[-0.5], [0.0], [0.5]], [0.15, 0.15, 0.15], [1 / 3] * 3)


def guided_samples(mixture, k, w, n, *, sampler="ddim", seed=0, **kwargs):
    labels = torch.full((n,), k) if k is not None else None
    return sample(mixture.eps_oracle(SCHEDULE), SCHEDULE, (n, mixture.dim), sampler=sampler,
                  labels=labels, guidance_scale=w, clip_x0=False, progress=False,
                  generator=torch.Generator().manual_seed(seed), **kwargs)  # fmt: skip


@pytest.mark.parametrize("k", [0, 1, 2])
def test_plain_conditional_sampling_draws_the_asked_component(k):
    # w = 1 with the exact oracle: DDIM's 1000 steps follow the diffusion ODE of component k,
    # so the samples are N(mu_k, s_k^2) up to sampling noise. n = 3000: the mean's standard
    # error is s / sqrt(n) = 0.0018, the standard deviation's s / sqrt(2n) = 0.0013; we allow
    # 4 standard errors, plus 1 % of s for the 1000-step discretisation (measured: 0.6 %).
    n, s = 3000, 0.1
    x = guided_samples(SEPARATED, k, 1.0, n)[:, 0].double()
    assert abs(x.mean().item() - SEPARATED.means[k, 0].item()) < 4 * s / math.sqrt(n)
    assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * n) + 0.01 * s


def test_guidance_zero_ignores_the_labels_and_draws_the_mixture():
    # w = 0 asks every sample for "no class": the shares of the three components must be the
    # mixture's weights (0.5, 0.3, 0.2) within 4 binomial standard errors sqrt(p (1 - p) / n).
    n = 4000
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(5))
    x = sample(SEPARATED.eps_oracle(SCHEDULE), SCHEDULE, (n, 1), sampler="ddim", labels=labels,
               guidance_scale=0.0, clip_x0=False, progress=False,
               generator=torch.Generator().manual_seed(1))  # fmt: skip
    component = SEPARATED.responsibilities(x).argmax(dim=1)
    shares = torch.bincount(component, minlength=3).double() / n
    for share, p in zip(shares.tolist(), SEPARATED.weights.tolist(), strict=True):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_the_labelled_oracle_is_each_components_own_closed_form():
    oracle = OVERLAPPING.eps_oracle(SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 1, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    for k in range(3):
        alone = OVERLAPPING.eps_oracle(SCHEDULE, component=k)(x_t, t)
        labelled = oracle(x_t, t, torch.full((64,), k))
        torch.testing.assert_close(labelled, alone, rtol=0, atol=1e-12)
        # A single Gaussian's E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / var_t.
        abar = SCHEDULE.alphas_cumprod.double()[t][:, None]
        var_t = abar * 0.15**2 + 1 - abar
        mu = OVERLAPPING.means[k]
        torch.testing.assert_close(alone, (1 - abar).sqrt() * (x_t - abar.sqrt() * mu) / var_t)
    # No class (-1) is the whole mixture, item by item.
    mixed = torch.tensor([NULL_CLASS, 2] * 32)
    out = oracle(x_t, t, mixed)
    torch.testing.assert_close(out[0::2], oracle(x_t, t)[0::2], rtol=0, atol=0)
    assert OVERLAPPING.eps_oracle(SCHEDULE).num_classes == 3
    assert OVERLAPPING.eps_oracle(SCHEDULE, component=1).num_classes is None


def test_guided_noise_is_the_formula_to_float_precision():
    oracle = OVERLAPPING.eps_oracle(SCHEDULE)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(50, 1, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (50,), generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    cond, uncond = oracle(x_t, t, y), oracle(x_t, t)
    for w in (0.0, 0.5, 1.0, 2.0, 5.0):
        expected = uncond + w * (cond - uncond)
        torch.testing.assert_close(guided_eps(oracle, x_t, t, y, w), expected, rtol=0, atol=1e-12)


def test_one_batched_network_call_equals_two_separate_calls():
    net = UNet(**DIGITS_UNET, num_classes=10)
    perturb(net)
    net.eval()
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    y = torch.tensor([0, 3, 9, NULL_CLASS, 5, 5])
    with torch.no_grad():
        guided = guided_eps(net, x_t, t, y, 3.0)
        assert calls == [12]  # one call on the conditional and unconditional halves together
        cond, uncond = net(x_t, t, y), net(x_t, t, torch.full_like(y, NULL_CLASS))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_sample_applies_guidance_at_every_step():
    # The same run through a plain unconditional callable that computes the formula itself.
    oracle, w, n = OVERLAPPING.eps_oracle(SCHEDULE), 2.5, 200
    labels = torch.arange(n) % 3

    def by_hand(x_t, t):
        cond, uncond = oracle(x_t, t, labels), oracle(x_t, t)
        return uncond + w * (cond - uncond)

    for sampler in ("ddpm", "ddim"):
        kwargs = dict(sampler=sampler, steps=50, progress=False, clip_x0=False)
        guided = sample(oracle, SCHEDULE, (n, 1), labels=labels, guidance_scale=w,
                        generator=torch.Generator().manual_seed(3), **kwargs)  # fmt: skip
        manual = sample(by_hand, SCHEDULE, (n, 1), generator=torch.Generator().manual_seed(3),
                        **kwargs)  # fmt: skip
        torch.testing.assert_close(guided, manual, rtol=0, atol=1e-6)


def test_tilted_density_at_w_1_is_the_component_itself():
    grid, dx = _grid()
    for k in range(3):
        mean, std = _moments(OVERLAPPING.tilted_log_density(grid, k, 1.0), grid, dx)
        assert abs(mean - OVERLAPPING.means[k, 0].item()) < 1e-6
        assert abs(std - 0.15) < 1e-6


def test_guided_sampling_is_not_the_tilted_density_it_is_said_to_sample():
    """Finding: guidance is often described as sampling p(x | k) p(k | x)^(w - 1). On three
    overlapping 1-D Gaussians (0.5 apart, std 0.15), for the middle one at w = 3 that density
    has a standard deviation of 0.109 (grid integral), while guided DDPM (exact oracles, 1000
    steps) gives 0.081, a quarter narrower, and guided DDIM 0.017, nearly a point: guidance
    applied at every noise level compounds, and the deterministic sampler compounds most.
    Each gap is many times the standard error of a standard deviation from n = 3000 samples,
    s / sqrt(2n) <= 0.0015."""
    n, k, w = 3000, 1, 3.0
    grid, dx = _grid()
    tilted_mean, tilted_std = _moments(OVERLAPPING.tilted_log_density(grid, k, w), grid, dx)
    assert abs(tilted_mean) < 1e-9 and 0.10 < tilted_std < 0.12  # narrower than 0.15 already
    ddpm = guided_samples(OVERLAPPING, k, w, n, sampler="ddpm")[:, 0].double()
    ddim = guided_samples(OVERLAPPING, k, w, n, sampler="ddim")[:, 0].double()
    se = 0.15 / math.sqrt(2 * n)
    assert abs(ddpm.mean().item()) < 4 * 0.15 / math.sqrt(n)
    assert tilted_std - ddpm.std().item() > 10 * se  # measured: 0.109 - 0.081 = 0.028
    assert 0.7 < ddpm.std().item() / tilted_std < 0.8  # measured: 0.75
    assert ddim.std().item() < 0.3 * tilted_std  # measured: 0.017 / 0.109 = 0.16


def _grid():
    grid = torch.linspace(-2.0, 2.0, 8001, dtype=torch.float64)[:, None]
    return grid, 4.0 / 8000


def _moments(log_density, grid, dx):
    p = (log_density - log_density.max()).exp()
    p = p / (p.sum() * dx)
    mean = (grid[:, 0] * p).sum() * dx
    return mean.item(), (((grid[:, 0] - mean) ** 2 * p).sum() * dx).sqrt().item()


# --------------------------------------------------------------------------------------------
# Conditional networks


def perturb(net, seed=0):
    """Give every weight (zero-initialised ones included) a small random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("make", [lambda: UNet(**DIGITS_UNET, num_classes=10),
                                  lambda: MLP(dim=8 * 8, num_classes=10)])  # fmt: skip
def test_conditional_networks_answer_per_class_and_none_means_no_class(make):
    net = perturb(make()).eval()
    shape = (4, *net.item_shape)
    x, t = torch.randn(shape), torch.tensor([3, 300, 600, 999])
    with torch.no_grad():
        by_class = [net(x, t, torch.full((4,), k)) for k in range(10)]
        none, null = net(x, t), net(x, t, torch.full((4,), NULL_CLASS))
    assert all(not torch.allclose(by_class[0], other) for other in by_class[1:])
    torch.testing.assert_close(none, null, rtol=0, atol=0)
    assert net.config["num_classes"] == 10 and type(net)(**net.config).hparams == net.hparams


def test_an_untrained_conditional_network_is_the_unconditional_one():
    # The class table starts at zero: whatever the other weights, every class gets the answer
    # of the same network without a class table.
    conditional = UNet(**DIGITS_UNET, num_classes=10)
    with torch.no_grad():
        table = conditional.class_embedding.table.weight.clone()
        perturb(conditional)
        conditional.class_embedding.table.weight.copy_(table)
    assert not table.any()
    plain = UNet(**DIGITS_UNET)
    shared = {k: v for k, v in conditional.state_dict().items() if not k.startswith("class_")}
    plain.load_state_dict(shared)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 900])
    with torch.no_grad():
        torch.testing.assert_close(conditional(x, t, torch.tensor([1, 2, 3])), plain(x, t))


def test_unconditional_configs_and_checkpoints_are_unchanged():
    # No num_classes key in an unconditional network's config: older checkpoints and the book's
    # cached runs (keyed by config) keep matching.
    assert "num_classes" not in UNet(**DIGITS_UNET).config
    assert "num_classes" not in MLP().config


def test_bad_labels_and_guidance_are_refused_before_any_model_call():
    calls = []

    def counting(x_t, t, y=None):
        calls.append(1)
        return torch.zeros_like(x_t)

    counting.num_classes = 3
    plain = UNet(**DIGITS_UNET)
    cases = [
        (counting, dict(labels=torch.tensor([0, 3])), "labels must be classes in [0, 2]"),
        (counting, dict(labels=torch.tensor([0, -2])), "labels must be classes in [0, 2]"),
        (counting, dict(labels=torch.tensor([0.0, 1.0])), "labels must be an integer tensor"),
        (counting, dict(labels=torch.tensor([0, 1, 2])), "labels must have shape (B,) = (2,)"),
        (counting, dict(labels=torch.tensor([0, 1]), guidance_scale=-1), "guidance_scale must"),
        (counting, dict(guidance_scale=2.0), "guidance_scale=2 needs labels"),
        (plain, dict(labels=torch.tensor([0, 1])), "the model is unconditional"),
    ]
    for model, kwargs, message in cases:
        shape = (2, 1) if model is counting else (2, 1, 8, 8)
        with pytest.raises((ValueError, TypeError)) as error:
            sample(model, SCHEDULE, shape, steps=5, progress=False, **kwargs)
        assert message in str(error.value)
    assert calls == []
    with pytest.raises(ValueError, match="this network is unconditional"):
        plain(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    conditional = UNet(**DIGITS_UNET, num_classes=10)
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        conditional(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes must be an integer in"):
        UNet(**DIGITS_UNET, num_classes=0)


def test_label_dropout_rate_within_its_binomial_tolerance():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.2):
        dropped = drop_labels(labels, p, generator=torch.Generator().manual_seed(1))
        share = (dropped == NULL_CLASS).double().mean().item()
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / len(labels))
        kept = dropped != NULL_CLASS
        assert torch.equal(dropped[kept], labels[kept])  # the others are untouched
    assert drop_labels(labels, 0.0) is labels
    with pytest.raises(ValueError, match=r"class_dropout must be a finite number in \[0, 1\]"):
        drop_labels(labels, 1.5)


# --------------------------------------------------------------------------------------------
# Training, checkpoints and the command line


def conditional_config(tmp_path, **overrides):
    values = dict(steps=6, batch_size=64, class_dropout=0.25, checkpoint_every=3, log_every=1,
                  sample_n=10, sample_steps=2, device="cpu", out=str(tmp_path / "run"))  # fmt: skip
    return default_config("digits", **{**values, **overrides})


def test_conditional_training_sees_labels_with_the_dropout_rate(tmp_path):
    narrow = dict(base_channels=8)  # what is tested is the data path, not the network
    config = conditional_config(tmp_path, steps=30, model_config=narrow)
    trainer = Trainer(config, progress=False, log=None)
    seen = []
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(args[2].clone()))
    trainer.train()
    labels = torch.cat(seen)
    assert len(labels) == 30 * 64
    share = (labels == NULL_CLASS).double().mean().item()
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(labels))
    # The kept labels are the batches' own digits, not something made up.
    assert set(labels[labels != NULL_CLASS].tolist()) == set(range(10))


def test_conditional_run_resumes_bit_identically_and_samples_a_class(tmp_path):
    straight = Trainer(conditional_config(tmp_path / "a"), progress=False, log=None)
    straight.train()
    first = Trainer(conditional_config(tmp_path / "b", steps=3), progress=False, log=None)
    first.train()
    resumed = Trainer(conditional_config(tmp_path / "b"), resume=True, progress=False, log=None)
    assert resumed.step == 3
    resumed.train()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for name, tensor in straight.ema.shadow.state_dict().items():
        assert torch.equal(tensor, resumed.ema.shadow.state_dict()[name]), name

    state = load_checkpoint(tmp_path / "b" / "run" / "ckpt_00000006.pt")
    model, schedule = model_from_checkpoint(state)
    assert model.hparams.num_classes == 10
    x = sample(model, schedule, (4, 1, 8, 8), steps=5, labels=torch.full((4,), 7),
               guidance_scale=2.0, progress=False)  # fmt: skip
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_a_conditional_run_needs_labelled_data(tmp_path):
    with pytest.raises(ValueError, match="'swiss_roll' is not: it has no labels"):
        default_config("swiss_roll", class_dropout=0.1).validate()
    flat = tmp_path / "flat"
    flat.mkdir()
    _write_png(flat / "a.png")
    _write_png(flat / "b.png")
    with pytest.raises(ValueError, match="fewer than two class subfolders"):
        default_config("folder", data_root=str(flat), class_dropout=0.1).validate()


def test_an_image_folder_with_class_subfolders_yields_their_labels(tmp_path):
    for cls, name in [("cat", "1.png"), ("cat", "2.png"), ("dog", "1.png"), ("owl", "9.png")]:
        (tmp_path / cls).mkdir(exist_ok=True)
        _write_png(tmp_path / cls / name)
    data = ImageFolderDataset(tmp_path, image_size=8)
    assert data.classes == ["cat", "dog", "owl"] == folder_classes(tmp_path)
    assert [data[i][1] for i in range(len(data))] == [0, 0, 1, 2]
    config = default_config("folder", data_root=str(tmp_path), class_dropout=0.1)
    assert config.network()[1]["num_classes"] == 3


def _write_png(path):
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def test_cli_conditional_train_info_and_guided_sample(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--conditional", "--steps", "4", "--batch-size", "32",
            "--sample-n", "10", "--sample-steps", "2", "--device", "cpu", "--quiet",
            "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    checkpoint = str(run / "ckpt_00000004.pt")
    capsys.readouterr()
    assert main(["info", checkpoint]) == 0
    assert "conditional, 10 classes (0-9; label dropout 0.1)" in capsys.readouterr().out
    out = tmp_path / "threes.png"
    sample_args = ["sample", "--checkpoint", checkpoint, "--class", "3", "--guidance", "2",
                   "--steps", "3", "--n", "6", "--out", str(out), "--judge"]  # fmt: skip
    assert main(sample_args) == 0
    printed = capsys.readouterr().out
    assert f"wrote 6 samples to {out}" in printed and "clearly the class asked for" in printed
    for bad, message in [
        (["--class", "10"], "class must be an integer in [0, 9], got 10"),
        (["--guidance", "2"], "--guidance needs --class"),
        (["--class", "1", "--guidance", "-1"], "guidance must be a finite number in [0, inf]"),
    ]:
        base = ["sample", "--checkpoint", checkpoint, "--out", str(out), "--steps", "2"]
        assert main(base + bad) == 1
        assert message in capsys.readouterr().err


def test_cli_refuses_a_class_for_an_unconditional_checkpoint(capsys):
    # A checkpoint written before conditioning existed (format 1): it loads, says so, refuses.
    old = "tests/data/format1_run/ckpt_00000004.pt"
    assert main(["info", old]) == 0
    assert "classes      unconditional" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", old, "--class", "1", "--out", "never.png"]) == 1
    assert "--class needs a conditional model" in capsys.readouterr().err
