"""gta.engine.visualize: coloured masks, overlays, grids and charts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gta.data import voc_palette
from gta.engine.visualize import (
    IGNORE_COLOR,
    binary_map,
    colorize,
    colormap,
    confusion_chart,
    denormalize,
    grid,
    iou_chart,
    legend,
    overlay,
)

PALETTE = voc_palette(6)
NAMES = ["background", "disc", "ring", "square", "triangle", "cross"]


def test_colorize_round_trips_palette_ids_and_paints_ignore_neutral():
    labels = torch.arange(6).repeat(5, 2)  # 5 x 12, every class twice per row
    labels[0, 0] = 255
    colors = colorize(labels, PALETTE)
    assert colors.shape == (5, 12, 3) and colors.dtype == np.uint8
    assert tuple(colors[0, 0]) == IGNORE_COLOR
    lookup = {tuple(c): i for i, c in enumerate(PALETTE)}
    ids = np.array([[lookup.get(tuple(c), 255) for c in row] for row in colors])
    assert np.array_equal(ids, labels.numpy())
    assert tuple(colorize(np.array([[-1]]), PALETTE)[0, 0]) == IGNORE_COLOR


def test_overlay_blends_and_denormalize_inverts_normalisation():
    image = np.full((4, 6, 3), 200, np.uint8)
    colors = np.zeros((4, 6, 3), np.uint8)
    assert (overlay(image, colors, alpha=0.25) == 150).all()
    with pytest.raises(ValueError, match="overlay"):
        overlay(image, colors[:3])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8)
    normalised = (rgb / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert np.array_equal(denormalize(normalised, mean, std), rgb.permute(1, 2, 0).numpy())


def test_float_and_boolean_maps():
    values = torch.linspace(-0.5, 1.5, 12).view(3, 4)  # clipped to [0, 1]
    colors = colormap(values)
    assert colors.shape == (3, 4, 3) and colors.dtype == np.uint8
    assert np.array_equal(colors[0, 0], colors[0, 1]) and not np.array_equal(colors[0, 0], colors[2, 3])
    mask = np.eye(3, dtype=bool)
    assert np.array_equal(binary_map(mask)[..., 0], mask * 255)


def test_grid_size_counts_panels_titles_and_gaps():
    image = np.zeros((20, 30, 3), np.uint8)
    rows = [[image, Image.new("RGB", (30, 20)), image] for _ in range(2)]
    plain = grid(rows, gap=4)
    assert plain.size == (3 * 30 + 4 * 4, 2 * 20 + 3 * 4)
    titled = grid(rows, ["image", "ground truth", "teacher"], scale=2, gap=4)
    assert titled.width == 3 * 60 + 4 * 4 and titled.height > 2 * 40 + 3 * 4
    with pytest.raises(ValueError, match="3 columns but 2 titles"):
        grid(rows, ["image", "truth"])


def test_legend_shows_every_class_colour():
    one_line = np.asarray(legend(NAMES, PALETTE))
    for color in PALETTE[1:]:  # the swatches (black is also the text)
        assert (one_line == color).all(axis=-1).any()
    wrapped = legend(NAMES, PALETTE, columns=4)
    assert wrapped.height == 2 * one_line.shape[0] and wrapped.width < one_line.shape[1]


@pytest.mark.parametrize("num_classes", [6, 21])
def test_charts_are_images_of_sensible_size(num_classes):
    names = NAMES if num_classes == 6 else [f"class_{i}" for i in range(num_classes)]
    iou = torch.rand(num_classes, dtype=torch.float64)
    iou[1] = float("nan")
    confusion = torch.randint(0, 50, (num_classes, num_classes))
    confusion[2] = 0  # a class absent from the truth
    for chart in (iou_chart(iou, names), confusion_chart(confusion, names)):
        assert chart.mode == "RGB" and 300 <= chart.width <= 1600 and 250 <= chart.height <= 1200
        pixels = np.asarray(chart)
        assert (pixels < 128).any() and (pixels == 255).any()  # something drawn on a white page
    with pytest.raises(ValueError, match="3 class names"):
        iou_chart(iou, names[:3])
