"""Data sets: shapes, ranges, determinism, the digits split, and the torchvision path offline."""

from __future__ import annotations

import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from ddpm_lib.data import (
    DATASETS,
    DIGITS_LEVELS,
    DIGITS_SIZE,
    DatasetNotFoundError,
    ImageFolderDataset,
    dataset_info,
    digits_split_indices,
    load_dataset,
    load_digits,
    make_moons,
    make_ring,
    make_swiss_roll,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 2-D toy sets -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_moons, make_swiss_roll, make_ring])
def test_toy_sets_are_2d_in_the_unit_box_and_reproducible(make):
    x = make(2000, generator=gen(0))
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert 0.7 < x.abs().max() < 1.3  # fills [-1, 1]; only the noise spills a little out
    assert torch.equal(x, make(2000, generator=gen(0)))
    assert not torch.equal(x, make(2000, generator=gen(1)))


def test_moons_lie_on_two_half_circles():
    x, labels = make_moons(1000, noise=0.0, generator=gen(0), return_labels=True)
    raw = x.double() * 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)  # undo the scaling
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64)[labels]
    torch.testing.assert_close((raw - centres).norm(dim=1), torch.ones(1000, dtype=torch.float64))
    outer, inner = labels == 0, labels == 1
    assert torch.all(raw[outer, 1] >= 0) and torch.all(raw[inner, 1] <= 0.5)  # upper / lower half
    assert 0.4 < labels.float().mean() < 0.6


def test_swiss_roll_is_a_spiral():
    x = make_swiss_roll(1000, noise=0.0, generator=gen(0)).double()
    radius = x.norm(dim=1)  # = s / (4.5 pi) for the spiral angle s in [1.5 pi, 4.5 pi]
    assert radius.min() >= 1 / 3 - 1e-6 and radius.max() <= 1 + 1e-6
    s = radius * 4.5 * torch.pi
    spiral = torch.stack([s.cos(), s.sin()], 1) * radius[:, None]
    torch.testing.assert_close(spiral, x, atol=1e-5, rtol=0)  # float32 points


def test_ring_draws_from_its_modes():
    x, labels = make_ring(4000, n_modes=6, generator=gen(0), return_labels=True)
    angles = labels.double() * 2 * torch.pi / 6
    means = 0.8 * torch.stack([angles.cos(), angles.sin()], 1)
    distance = (x.double() - means).norm(dim=1)
    assert distance.max() < 6 * 0.05 and torch.bincount(labels, minlength=6).min() > 500


def test_toy_sets_reject_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        make_moons(0)
    with pytest.raises(ValueError, match="noise"):
        make_swiss_roll(10, noise=-1)
    with pytest.raises(TypeError, match="n must be an integer"):
        make_ring(10.5)


def test_load_dataset_wraps_toy_sets_with_labels():
    moons = load_dataset("moons", n=100, generator=gen(0))
    assert isinstance(moons, TensorDataset) and len(moons) == 100
    x, y = moons[0]
    assert x.shape == (2,) and y.item() in (0, 1)
    assert torch.all(load_dataset("swiss_roll", n=10).tensors[1] == -1)
    assert len(load_dataset("ring")) == 10_000
    assert torch.equal(
        load_dataset("ring", n=50, generator=gen(3)).tensors[0], make_ring(50, generator=gen(3))
    )


# --- scikit-learn digits ----------------------------------------------------------------------


def test_digits_are_8x8_in_the_unit_range_with_17_levels():
    data = load_digits("all")
    x, y = data.tensors
    assert x.shape == (DIGITS_SIZE, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    levels = torch.unique(x)
    assert len(levels) == DIGITS_LEVELS
    torch.testing.assert_close(levels, torch.linspace(-1, 1, DIGITS_LEVELS))
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_disjoint_and_stratified():
    from sklearn.model_selection import train_test_split

    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1437 and len(test) == 360 and len(train) + len(test) == DIGITS_SIZE
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(DIGITS_SIZE))
    assert np.array_equal(train, digits_split_indices("train"))  # same on every call
    labels = load_digits("all").tensors[1].numpy()
    reference = train_test_split(
        np.arange(DIGITS_SIZE), test_size=0.2, random_state=0, stratify=labels
    )
    assert np.array_equal(test, np.sort(reference[1]))
    # Stratified: each class's share of the test set is its share of all digits.
    expected = 0.2 * np.bincount(labels, minlength=10)
    assert np.abs(np.bincount(labels[test], minlength=10) - expected).max() <= 1
    train_set = load_digits("train")
    assert torch.equal(train_set.tensors[0], load_digits("all").tensors[0][train])


def test_digits_through_load_dataset_with_resize_and_subset():
    data = load_dataset("digits", split="test", image_size=16, n=20)
    x, y = data.tensors
    assert x.shape == (20, 1, 16, 16) and y.shape == (20,)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="split must be one of 'train', 'test', 'all'"):
        load_digits("validation")


# --- torchvision sets, offline ----------------------------------------------------------------


def write_idx_mnist(raw: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """Write the four uncompressed IDX files that torchvision's MNIST reads from ``raw``."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 0
        images[0, 0, 0] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        # IDX header: magic (0, 0, dtype 0x08 = uint8, number of dimensions), then the sizes.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + labels.tobytes()
        )
        arrays[prefix] = images, labels
    return arrays


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data code tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_sets_load_offline_from_idx_files(tmp_path, no_network, name, folder):
    arrays = write_idx_mnist(tmp_path / folder / "raw")
    train = load_dataset(name, root=tmp_path)
    x, y = train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    images, labels = arrays["train"]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255 * 2 - 1)
    assert x[0, 0, 0, 0] == 1 and x[0, 0, 0, 1] == -1
    assert y.tolist() == labels.tolist()

    test = load_dataset(name, root=tmp_path, split="test", image_size=32, n=3)
    assert test.tensors[0].shape == (3, 1, 32, 32)
    assert test.tensors[0].min() >= -1 and test.tensors[0].max() <= 1


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_torchvision_set_says_how_to_get_it_and_never_downloads(tmp_path, no_network, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=root)
    message = str(error.value)
    assert str(root) in message and "download=True" in message and "--download" in message
    assert isinstance(error.value, FileNotFoundError)
    assert not root.exists() or not any(root.rglob("*"))  # nothing was fetched


# --- image folders ----------------------------------------------------------------------------


def test_image_folder_reads_every_image_recursively(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red_wide.png")
    Image.new("L", (10, 30), 255).save(tmp_path / "sub" / "white_tall.JPG")
    Image.new("RGBA", (16, 16), (0, 0, 255, 255)).save(tmp_path / "sub" / "deeper" / "blue.webp")
    (tmp_path / "notes.txt").write_text("not an image")

    data = ImageFolderDataset(tmp_path, image_size=8)
    assert len(data) == 3
    red, label = data[0]  # files are sorted: red_wide.png, sub/deeper/blue.webp, sub/white_tall.JPG
    assert red.shape == (3, 8, 8) and red.dtype == torch.float32 and label == -1
    torch.testing.assert_close(red[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    blue, white = data[1][0], data[2][0]
    torch.testing.assert_close(blue[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02, rtol=0)
    assert torch.allclose(white, torch.ones(3, 8, 8), atol=0.02)

    grey = load_dataset("folder", root=tmp_path, image_size=6, channels=1, n=2)
    assert len(grey) == 2 and grey[0][0].shape == (1, 6, 6)
    assert load_dataset("folder", root=tmp_path)[0][0].shape == (3, 64, 64)  # default size


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"no image .* found in {tmp_path}"):
        ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", image_size=8)
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolderDataset(tmp_path, image_size=8, channels=2)
    with pytest.raises(ValueError, match="root must name the image folder"):
        load_dataset("folder")


# --- names and info ---------------------------------------------------------------------------


def test_dataset_info_for_every_name():
    for name in DATASETS:
        info = dataset_info(name)
        assert info["kind"] in ("2d", "image")
        if info["kind"] == "2d":
            assert info["dim"] == 2 and info["channels"] is None
        else:
            assert info["channels"] in (1, 3) and info["image_size"] >= 8
    assert dataset_info("digits") | {} == dict(
        kind="image", channels=1, image_size=8, dim=None, num_classes=10, levels=17
    )
    assert dataset_info("cifar10")["channels"] == 3
    assert dataset_info("mnist")["levels"] == 256 and dataset_info("moons")["levels"] is None


def test_bad_names_and_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"name must be one of 'moons'.*'folder', got 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="name must be one of"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="image_size applies to image data sets only"):
        load_dataset("moons", image_size=8)
    with pytest.raises(ValueError, match="n must be"):
        load_dataset("digits", n=0)


# --- broken, huge and 16-bit images --------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height grey pixels and holds almost none: 100 bytes on disk."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )  # fmt: skip


TINY_UNET = {"base_channels": 8, "channel_mult": [1], "attention_resolutions": [], "num_groups": 4}


def _good_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"good_{i}.png")


@pytest.mark.parametrize("kind", ["png cut in half", "jpeg cut short", "not an image"])
def test_a_broken_image_is_named_when_the_folder_is_opened(tmp_path, kind):
    from ddpm_lib.data import UnreadableImageError

    _good_images(tmp_path)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg", quality=90
    )
    broken = {"png cut in half": "photo.png", "jpeg cut short": "photo.jpg"}.get(kind, "x.webp")
    data = (tmp_path / broken).read_bytes() if broken != "x.webp" else b"not an image at all"
    (tmp_path / broken).write_bytes(data[: len(data) // 2] if broken != "x.webp" else data)
    with pytest.raises(UnreadableImageError) as info:
        ImageFolderDataset(tmp_path, image_size=8)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / broken}: unreadable image") and "\n" not in message


def test_a_broken_image_stops_a_run_before_training_starts(tmp_path):
    from ddpm_lib.data import UnreadableImageError
    from ddpm_lib.training import Trainer, default_config

    images = tmp_path / "images"
    _good_images(images)
    (images / "zz_broken.png").write_bytes((images / "good_0.png").read_bytes()[:40])
    config = default_config("folder", data_root=str(images), image_size=8, out=str(tmp_path / "r"),
                            model_config=TINY_UNET)  # fmt: skip
    with pytest.raises(UnreadableImageError, match=rf"^{images / 'zz_broken.png'}: "):
        Trainer(config, progress=False, log=None)
    assert not (tmp_path / "r").exists()


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path):
    from ddpm_lib.data import UnreadableImageError

    _good_images(tmp_path)
    _png_header_only(tmp_path / "huge.png", 30_000, 30_000)  # 900 M pixels declared
    with pytest.raises(UnreadableImageError) as info:
        ImageFolderDataset(tmp_path, image_size=8)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'huge.png'}: too large to load") and "\n" not in message
    assert "MAX_IMAGE_PIXELS" in message


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_scaled_from_their_real_range(tmp_path, channels):
    values = np.full((16, 16), 1000, dtype=np.uint16)  # dark: 1000 of 65535
    values[:, 8:] = 65535  # right half white
    Image.fromarray(values).save(tmp_path / "deep.png")
    x, _ = ImageFolderDataset(tmp_path, image_size=16, channels=channels)[0]
    assert x.shape == (channels, 16, 16)
    torch.testing.assert_close(x[:, 4, 2], torch.full((channels,), 2 * 1000 / 65535 - 1))
    torch.testing.assert_close(x[:, 4, 13], torch.ones(channels))
    assert x.min() >= -1 and x.max() <= 1


def test_a_data_loader_worker_error_is_reported_as_its_one_line_cause(tmp_path):
    from ddpm_lib.training import Trainer, default_config

    images = tmp_path / "images"
    _good_images(images, n=8)
    config = default_config(
        "folder", data_root=str(images), image_size=8, out=str(tmp_path / "r"), num_workers=1,
        batch_size=8, steps=3, sample_n=2, sample_steps=2, model_config=TINY_UNET,
    )  # fmt: skip
    trainer = Trainer(config, progress=False, log=None)
    (images / "good_3.png").unlink()  # gone after the check: a worker meets it mid-run
    with pytest.raises(Exception) as info:
        trainer.train()
    message = str(info.value)
    assert str(images / "good_3.png") in message and "\n" not in message, message
    assert "Traceback" not in message


def test_the_image_files_live_in_their_own_module_and_keep_their_old_names():
    # data.py split by concept (issue 13): the offline sets stay, reading images from disk moved
    # to image_sets, the cache folders to paths; every old name still imports from data.
    import ddpm_lib.data as data
    import ddpm_lib.image_sets as image_sets
    import ddpm_lib.paths as paths

    for name in ("DatasetNotFoundError", "ImageFolderDataset", "UnreadableImageError"):
        assert getattr(data, name) is getattr(image_sets, name)
    assert data.load_torchvision is image_sets.load_torchvision
    assert data.to_unit_range is image_sets.to_unit_range
    assert data.cache_root is paths.cache_root and data.default_data_root is paths.default_data_root
    assert set(data.__all__) <= set(dir(data))
