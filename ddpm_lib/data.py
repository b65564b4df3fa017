"""Data sets, all delivered as float32 tensors in [-1, 1] (images as (C, H, W)).

Explained in chapter 3 (the forward process). Data live in [-1, 1] because the forward process
shrinks x_0 towards a standard normal: the data must sit on the same scale as the noise.
Every data set yields ``(x, y)`` pairs, with y the class label or -1 where there is none.

- Offline and fast (the book and CI): 2-D toy sets (two moons, swiss roll, a ring of Gaussians)
  and scikit-learn's 8x8 handwritten digits, shipped inside scikit-learn.
- For GPU users: MNIST, Fashion-MNIST and CIFAR-10 through torchvision (downloaded only when asked),
  and any folder of images: read from disk by ``ddpm_lib.image_sets``, whose names this module
  also offers.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ddpm_lib._checks import check_choice, check_int, check_real
from ddpm_lib.image_sets import (
    IMAGE_EXTENSIONS,
    TORCHVISION_SETS,
    DatasetNotFoundError,
    ImageFolderDataset,
    UnreadableImageError,
    load_torchvision,
    resize_images,
    to_unit_range,
)
from ddpm_lib.mixture import GaussianMixture
from ddpm_lib.paths import cache_root, default_data_root

__all__ = [  # with the names of image_sets and paths that callers import from here
    "DATASETS",
    "DIGITS_LEVELS",
    "DIGITS_SIZE",
    "IMAGE_EXTENSIONS",
    "TORCHVISION_SETS",
    "TOY_SETS",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "UnreadableImageError",
    "cache_root",
    "dataset_info",
    "default_data_root",
    "digits_split_indices",
    "load_dataset",
    "load_digits",
    "load_torchvision",
    "make_moons",
    "make_ring",
    "make_swiss_roll",
    "to_unit_range",
]

DIGITS_LEVELS = 17  # scikit-learn's digits hold pixel values 0..16
DIGITS_SIZE = 1797
TOY_SETS = ("moons", "swiss_roll", "ring")
DATASETS = (*TOY_SETS, "digits", *TORCHVISION_SETS, "folder")
_INFO = {  # name -> (kind, channels, image_size, num_classes)
    "moons": ("2d", None, None, 2),
    "swiss_roll": ("2d", None, None, None),
    "ring": ("2d", None, None, 8),
    "digits": ("image", 1, 8, 10),
    "mnist": ("image", 1, 28, 10),
    "fashion_mnist": ("image", 1, 28, 10),
    "cifar10": ("image", 3, 32, 10),
    "folder": ("image", 3, 64, None),
}


# --------------------------------------------------------------------------------------------------
# 2-D toy sets: i.i.d. draws from a fixed distribution, roughly inside [-1, 1]^2.


def make_moons(
    n: int,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    *,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles, each point on either moon with probability 1/2.

    Explained in chapter 3. The shape of scikit-learn's ``make_moons``, but with random angles
    (a sample from a distribution rather than a grid), centred and scaled into [-1, 1].

    Args:
        n: number of points, >= 1.
        noise: standard deviation of the Gaussian noise added to each coordinate, >= 0.
        generator: a CPU random generator, for reproducible draws.
        return_labels: also return which moon (0 or 1) each point lies on.

    Returns:
        Points of shape (n, 2), float32 (and labels of shape (n,), int64).
    """
    n = check_int("n", n, low=1)
    noise = check_real("noise", noise, low=0.0)
    labels = torch.randint(0, 2, (n,), generator=generator)
    angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    outer = torch.stack([angle.cos(), angle.sin()], dim=1)  # (n, 2), upper half circle
    inner = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], dim=1)  # lower one, shifted
    x = torch.where(labels[:, None] == 0, outer, inner)
    # Raw range is x in [-1, 2], y in [-0.5, 1]: centre it and keep the aspect ratio.
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.5
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = x.float()
    return (x, labels) if return_labels else x


def make_swiss_roll(
    n: int, noise: float = 0.03, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A 2-D spiral (the swiss roll seen from its end), scaled into [-1, 1].

    Explained in chapter 3. Points are uniform in the spiral's angle s in [1.5 pi, 4.5 pi], at
    (s cos s, s sin s) / (4.5 pi), as in scikit-learn's ``make_swiss_roll``.

    Args:
        n: number of points, >= 1.
        noise: standard deviation of the Gaussian noise added to each coordinate, >= 0.
        generator: a CPU random generator, for reproducible draws.

    Returns:
        Points of shape (n, 2), float32.
    """
    n = check_int("n", n, low=1)
    noise = check_real("noise", noise, low=0.0)
    s = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    x = torch.stack([s * s.cos(), s * s.sin()], dim=1) / (4.5 * math.pi)  # (n, 2)
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x.float()


def make_ring(
    n: int,
    n_modes: int = 8,
    generator: torch.Generator | None = None,
    *,
    radius: float = 0.8,
    std: float = 0.05,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Equal-weight Gaussians on a circle (``GaussianMixture.ring``): the mode-collapse test.

    Explained in chapter 3 (and used in chapter 1 to count the modes a model covers).

    Args:
        n: number of points, >= 1.
        n_modes: number of Gaussians on the ring, >= 1.
        generator: a CPU random generator, for reproducible draws.
        radius: radius of the ring, > 0.
        std: standard deviation of each Gaussian, > 0.
        return_labels: also return the mode each point was drawn from.

    Returns:
        Points of shape (n, 2), float32 (and labels of shape (n,), int64).
    """
    mixture = GaussianMixture.ring(n_modes=n_modes, radius=radius, std=std)
    return mixture.sample(n, generator=generator, return_labels=return_labels)


# --------------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits, held in memory.


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn takes about 1.5 s to import; only the digits need it.
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_split_indices(split: str = "train") -> np.ndarray:
    """Indices into scikit-learn's 1797 digits of a deterministic, stratified 80/20 split.

    Args:
        split: "train" (1437 images), "test" (360 images) or "all" (1797 images).
    """
    from sklearn.model_selection import train_test_split  # about 1 s to import: digits only

    split = check_choice("split", split, ("train", "test", "all"))
    _, labels = _digits_arrays()
    indices = np.arange(len(labels))
    if split == "all":
        return indices
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=labels)
    return np.sort(train if split == "train" else test)


def load_digits(split: str = "train", image_size: int | None = None) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits as a data set of (1, 8, 8) images in [-1, 1].

    Explained in chapter 3. Real data that ships inside scikit-learn: no download, and small enough
    that a CPU trains a diffusion model on it in minutes. Pixels take 17 levels (0..16), mapped
    with x / 16 * 2 - 1.

    Args:
        split: "train" (80 %), "test" (20 %) or "all"; the split is stratified and deterministic.
        image_size: resize to this size (bilinear); None keeps 8.

    Returns:
        A ``TensorDataset`` of images (N, 1, 8, 8) float32 and labels (N,) int64.
    """
    indices = digits_split_indices(split)
    if image_size is not None:
        image_size = check_int("image_size", image_size, low=1)
    images, labels = _digits_arrays()
    x = to_unit_range(torch.from_numpy(images[indices]), DIGITS_LEVELS - 1)[:, None]  # (N, 1, 8, 8)
    return TensorDataset(resize_images(x, image_size), torch.from_numpy(labels[indices]))


# --------------------------------------------------------------------------------------------------
# One entry point.


def dataset_info(name: str) -> dict:
    """What the trainer needs to build a model for data set ``name``.

    Args:
        name: one of ``DATASETS``.

    Returns:
        ``dict(kind="2d"|"image", channels, image_size, dim, num_classes, levels)``; channels and
        image_size are None for 2-D sets, dim is None for images. A folder's image_size is the
        default, 64. ``levels`` is the number of values a pixel takes (17 for the digits, 256 for
        8-bit images; None for the continuous 2-D sets): the decoder of the likelihood bound.
    """
    name = check_choice("name", name, DATASETS)
    kind, channels, image_size, num_classes = _INFO[name]
    return dict(
        kind=kind,
        channels=channels,
        image_size=image_size,
        dim=2 if kind == "2d" else None,
        num_classes=num_classes,
        levels=None if kind == "2d" else DIGITS_LEVELS if name == "digits" else 256,
    )


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    image_size: int | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load any data set by name, as ``(x, y)`` pairs in [-1, 1].

    Explained in chapter 3.

    Args:
        name: one of ``DATASETS``: "moons", "swiss_roll", "ring", "digits", "mnist",
            "fashion_mnist", "cifar10", "folder".
        root: data folder for the torchvision sets (default ``default_data_root()``); the image
            folder itself for "folder" (required).
        split: "train" or "test" ("all" too for digits); ignored by the toy sets and "folder".
            The toy sets are labelled by moon or mode (-1 for the swiss roll).
        download: let torchvision fetch missing files.
        image_size: resize images to this size; for "folder" the default is 64. Not for 2-D sets.
        n: for the toy sets, the number of points (default 10000); for images, keep only the
            first n (a quick subset).
        generator: CPU random generator for the toy sets.
        channels: for "folder", 3 (RGB, default) or 1 (grey).
    """
    name = check_choice("name", name, DATASETS)
    split = check_choice("split", split, ("train", "test", "all"))
    if n is not None:
        n = check_int("n", n, low=1)
    if image_size is not None:
        image_size = check_int("image_size", image_size, low=1)

    if name in TOY_SETS:
        if image_size is not None:
            raise ValueError(f"image_size applies to image data sets only, not to {name!r}")
        n = 10_000 if n is None else n
        if name == "swiss_roll":
            x, y = make_swiss_roll(n, generator=generator), torch.full((n,), -1, dtype=torch.int64)
        else:
            make = make_moons if name == "moons" else make_ring
            x, y = make(n, generator=generator, return_labels=True)
        return TensorDataset(x, y)

    if name == "digits":
        dataset: Dataset = load_digits(split, image_size=image_size)
    elif name in TORCHVISION_SETS:
        dataset = load_torchvision(name, root, split, download=download, image_size=image_size)
    else:
        if root is None:
            raise ValueError("root must name the image folder for name='folder', got None")
        dataset = ImageFolderDataset(
            root, image_size or _INFO["folder"][2], channels=3 if channels is None else channels
        )

    if n is not None and n < len(dataset):
        if isinstance(dataset, TensorDataset):
            return TensorDataset(*(tensor[:n] for tensor in dataset.tensors))
        return torch.utils.data.Subset(dataset, range(n))
    return dataset
