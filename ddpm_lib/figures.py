"""Sample figures written to files: a grid of images (``torchvision.utils.make_grid``) or a scatter
plot of 2-D points. No pyplot here: a notebook's plotting backend is left alone."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ddpm_lib.samplers import sample
from ddpm_lib.schedule import NoiseSchedule

FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".gif", ".pdf")


def tile_images(
    images: torch.Tensor, nrow: int | None = None, pad: int = 1, background: float = 1.0
) -> torch.Tensor:
    """Tile images in [-1, 1] of shape (N, C, H, W) into one (C, rows, cols) tensor in [0, 1].

    Args:
        images: the images, values in [-1, 1] (clamped).
        nrow: images per row; defaults to about sqrt(N).
        pad: pixels of ``background`` around and between images.
        background: the value of the padding, in [0, 1] (1: white).
    """
    # torchvision takes about 1.6 s to import (it loads torch._dynamo): only image grids need it,
    # not `ddpm info`, `ddpm bpd` or a run of 2-D points.
    from torchvision.utils import make_grid

    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1]
    n, c = x.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    if n < nrow:  # make_grid narrows a short row to its images: fill it with background
        x = torch.cat([x, x.new_full((nrow - n, *x.shape[1:]), background)])
    grid = make_grid(x, nrow=nrow, padding=pad, pad_value=background)
    return grid[:c]  # make_grid repeats a single channel three times: (3, H, W) -> (1, H, W)


def save_sample_figure(x: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """A grid of images (``nrow`` a row, default about sqrt(N)), or a scatter plot of 2-D points,
    written to ``path`` (its extension, one of ``FIGURE_FORMATS``, picks the format)."""
    if x.ndim == 4:
        from torchvision.utils import save_image  # a slow import (see tile_images)

        nrow = nrow or max(1, int(math.sqrt(x.shape[0])))
        save_image(tile_images(x, nrow=nrow, background=0.0), path)
        return
    fig = Figure(figsize=(4, 4), dpi=80)  # a bare Figure with its own Agg canvas: no pyplot
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6)
    ax.set_aspect("equal")
    fig.savefig(path, bbox_inches="tight")


def write_sample_figure(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    path: Path,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    classes: int | None = None,
) -> None:
    """Sample ``shape`` from ``model`` with ``steps`` DDIM steps (seeded) and save the figure.

    A conditional model (``classes`` = K) samples the classes 0, 1, ..., K-1, 0, 1, ... in turn,
    so that each column of an image grid holds one class; a 2-D scatter shows them mixed."""
    generator = torch.Generator(device).manual_seed(seed)
    labels = None if classes is None else torch.arange(shape[0], device=device) % classes
    x = sample(model, schedule, shape, sampler="ddim", steps=steps, generator=generator,
               device=device, progress=False, labels=labels)  # fmt: skip
    save_sample_figure(x.float().cpu(), path, nrow=classes)
