"""A small digits classifier that judges generated 8x8 digits.

Explained in chapter 6 (sampling). A sample "looks like a digit" when a classifier trained on real
digits names its class with high confidence; the spread of the named classes shows whether the
model covers all ten digits. The classifier is also taught that noise is no digit (outlier exposure:
noise images are trained towards the uniform prediction), so it does not hand out high confidence to
garbage. Its penultimate layer gives the features of a Frechet distance (chapter 7):
``digits_features`` and ``digits_frechet_distance`` live here, so ``metrics`` stays generic.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lib._checks import check_int, check_real, check_tensor
from ddpm_lib._io import atomic_save
from ddpm_lib.data import load_digits
from ddpm_lib.metrics import frechet_distance
from ddpm_lib.paths import cache_root

CLASSIFIER_FILE = "digits_classifier_v1.pt"  # bump the version when the network or training changes
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """CNN for (1, 8, 8) digits in [-1, 1]: two conv layers at 8x8, one at 4x4, two linear layers.

    Explained in chapter 6.

    Args:
        width: channels of the first conv layer (the others have twice as many).
        feature_dim: size of the penultimate layer, returned by ``features``.
    """

    def __init__(self, width: int = 24, feature_dim: int = 128) -> None:
        super().__init__()
        self.width = check_int("width", width, low=1)
        self.feature_dim = check_int("feature_dim", feature_dim, low=1)
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
        )
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape (B, feature_dim), of images of shape (B, 1, 8, 8)."""
        h = self.conv(x).flatten(1)  # (B, 2 * width, 4, 4) -> (B, 2 * width * 16)
        return F.silu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (B, 10), of images of shape (B, 1, 8, 8)."""
        return self.head(self.features(x))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image by up to one pixel in each direction, filling with background (-1)."""
    B = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, 8, 8) -> (B, 1, 10, 10)
    dy, dx = torch.randint(0, 3, (2, B), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(B, 1, 8, 10)  # (B, 1, 8, 10)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(B, 1, 8, 8)  # (B, 1, 8, 8)
    return padded.gather(2, rows).gather(3, cols)


def _noise_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit: white noise, smooth blobs and flat grey, each in [-1, 1]."""
    white = torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1
    coarse = torch.rand(n, 1, 4, 4, generator=generator) * 2 - 1
    blobs = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    flat = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).expand(n, 1, 8, 8)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator)
    return torch.where(kind == 0, white, torch.where(kind == 1, blobs, flat))


@torch.enable_grad()  # callers may sit inside no_grad (judge_digits does)
def train_digits_classifier(
    epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 3e-3
) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on the digits' train split, deterministically on the CPU.

    Explained in chapter 6. Adam with a cosine learning rate, random one-pixel shifts and light
    Gaussian noise on the digits, and a batch of noise images per step trained towards the uniform
    prediction. The global random state is left untouched.

    Args:
        epochs: passes over the 1437 training digits, >= 1.
        seed: seed of the initial weights, the batches and the augmentation.
        batch_size: digits per step, >= 1.
        lr: peak learning rate, > 0.

    Returns:
        The trained classifier on the CPU, in eval mode.
    """
    epochs = check_int("epochs", epochs, low=1)
    seed = check_int("seed", seed)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_real("lr", lr, low=0.0, low_open=True)
    images, labels = load_digits("train").tensors
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)

    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x = _shift(images[batch], generator)
            x = x + 0.1 * torch.randn(x.shape, generator=generator)
            outliers = _noise_images(len(batch) // 2, generator)
            logits = model(torch.cat([x, outliers]))  # (B + B/2, 10)
            loss = F.cross_entropy(logits[: len(batch)], labels[batch])
            # Outlier exposure: cross-entropy to the uniform distribution on the noise images.
            loss = loss - 0.5 * F.log_softmax(logits[len(batch) :], dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(classifier: DigitsClassifier, split: str = "test") -> float:
    """Accuracy of ``classifier`` on the digits of ``split`` ("train", "test" or "all")."""
    images, labels = load_digits(split).tensors
    device = next(classifier.parameters()).device
    predictions = classifier.eval()(images.to(device)).argmax(dim=1).cpu()
    return (predictions == labels).float().mean().item()


def load_digits_classifier(
    cache_dir: str | os.PathLike | None = None, retrain: bool = False
) -> DigitsClassifier:
    """The digits classifier: loaded from ``cache_dir`` if cached there, else trained and cached.

    Explained in chapter 6. Training takes a few seconds on a CPU; the weights are saved as a
    ``state_dict`` (written to a temporary file, then renamed, so a crash never leaves half a file).

    Args:
        cache_dir: folder of the cache; defaults to ``paths.cache_root()``.
        retrain: train again even when a cached copy exists (and overwrite it).

    Returns:
        The classifier on the CPU, in eval mode.
    """
    cache_dir = cache_root() if cache_dir is None else Path(cache_dir).expanduser()
    path = cache_dir / CLASSIFIER_FILE
    if path.exists() and not retrain:
        model = DigitsClassifier()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError):
            pass  # a stale or damaged cache: train afresh and overwrite it

    model = train_digits_classifier()
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), path)
    return model


@torch.no_grad()
def judge_digits(
    samples: torch.Tensor,
    classifier: DigitsClassifier | None = None,
    confidence: float = 0.9,
    labels: torch.Tensor | None = None,
) -> dict:
    """How digit-like a batch of 8x8 samples is, in the eyes of the digits classifier.

    Explained in chapter 6; ``labels`` (the classes that were asked for) in chapter 9.

    Args:
        samples: images of shape (N, 1, 8, 8) in [-1, 1].
        classifier: a ``DigitsClassifier``; defaults to ``load_digits_classifier()``.
        confidence: probability of the top class above which a sample counts as a clear digit,
            in (0, 1).
        labels: the class each sample was asked to be, shape (N,); optional.

    Returns:
        ``dict(confident_share, class_histogram, n)``: the share of samples whose top class has
        probability >= ``confidence``; the shares of the 10 classes among all samples, by argmax;
        the number of samples. With ``labels`` also ``on_class_share``, the share of samples
        confidently classified as the class asked for.
    """
    check_tensor("samples", samples)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8) or samples.shape[0] < 1:
        raise ValueError(f"samples must have shape (N, 1, 8, 8) with N >= 1, got {samples.shape}")
    confidence = check_real(
        "confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True
    )
    if labels is not None:
        check_tensor("labels", labels)
        if labels.shape != (samples.shape[0],):
            raise ValueError(
                f"labels must have shape (N,) = ({samples.shape[0]},), got {tuple(labels.shape)}"
            )
    classifier = load_digits_classifier() if classifier is None else classifier
    device = next(classifier.parameters()).device
    probs = classifier.eval()(samples.to(device, torch.float32)).softmax(dim=1).cpu()  # (N, 10)
    top, predicted = probs.max(dim=1)
    histogram = torch.bincount(predicted, minlength=NUM_CLASSES).float() / len(predicted)
    judgement = dict(
        confident_share=(top >= confidence).float().mean().item(),
        class_histogram=histogram.tolist(),
        n=len(predicted),
    )
    if labels is not None:
        on_class = (top >= confidence) & (predicted == labels.cpu())
        judgement["on_class_share"] = on_class.float().mean().item()
    return judgement


@torch.no_grad()
def digits_features(
    images: torch.Tensor, classifier: DigitsClassifier | None = None
) -> torch.Tensor:
    """The digits classifier's penultimate features of (N, 1, 8, 8) images, clipped to [-1, 1].

    Explained in chapter 7.

    Args:
        images: digits of shape (N, 1, 8, 8).
        classifier: a ``DigitsClassifier``; defaults to ``load_digits_classifier()``.

    Returns:
        Features of shape (N, feature_dim), on the CPU.
    """
    images = check_tensor("images", images)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must have shape (N, 1, 8, 8), got {tuple(images.shape)}")
    classifier = load_digits_classifier() if classifier is None else classifier
    device = next(classifier.parameters()).device
    return classifier.eval().features(images.clamp(-1, 1).to(device)).cpu()


def digits_frechet_distance(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: DigitsClassifier | None = None
) -> float:
    """``metrics.frechet_distance`` of two sets of digits in the digits classifier's features.

    Explained in chapter 7.

    Args:
        images_a: digits of shape (N_a, 1, 8, 8), N_a >= 2.
        images_b: digits of shape (N_b, 1, 8, 8), N_b >= 2.
        classifier: a ``DigitsClassifier``; defaults to ``load_digits_classifier()``.
    """
    classifier = load_digits_classifier() if classifier is None else classifier
    return frechet_distance(
        digits_features(images_a, classifier), digits_features(images_b, classifier)
    )


def format_judgement(judgement: dict, confidence: float = 0.9) -> str:
    """One printout line (83 characters for three-digit counts), for example
    ``500 samples, 93.0% clear (p >= 0.9); classes 0-9 (%): 10 9 11 ...``, and a second one
    with the share clearly of the class asked for when the judgement has it.

    Args:
        judgement: the result of ``judge_digits``.
        confidence: the threshold that ``judge_digits`` used, for the label.
    """
    shares = " ".join(f"{100 * s:.0f}" for s in judgement["class_histogram"])
    line = (
        f"{judgement['n']} samples, {100 * judgement['confident_share']:.1f}% clear "
        f"(p >= {confidence:g}); classes 0-9 (%): {shares}"
    )
    if "on_class_share" in judgement:  # a second line: the first fills a printout's width
        line += f"\n{100 * judgement['on_class_share']:.1f}% clearly the class asked for"
    return line


if __name__ == "__main__":  # python -m ddpm_lib.classifier: train, time and score it
    start = time.perf_counter()
    trained = train_digits_classifier()
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s, test accuracy {classifier_accuracy(trained):.4f}")
