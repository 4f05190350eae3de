"""Pictures of what a model sees and predicts: coloured masks, overlays, panel grids and metric charts.

Pure functions. Images go in as ``H x W x 3`` uint8 arrays (or PIL images where noted) and come out as
uint8 arrays; grids and charts come out as PIL RGB images, ready to save or log. Label maps and float maps
may be numpy arrays or torch tensors (on any device). Charts are drawn by matplotlib on an Agg canvas,
so no display and no pyplot state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IGNORE_COLOR",
    "binary_map",
    "colorize",
    "colormap",
    "confusion_chart",
    "denormalize",
    "grid",
    "iou_chart",
    "legend",
    "overlay",
]

#: colour of every label without a palette entry (the ignore index, 255 or -1): white, since palettes
#: usually give class 0 (background) black
IGNORE_COLOR = (255, 255, 255)

Panel = np.ndarray | Image.Image


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def colorize(
    labels: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]], ignore_color: Sequence[int] = IGNORE_COLOR
) -> np.ndarray:
    """``H x W`` class ids -> ``H x W x 3`` colours: id ``i`` gets ``palette[i]``, any id outside the palette
    (the ignore index) gets ``ignore_color``."""
    labels = _numpy(labels).astype(np.int64)
    table = np.asarray([*palette, ignore_color], dtype=np.uint8).reshape(-1, 3)
    known = (labels >= 0) & (labels < len(table) - 1)
    return table[np.where(known, labels, len(table) - 1)]


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colors``, both ``H x W x 3`` uint8."""
    if image.shape != colors.shape:
        raise ValueError(f"overlay: image is {image.shape} but the colours are {colors.shape}")
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``3 x H x W`` image tensor back to ``H x W x 3`` uint8 RGB."""
    image = image.detach().float().cpu()
    rgb = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def colormap(values: np.ndarray | torch.Tensor, cmap: str = "viridis") -> np.ndarray:
    """A float ``H x W`` map in [0, 1] (confidence, weights; clipped) as ``H x W x 3`` colours of ``cmap``."""
    values = np.clip(_numpy(values).astype(np.float64), 0, 1)
    return (colormaps[cmap](values)[..., :3] * 255).round().astype(np.uint8)


def binary_map(
    mask: np.ndarray | torch.Tensor, color: Sequence[int] = (255, 255, 255), background: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """A boolean ``H x W`` map (e.g. dropped pixels) as ``H x W x 3``: ``color`` where true."""
    return np.where(_numpy(mask).astype(bool)[..., None], np.uint8(color), np.uint8(background)).astype(np.uint8)


def grid(
    rows: Sequence[Sequence[Panel]], titles: Sequence[str] | None = None, scale: int = 1, gap: int = 4
) -> Image.Image:
    """Panels in rows and columns on white, each column ``titles[j]`` at the top.

    ``scale`` enlarges every panel (nearest neighbour, so label maps stay crisp); a column is as wide as its
    widest panel and a row as high as its highest, smaller panels sit at the top left of their cell."""
    panels = [[Image.fromarray(p) if isinstance(p, np.ndarray) else p for p in row] for row in rows]
    if not panels or any(len(row) != len(panels[0]) for row in panels):
        raise ValueError(f"grid needs rows of equal length, got lengths {[len(row) for row in panels]}")
    if titles is not None and len(titles) != len(panels[0]):
        raise ValueError(f"grid has {len(panels[0])} columns but {len(titles)} titles")
    panels = [[p.convert("RGB").resize((p.width * scale, p.height * scale), Image.NEAREST) for p in row]
              for row in panels]  # fmt: skip
    widths = [max(row[j].width for row in panels) for j in range(len(panels[0]))]
    heights = [max(p.height for p in row) for row in panels]
    font = ImageFont.load_default(size=14)
    title_height = 0 if titles is None else max(font.getbbox(t)[3] for t in titles) + gap
    canvas = Image.new(
        "RGB", (sum(widths) + gap * (len(widths) + 1), title_height + sum(heights) + gap * (len(heights) + 1)),
        "white",
    )  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    left = np.cumsum([gap] + [w + gap for w in widths])
    top = np.cumsum([title_height + gap] + [h + gap for h in heights])
    for j, title in enumerate(titles or []):
        draw.text((left[j] + widths[j] / 2, gap), title, fill="black", font=font, anchor="ma")
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            canvas.paste(panel, (int(left[j]), int(top[i])))
    return canvas


def legend(class_names: Sequence[str], palette: Sequence[Sequence[int]], columns: int | None = None) -> Image.Image:
    """A colour swatch and the name of every class, ``columns`` to a line (default: all on one)."""
    font = ImageFont.load_default(size=14)
    columns = columns or len(class_names)
    line, swatch = 22, 14
    cell = swatch + 6 + max(int(font.getlength(name)) for name in class_names) + 16
    image = Image.new("RGB", (cell * columns, line * math.ceil(len(class_names) / columns)), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, color) in enumerate(zip(class_names, palette, strict=False)):
        x, y = (k % columns) * cell + 4, (k // columns) * line + (line - swatch) // 2
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(color), outline="grey")
        draw.text((x + swatch + 6, y + swatch / 2), name, fill="black", font=font, anchor="lm")
    return image


def _render(figure: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def iou_chart(
    iou: Sequence[float] | np.ndarray | torch.Tensor, class_names: Sequence[str], title: str = "IoU per class"
) -> Image.Image:
    """Bars of per-class IoU in [0, 1], the mean as a dashed line and in the title; NaN (a class in neither truth nor
    prediction) is drawn as "n/a" and left out of the mean."""
    iou = _numpy(iou).astype(np.float64)
    if len(iou) != len(class_names):
        raise ValueError(f"iou_chart: {len(iou)} IoU values for {len(class_names)} class names")
    figure = Figure(figsize=(max(4.0, 1.5 + 0.45 * len(iou)), 3.2), dpi=100, layout="tight")
    axes = figure.add_subplot()
    positions = np.arange(len(iou))
    axes.bar(positions, np.nan_to_num(iou), color="tab:blue")
    for x, value in zip(positions, iou, strict=True):
        axes.text(x, (0 if np.isnan(value) else value) + 0.01, "n/a" if np.isnan(value) else f"{value:.0%}",
                  ha="center", va="bottom", fontsize=8)  # fmt: skip
    if not np.isnan(iou).all():
        mean = np.nanmean(iou)
        axes.axhline(mean, color="tab:red", linestyle="--", linewidth=1)
        title = f"{title} (mean {mean:.1%})"
    axes.set_xticks(positions, class_names, rotation=45, ha="right")
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("IoU")
    axes.set_title(title)
    return _render(figure)


def confusion_chart(
    confusion: np.ndarray | torch.Tensor, class_names: Sequence[str], title: str = "confusion (rows sum to 1)"
) -> Image.Image:
    """A heatmap of the confusion matrix (rows: truth, columns: prediction), each row divided by its sum
    (a class absent from the truth leaves an empty row); cells are annotated up to 12 classes."""
    counts = _numpy(confusion).astype(np.float64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion_chart: a {counts.shape} matrix for {len(class_names)} class names")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = max(4.0, 2.0 + 0.4 * len(class_names))
    figure = Figure(figsize=(side + 1, side), dpi=100, layout="tight")
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("prediction")
    axes.set_ylabel("truth")
    axes.set_title(title)
    if len(class_names) <= 12:
        for (i, j), value in np.ndenumerate(rates):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")  # fmt: skip
    return _render(figure)
