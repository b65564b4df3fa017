"""Figures and animations for the book: image grids, point clouds, and jshtml animations that play
in the HTML page without a kernel.

Explained where used; nothing here does maths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from matplotlib.axes import Axes


def setup_style(dpi: int = 80) -> None:
    """Modest figure sizes and resolution: committed notebooks stay small."""
    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.figsize": (6, 3.5),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "animation.embed_limit": 8.0,  # MB
        }
    )


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images in [-1, 1] of shape (N, C, H, W) into one array in [0, 1], (rows, cols[, C]).

    Args:
        images: the images, values in [-1, 1].
        nrow: images per row; defaults to about sqrt(N).
        pad: pixels of background between images.
    """
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    grid = np.ones((c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)


def show_images(
    images: torch.Tensor,
    nrow: int | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Show a grid of images in [-1, 1] (grey for one channel)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def scatter(
    points: torch.Tensor,
    ax: Axes | None = None,
    title: str | None = None,
    lim: float = 1.5,
    **kwargs,
) -> Axes:
    """A 2-D point cloud, equal aspect, fixed limits so that panels compare."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    p = points.detach().float().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=kwargs.pop("s", 2), alpha=kwargs.pop("alpha", 0.5), **kwargs)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def animate_images(
    frames: Sequence[torch.Tensor],
    titles: Sequence[str] | None = None,
    interval: int = 200,
    nrow: int | None = None,
    size: float = 3.0,
) -> str:
    """An HTML/JS animation (``to_jshtml``) of image grids; plays in the page with no kernel.

    Args:
        frames: each a batch (N, C, H, W) in [-1, 1]; keep them few (about 10 to 20).
        titles: one title per frame.
        interval: milliseconds between frames.
        nrow: images per row.
        size: figure size in inches.
    """
    fig, ax = plt.subplots(figsize=(size, size))
    ax.set_axis_off()
    shown = ax.imshow(
        image_grid(frames[0], nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )

    def draw(i):
        shown.set_data(image_grid(frames[i], nrow))

    return _jshtml(fig, ax, draw, len(frames), titles, interval)


def animate_points(
    frames: Sequence[torch.Tensor],
    titles: Sequence[str] | None = None,
    interval: int = 200,
    lim: float = 1.5,
    size: float = 3.5,
) -> str:
    """An HTML/JS animation of 2-D point clouds (each frame (N, 2)); plays with no kernel."""
    fig, ax = plt.subplots(figsize=(size, size))
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    first = frames[0].detach().float().cpu().numpy()
    dots = ax.scatter(first[:, 0], first[:, 1], s=2, alpha=0.5)

    def draw(i):
        dots.set_offsets(frames[i].detach().float().cpu().numpy())

    return _jshtml(fig, ax, draw, len(frames), titles, interval)


def _jshtml(fig, ax, draw, n_frames: int, titles, interval: int) -> str:
    """Render ``draw(i)`` for every frame into a self-contained HTML/JS player; close the figure."""

    def frame(i):
        draw(i)
        if titles:
            ax.set_title(titles[i])

    anim = animation.FuncAnimation(fig, frame, frames=n_frames, interval=interval, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return html
