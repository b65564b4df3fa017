"""Figures and animations for the book: image grids, point clouds, jshtml animations that play
in the HTML page without a kernel, and the claims table that closes each chapter.

Explained where used; nothing here does maths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from matplotlib.axes import Axes

from ddpm_lib.figures import tile_images

# Figures are drawn at twice the 72 dpi of a CSS pixel: sharp on high-density screens. A figure
# at most PAGE_WIDTH inches wide shows in the book's column scaled by no less than about 0.6, so the
# 11 pt text of the style below still reads at 9 pt or more.
PAGE_DPI = 144
PAGE_WIDTH = 8.5  # inches
# One image pixel of a digit grid drawn by `show_images` is 8 device pixels: an 8x8 digit is 64 px.
IMAGE_PIXEL = 8 / PAGE_DPI  # inches


def setup_style(dpi: int = PAGE_DPI) -> None:
    """Sharp figures with legible text at the book's column width."""
    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.figsize": (6.4, 3.6),
            "font.size": 11,
            "axes.titlesize": 11,
            "axes.labelsize": 11,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 10,
            "lines.linewidth": 1.8,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "image.interpolation": "nearest",
            "animation.embed_limit": 8.0,  # MB
        }
    )


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images in [-1, 1] of shape (N, C, H, W) into one array in [0, 1], (rows, cols[, C]).

    Args:
        images: the images, values in [-1, 1].
        nrow: images per row; defaults to about sqrt(N).
        pad: pixels of background (white) between images.
    """
    grid = tile_images(images, nrow, pad).numpy()
    return grid[0] if grid.shape[0] == 1 else grid.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)


def show_images(
    images: torch.Tensor,
    nrow: int | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Show a grid of images in [-1, 1] (grey for one channel).

    Without ``ax`` the figure is sized so that one image pixel is ``IMAGE_PIXEL`` inches (an
    8x8 digit shows 64 pixels wide), shrunk only where the grid would not fit ``PAGE_WIDTH``.
    """
    grid = image_grid(images, nrow)
    if ax is None:
        height, width = grid.shape[:2]
        inches = min(IMAGE_PIXEL, PAGE_WIDTH / width)
        title_inches = 0.35 if title else 0.0
        fig = plt.figure(figsize=(width * inches, height * inches + title_inches))
        # The grid fills the figure (no subplot margins), so one pixel is `inches` wide.
        ax = fig.add_axes((0, 0, 1, height * inches / (height * inches + title_inches)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_image_rows(
    batches: Sequence[tuple[str, torch.Tensor]], ncol: int = 12, nrow: int = 1
) -> plt.Figure:
    """Each ``(title, images)`` as a titled grid of ``ncol`` x ``nrow`` images, one under another.

    Every grid keeps ``IMAGE_PIXEL`` inches per image pixel, so rows of samples from different
    settings compare at the same size.
    """
    first = batches[0][1]
    width = (ncol * (first.shape[-1] + 1) + 1) * IMAGE_PIXEL
    height = (nrow * (first.shape[-2] + 1) + 1) * IMAGE_PIXEL
    title, gap = 0.4, 0.45  # inches above each grid
    total = len(batches) * height + (len(batches) - 1) * gap + title + 0.05
    fig, axes = plt.subplots(len(batches), 1, figsize=(width, total), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], batches, strict=True):
        show_images(images[: ncol * nrow], nrow=ncol, ax=ax, title=name)
    fig.subplots_adjust(
        left=0, right=1, bottom=0.05 / total, top=1 - title / total, hspace=gap / height
    )
    return fig


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
    return _offline_controls(html)


# matplotlib's player draws its buttons with Font Awesome 4 from a CDN: offline they would be
# blank. Plain-text symbols instead, so the page needs nothing from the network.
_BUTTON_SYMBOLS = {
    "fa fa-minus": "\u2212",
    "fa fa-fast-backward": "|\u25c0\u25c0",
    "fa fa-step-backward": "|\u25c0",
    "fa fa-play fa-flip-horizontal": "\u25c0",
    "fa fa-pause": "\u275a\u275a",
    "fa fa-play": "\u25b6",
    "fa fa-step-forward": "\u25b6|",
    "fa fa-fast-forward": "\u25b6\u25b6|",
    "fa fa-plus": "+",
}
_FONT_AWESOME = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">')


def _offline_controls(html: str) -> str:
    """Drop the player's Font Awesome stylesheet link and write its button icons as text."""
    html = _FONT_AWESOME.sub("", html)
    for icon, symbol in _BUTTON_SYMBOLS.items():
        html = html.replace(f'<i class="{icon}"></i>', symbol)
    return html


VERDICTS = ("holds", "holds with a qualification", "not reproduced here")


def claims_table(rows: Sequence[Sequence[str]], header: str = "The article says") -> str:
    """The table that closes a chapter, as Markdown: claim, where checked, what we found, verdict.

    Args:
        rows: ``(claim, checked_in, found, verdict)`` each; ``verdict`` starts with one of
            ``VERDICTS`` and may go on after a colon ("holds with a qualification: at 50 steps").
        header: the first column's title ("The article says"; "The claim" for claims of ours).
    """
    lines = [f"| {header} | Checked in | What we found | Verdict |", "|---|---|---|---|"]
    for i, row in enumerate(rows):
        if len(row) != 4:
            raise ValueError(f"rows[{i}] must have 4 cells (claim, checked in, found, verdict)")
        verdict = row[3].strip().lower()
        if not any(verdict == v or verdict.startswith(v + ":") for v in VERDICTS):
            raise ValueError(
                f"rows[{i}] verdict must be one of {VERDICTS} (optionally followed by ': why'), "
                f"got {row[3]!r}"
            )
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
