"""The book's plotting helpers: grids tile correctly, animations are self-contained HTML."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ddpm_lib.plotting import animate_images, animate_points, image_grid


def test_image_grid_tiles_images_in_place():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])  # (3, 1, 2, 2)
    grid = image_grid(images, nrow=2, pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert np.allclose(grid[1:3, 1:3], 0.0)  # -1 -> 0
    assert np.allclose(grid[1:3, 4:6], 0.5)  # 0 -> 0.5
    assert np.allclose(grid[4:6, 1:3], 1.0)  # 1 -> 1
    colour = image_grid(torch.zeros(4, 3, 5, 5))
    assert colour.shape == (2 * 6 + 1, 2 * 6 + 1, 3)


def test_a_short_row_keeps_its_width_and_the_files_share_the_tiling(tmp_path):
    from PIL import Image

    from ddpm_lib.figures import save_sample_figure, tile_images

    grid = image_grid(torch.zeros(2, 1, 3, 3), nrow=5)  # fewer images than a row holds
    assert grid.shape == (3 + 2, 5 * 4 + 1) and np.all(grid[:, 9:] == 1.0)  # white beyond
    images = torch.rand(9, 1, 4, 4) * 2 - 1
    save_sample_figure(images, tmp_path / "grid.png")  # the trainer's grid: black padding
    saved = np.asarray(Image.open(tmp_path / "grid.png").convert("L"), dtype=np.float32) / 255
    expected = tile_images(images, nrow=3, background=0.0)[0].numpy()
    assert saved.shape == expected.shape and np.abs(saved - expected).max() <= 1 / 255 + 1e-6


def test_animations_are_one_self_contained_player_each():
    html = animate_images([torch.rand(4, 1, 8, 8) * 2 - 1 for _ in range(3)], titles=list("abc"))
    assert html.count('class="animation"') == 1 and "data:image/png;base64" in html
    html = animate_points([torch.randn(20, 2) for _ in range(3)])
    assert html.count('class="animation"') == 1


def test_animation_players_need_nothing_from_the_network():
    html = animate_points([torch.randn(20, 2) for _ in range(2)])
    assert "http://" not in html and "https://" not in html
    assert 'class="fa' not in html  # every button has a text symbol instead of an icon font
    assert html.count("<button") == 9 and "\u25b6" in html


def test_claims_table_has_a_verdict_column_and_refuses_other_verdicts():
    from ddpm_lib.plotting import claims_table

    table = claims_table(
        [
            ("a | b", "sec", "0.5", "holds"),
            ("c", "sec", "1", "Holds with a qualification: only at 50 steps"),
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| The article says | Checked in | What we found | Verdict |"
    assert lines[2] == "| a \\| b | sec | 0.5 | holds |" and len(lines) == 4
    with pytest.raises(ValueError, match=r"rows\[0\] verdict must be one of"):
        claims_table([("c", "sec", "1", "mostly true")])
    with pytest.raises(ValueError, match=r"rows\[0\] must have 4 cells"):
        claims_table([("c", "sec", "1")])


def test_image_rows_keep_one_size_per_image_pixel_and_a_title_each():
    from ddpm_lib.plotting import IMAGE_PIXEL, show_image_rows

    batches = [("first", torch.zeros(30, 1, 8, 8)), ("second", torch.ones(30, 1, 8, 8))]
    fig = show_image_rows(batches, ncol=12, nrow=2)
    try:
        width_inches = fig.get_size_inches()[0]
        for ax, (title, _) in zip(fig.axes, batches, strict=True):
            assert ax.get_title() == title
            shown = ax.get_images()[0].get_array().shape  # (rows, cols) of the tiled grid
            assert shown == (2 * 9 + 1, 12 * 9 + 1)  # only ncol x nrow images, 1 px apart
            box = ax.get_position()  # in figure fractions
            assert box.width * width_inches == pytest.approx(shown[1] * IMAGE_PIXEL, rel=1e-6)
            assert box.height * fig.get_size_inches()[1] == pytest.approx(
                shown[0] * IMAGE_PIXEL, rel=1e-6
            )
    finally:
        plt.close(fig)
