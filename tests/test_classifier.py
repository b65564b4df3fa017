"""The digits classifier: accurate, deterministic, cached, and a fair judge of samples."""

from __future__ import annotations

import pytest
import torch

import ddpm_lib.classifier as classifier_module
from ddpm_lib.classifier import (
    CLASSIFIER_FILE,
    DigitsClassifier,
    classifier_accuracy,
    digits_features,
    digits_frechet_distance,
    format_judgement,
    judge_digits,
    load_digits_classifier,
    train_digits_classifier,
)
from ddpm_lib.data import load_dataset, load_digits


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_digits_classifier(cache_dir)  # trains once (a few seconds) and caches


def test_classifier_is_accurate_on_the_test_split(classifier):
    assert classifier_accuracy(classifier, "test") >= 0.95


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = train_digits_classifier(epochs=1).state_dict()
    second = train_digits_classifier(epochs=1).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train_digits_classifier(epochs=1, seed=1).state_dict()
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_real_digits_are_judged_confident_and_uniform(classifier):
    images, _ = load_digits("test").tensors
    judgement = judge_digits(images, classifier)
    assert judgement["n"] == 360
    assert judgement["confident_share"] > 0.9
    histogram = judgement["class_histogram"]
    assert len(histogram) == 10 and sum(histogram) == pytest.approx(1.0)
    assert min(histogram) > 0.07 and max(histogram) < 0.13  # each class holds about 10 %


def test_noise_is_rarely_judged_a_digit(classifier):
    generator = torch.Generator().manual_seed(123)
    uniform = torch.rand(500, 1, 8, 8, generator=generator) * 2 - 1
    gaussian = torch.randn(500, 1, 8, 8, generator=generator).clamp(-1, 1)
    assert judge_digits(uniform, classifier)["confident_share"] < 0.05
    assert judge_digits(gaussian, classifier)["confident_share"] < 0.05


def test_features_and_logits_shapes(classifier):
    x = load_digits("test").tensors[0][:5]
    assert classifier.features(x).shape == (5, classifier.feature_dim)
    assert classifier(x).shape == (5, 10)


def test_cache_roundtrip(cache_dir, classifier, monkeypatch):
    assert (cache_dir / CLASSIFIER_FILE).is_file()
    assert [p.name for p in cache_dir.iterdir()] == [CLASSIFIER_FILE]  # no temporary file left

    def no_training(**kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(classifier_module, "train_digits_classifier", no_training)
    loaded = load_digits_classifier(cache_dir)
    assert not loaded.training
    for key, value in classifier.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_retrain_and_damaged_cache_train_afresh(tmp_path, monkeypatch):
    calls = []

    def fake_training():
        calls.append(1)
        return DigitsClassifier().eval()

    monkeypatch.setattr(classifier_module, "train_digits_classifier", fake_training)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    load_digits_classifier()  # default folder from $DDPM_CACHE
    assert (tmp_path / CLASSIFIER_FILE).is_file() and len(calls) == 1
    load_digits_classifier()
    assert len(calls) == 1
    load_digits_classifier(retrain=True)
    assert len(calls) == 2
    (tmp_path / CLASSIFIER_FILE).write_bytes(b"not a checkpoint")
    load_digits_classifier()
    assert len(calls) == 3


def test_judge_digits_rejects_bad_input(classifier):
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\)"):
        judge_digits(torch.zeros(4, 8, 8), classifier)
    with pytest.raises(ValueError, match="confidence"):
        judge_digits(torch.zeros(4, 1, 8, 8), classifier, confidence=1.0)
    with pytest.raises(TypeError, match="samples must be a torch.Tensor"):
        judge_digits([[0.0]], classifier)


def test_format_judgement_is_one_line():
    judgement = dict(confident_share=0.934, class_histogram=[0.1] * 10, n=500)
    line = format_judgement(judgement)
    assert line == (
        "500 samples, 93.4% clear (p >= 0.9); classes 0-9 (%): 10 10 10 10 10 10 10 10 10 10"
    )
    assert len(line) <= 88  # fits a code-output line of the book


def test_digits_frechet_distance_is_small_for_real_digits_and_grows_with_noise():
    x_train = load_dataset("digits", split="train").tensors[0]
    x_test = load_dataset("digits", split="test").tensors[0]
    g = torch.Generator().manual_seed(0)
    floor = digits_frechet_distance(x_train, x_test)
    noisy = [
        digits_frechet_distance(x_train, x_test + s * torch.randn(x_test.shape, generator=g))
        for s in (0.1, 0.3, 0.6, 1.0)
    ]
    assert digits_frechet_distance(x_test, x_test) < 1e-6
    assert floor < noisy[0] < noisy[1] < noisy[2] < noisy[3]
    assert noisy[-1] > 10 * floor
    assert digits_features(x_test[:5]).shape == (5, 128)
    with pytest.raises(ValueError, match=r"^images must have shape \(N, 1, 8, 8\)"):
        digits_features(torch.zeros(5, 1, 28, 28))
