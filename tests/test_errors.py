"""Bad input fails early with an error that names the parameter and the accepted range."""

import re

import pytest
import torch

from ddpm_lib import (
    GaussianMixture,
    NoiseSchedule,
    diffusion_loss,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    q_sample_iterative,
    sample,
)

S = NoiseSchedule.linear(T=1000)
X0 = torch.zeros(4, 2)
T_OK = torch.tensor([0, 1, 2, 3])
EMPTY = torch.zeros(0, 2)


def long(*values):
    return torch.tensor(values, dtype=torch.long)


# (id, call, error type, parameter the message must name)
CASES = [
    ("T=0", lambda: NoiseSchedule.linear(T=0), ValueError, "T"),
    ("T=-5 cosine", lambda: NoiseSchedule.cosine(T=-5), ValueError, "T"),
    ("T float", lambda: NoiseSchedule.linear(T=10.5), TypeError, "T"),
    ("beta_start=0", lambda: NoiseSchedule.linear(beta_start=0.0), ValueError, "beta_start"),
    ("beta_end=1", lambda: NoiseSchedule.linear(beta_end=1.0), ValueError, "beta_end"),
    ("beta_end<0", lambda: NoiseSchedule.linear(beta_end=-0.1), ValueError, "beta_end"),
    (
        "start>end",
        lambda: NoiseSchedule.linear(beta_start=0.1, beta_end=0.01),
        ValueError,
        "beta_start",
    ),
    ("betas>=1", lambda: NoiseSchedule([0.1, 1.0]), ValueError, "betas"),
    ("betas<=0", lambda: NoiseSchedule([0.0, 0.1]), ValueError, "betas"),
    ("betas empty", lambda: NoiseSchedule([]), ValueError, "betas"),
    ("cosine s<0", lambda: NoiseSchedule.cosine(s=-0.1), ValueError, "s"),
    ("max_beta=1", lambda: NoiseSchedule.cosine(max_beta=1.0), ValueError, "max_beta"),
    ("t<0", lambda: q_sample(S, X0, long(0, 1, 2, -1)), ValueError, "t"),
    ("t>=T", lambda: q_sample(S, X0, long(0, 1, 2, 1000)), ValueError, "t"),
    ("t float", lambda: q_sample(S, X0, torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "t"),
    ("t int", lambda: q_sample(S, X0, 5), TypeError, "t"),
    ("t shape", lambda: q_sample(S, X0, long(1, 2)), ValueError, "t"),
    ("noise shape", lambda: q_sample(S, X0, T_OK, torch.zeros(4, 3)), ValueError, "noise"),
    ("x0 not tensor", lambda: q_sample(S, [[0.0]], T_OK), TypeError, "x0"),
    ("iterative t>=T", lambda: q_sample_iterative(S, X0, long(0, 0, 0, 5000)), ValueError, "t"),
    ("x_t shape", lambda: q_posterior(S, X0, torch.zeros(4, 1), T_OK), ValueError, "x_t"),
    ("posterior t", lambda: q_posterior(S, X0, X0, long(0, 0, 0, 1000)), ValueError, "t"),
    ("eps shape", lambda: predict_x0(S, X0, T_OK, torch.zeros(2, 2)), ValueError, "eps"),
    ("x0 shape", lambda: predict_eps(S, X0, T_OK, torch.zeros(4)), ValueError, "x0"),
    (
        "reduction",
        lambda: diffusion_loss(torch.zeros_like, S, X0, reduction="sum"),
        ValueError,
        "reduction",
    ),
    (
        "model output",
        lambda: diffusion_loss(lambda x, t: x[:, :1], S, X0),
        ValueError,
        "model output",
    ),
    (
        "weights sum",
        lambda: GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [0.5, 0.4]),
        ValueError,
        "weights",
    ),
    (
        "weights<0",
        lambda: GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [1.5, -0.5]),
        ValueError,
        "weights",
    ),
    ("stds=0", lambda: GaussianMixture([[0.0], [1.0]], [1.0, 0.0], [0.5, 0.5]), ValueError, "stds"),
    (
        "stds<0",
        lambda: GaussianMixture([[0.0], [1.0]], [-1.0, 1.0], [0.5, 0.5]),
        ValueError,
        "stds",
    ),
    ("stds shape", lambda: GaussianMixture([[0.0], [1.0]], [1.0], [0.5, 0.5]), ValueError, "stds"),
    (
        "means shape",
        lambda: GaussianMixture([0.0, 1.0], [1.0, 1.0], [0.5, 0.5]),
        ValueError,
        "means",
    ),
    (
        "oracle x_t dim",
        lambda: GaussianMixture.ring().eps_oracle(S)(torch.zeros(4, 3), T_OK),
        ValueError,
        "x_t",
    ),
    ("ring n_modes", lambda: GaussianMixture.ring(n_modes=0), ValueError, "n_modes"),
    # inf and NaN are no numbers an option accepts, even where the interval is open.
    ("cosine s=inf", lambda: NoiseSchedule.cosine(s=float("inf")), ValueError, "s"),
    ("ring radius=inf", lambda: GaussianMixture.ring(radius=float("inf")), ValueError, "radius"),
    # The documented promise holds for integer and 0-dim data and for empty batches too.
    ("x0 integer", lambda: q_sample(S, torch.zeros(4, 2, dtype=torch.long), T_OK), TypeError, "x0"),
    ("x0 0-dim", lambda: q_sample(S, torch.tensor(0.5), T_OK), ValueError, "x0"),
    ("x0 empty", lambda: diffusion_loss(torch.zeros_like, S, torch.zeros(0, 2)), ValueError, "x0"),
    ("posterior x0 0-dim", lambda: q_posterior(S, torch.tensor(0.5), X0, T_OK), ValueError, "x0"),
    ("x_t empty", lambda: predict_x0(S, EMPTY, long(), EMPTY), ValueError, "x_t"),
    ("iterative x0 integer", lambda: q_sample_iterative(S, X0.int(), T_OK), TypeError, "x0"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_parameter(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert re.match(rf"{re.escape(name)}\b", str(info.value)), str(info.value)


class CountingModel:
    """Counts calls, so a test can tell that no work was done before an error."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x_t, t):
        self.calls += 1
        return torch.zeros_like(x_t)


SAMPLE_CASES = [
    ("steps=0", dict(steps=0), ValueError, "steps"),
    ("steps>T", dict(steps=1001), ValueError, "steps"),
    ("steps float", dict(steps=2.5), TypeError, "steps"),
    ("steps not increasing", dict(steps=[0, 5, 5]), ValueError, "steps"),
    ("steps out of range", dict(steps=[0, 1000]), ValueError, "steps"),
    ("eta<0", dict(sampler="ddim", eta=-0.5), ValueError, "eta"),
    ("eta=inf", dict(sampler="ddim", eta=float("inf")), ValueError, "eta"),
    ("eta=nan", dict(sampler="ddim", eta=float("nan")), ValueError, "eta"),
    ("eta with ddpm", dict(sampler="ddpm", eta=1.0), ValueError, "eta"),
    ("sampler", dict(sampler="euler"), ValueError, "sampler"),
    ("variance", dict(variance="medium"), ValueError, "variance"),
    ("shape", dict(shape=(0, 2)), ValueError, "shape"),
    ("x_T shape", dict(x_T=torch.zeros(3, 2)), ValueError, "x_T"),
    ("return_trajectory", dict(return_trajectory=0), ValueError, "return_trajectory"),
]


@pytest.mark.parametrize(
    "kwargs,error,name", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES]
)
def test_sample_rejects_bad_input_before_any_model_call(kwargs, error, name):
    model = CountingModel()
    kwargs = {"shape": (4, 2), **kwargs}
    with pytest.raises(error) as info:
        sample(model, S, progress=False, **kwargs)
    assert re.match(rf"{re.escape(name)}\b", str(info.value)), str(info.value)
    assert model.calls == 0


def test_messages_give_the_accepted_range():
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        q_sample(S, X0, long(0, 0, 0, 1000))
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        sample(CountingModel(), S, (2, 2), steps=0, progress=False)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule.linear(beta_end=2.0)


@pytest.mark.parametrize(
    "output",
    [lambda x: x[:, :1], lambda x: x.sum(), lambda x: x[:1], lambda x: x.tolist()],
    ids=["(B,1)", "scalar", "(1,2)", "a list"],
)
def test_sample_refuses_a_model_output_that_only_broadcasts(output):
    with pytest.raises(ValueError, match=r"^model output must have the shape of x_t \(4, 2\)"):
        sample(lambda x, t: output(torch.zeros_like(x)), S, (4, 2), steps=3, progress=False)


def test_sample_refuses_to_return_nan():
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        sample(lambda x, t: torch.full_like(x, float("nan")), S, (4, 2), steps=3, progress=False)
