"""Image data sets read from disk: MNIST, Fashion-MNIST and CIFAR-10 through torchvision
(downloaded only when asked), and any folder of images, checked file by file.

Explained in chapter 3 (the forward process). Images reach the model as float32 tensors of shape
(C, H, W) in [-1, 1]; a missing data set or a broken file stops with an error that names it and
says what to do.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from ddpm_lib._checks import check_choice, check_int
from ddpm_lib.paths import default_data_root

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TORCHVISION_SETS = ("mnist", "fashion_mnist", "cifar10")
_TORCHVISION = {  # name -> (torchvision class, folder below root where it keeps its files)
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk (and downloading was not asked for)."""


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, too large); names the file."""


def to_unit_range(images: torch.Tensor, max_value: float) -> torch.Tensor:
    """Map integer pixel values in [0, max_value] to float32 in [-1, 1]."""
    return images.float() / max_value * 2 - 1


def resize_images(images: torch.Tensor, image_size: int | None, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of float images (N, C, H, W) to a square ``image_size``."""
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    out = [
        F.interpolate(part, size=(image_size, image_size), mode="bilinear", antialias=True)
        for part in images.split(chunk)
    ]
    return torch.cat(out).clamp_(-1, 1)


def load_torchvision(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    image_size: int | None = None,
) -> TensorDataset:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision, held in memory in [-1, 1].

    Explained in chapter 3. Nothing is downloaded unless ``download=True``; missing files raise a
    ``DatasetNotFoundError`` that says where they were looked for.

    Args:
        name: "mnist", "fashion_mnist" or "cifar10".
        root: folder that holds (or will hold) the data; defaults to ``default_data_root()``.
        split: "train" or "test".
        download: fetch the files when they are missing.
        image_size: resize to this size (bilinear), e.g. 32 for MNIST's 28; None keeps it.

    Returns:
        A ``TensorDataset`` of images (N, C, H, W) float32 and labels (N,) int64.
    """
    # torchvision.datasets takes about 2 s to import; only these three sets need it.
    import torchvision.datasets

    name = check_choice("name", name, TORCHVISION_SETS)
    split = check_choice("split", split, ("train", "test"))
    if image_size is not None:
        image_size = check_int("image_size", image_size, low=1)
    root = Path(default_data_root() if root is None else root).expanduser()
    class_name, folder = _TORCHVISION[name]
    try:
        data = getattr(torchvision.datasets, class_name)(
            str(root), train=split == "train", download=bool(download)
        )
    except RuntimeError as error:
        if download or "not found" not in str(error):
            raise
        raise DatasetNotFoundError(
            f"{name} ({split}) was not found in {root / folder}. Pass download=True to "
            f"load_dataset/load_torchvision (or --download on the command line) to fetch it "
            f"into {root}, or point root at a folder that already holds it."
        ) from error

    images = torch.as_tensor(np.asarray(data.data))
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W)
    else:
        images = images.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    x = to_unit_range(images.contiguous(), 255)
    y = torch.as_tensor(np.asarray(data.targets), dtype=torch.int64)
    return TensorDataset(resize_images(x, image_size), y)


class ImageFolderDataset(Dataset):
    """Every image below ``root`` (recursively), centre-cropped to a square and resized.

    Explained in chapter 3. Files with the extensions in ``IMAGE_EXTENSIONS`` are read in sorted
    order; each item is ``(x, y)`` with x of shape (channels, image_size, image_size) in [-1, 1]
    and y the class: when every image lies in a subfolder of ``root`` and there are at least two,
    the subfolders are the classes (``classes``, sorted; y is the index), else y = -1.
    8-bit images are scaled from [0, 255], 16-bit ones from [0, 65535]. Every file is checked
    once when the data set is made (see ``verify``): a broken image stops a run before it
    starts, not hours into it.

    Args:
        root: folder to search.
        image_size: side of the square images, >= 1.
        channels: 3 (RGB) or 1 (grey).
        verify: check every file now.
        progress: show a progress bar while checking (default: for more than 1000 files).

    Raises:
        UnreadableImageError: a file that cannot be decoded or is too large; names the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        *,
        verify: bool = True,
        progress: bool | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_size = check_int("image_size", image_size, low=1)
        self.channels = check_int("channels", channels, low=1, high=3)
        if self.channels == 2:
            raise ValueError("channels must be 1 (grey) or 3 (RGB), got 2")
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist or is no folder")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise DatasetNotFoundError(
                f"no image ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root} or its subfolders"
            )
        self.classes = folder_classes(self.root, self.files)
        self.labels = [
            self.classes.index(p.relative_to(self.root).parts[0]) if self.classes else -1
            for p in self.files
        ]
        if verify:
            self.verify(progress=len(self.files) > 1000 if progress is None else progress)

    def verify(self, progress: bool = False) -> None:
        """Read every file once, cheaply: PNG chunk checksums, JPEG decoded at 1/8 size (which
        still reads every byte), other formats decoded.

        Raises:
            UnreadableImageError: the first broken file, named.
        """
        for path in tqdm(self.files, desc="checking images", disable=not progress, leave=False):
            with _named_errors(path), Image.open(path) as image:
                if image.format == "PNG":
                    image.verify()
                else:
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        size = (self.image_size, self.image_size)
        with _named_errors(self.files[index]), Image.open(self.files[index]) as image:
            if image.mode.startswith("I"):  # 16-bit grey: convert("L") would clip it at 255
                grey = np.asarray(image, dtype=np.float32).clip(0, 65535) / 65535
                image, dtype = Image.fromarray(grey, mode="F"), np.float32
            else:
                image, dtype = image.convert("RGB" if self.channels == 3 else "L"), np.uint8
            image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)  # centre crop
            pixels = torch.from_numpy(np.array(image, dtype=dtype))
        if pixels.ndim == 2:
            pixels = pixels[:, :, None].expand(-1, -1, self.channels)  # (H, W) -> (H, W, C)
        x = pixels.permute(2, 0, 1).float()  # (H, W, C) -> (C, H, W)
        x = x.clamp(0, 1) if dtype == np.float32 else x / 255  # bicubic overshoots in float
        return x * 2 - 1, self.labels[index]


def folder_classes(root: str | os.PathLike, files: list[Path] | None = None) -> list[str]:
    """The class names of an image folder: its subfolders, sorted, when every image lies in one
    of them and there are at least two; else [] (an unlabelled folder).

    Args:
        root: the image folder.
        files: its image files, if already listed.
    """
    root = Path(root).expanduser()
    if files is None:
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    tops = {p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None
            for p in files}  # fmt: skip
    return [] if None in tops or len(tops) < 2 else sorted(tops)


@contextmanager
def _named_errors(path: Path):
    """Any failure to decode ``path`` as one line that names it."""
    try:
        yield
    except Image.DecompressionBombError as e:  # PIL refuses images above 2 x MAX_IMAGE_PIXELS
        raise UnreadableImageError(
            f"{path}: too large to load ({e.args[0].split(',')[0]}); resize it or raise "
            "PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's ways of saying "broken"
        raise UnreadableImageError(f"{path}: unreadable image ({e})") from None
