"""SyntheticShapes: a small generated dataset that needs no download, built so that unlabeled images help.

Each image shows a few shapes on a muted, cluttered background; a pixel's class is the object covering it
(disc, ring, square, triangle, cross) or background. Every class has its own shape and a hue family; the
families' centres lie 0.2 apart on the hue circle and an object's hue spreads around its family's by
``hue_jitter`` (0.03: three spreads apart, so colour separates the classes, as the two moons of the
semi-supervised literature separate theirs). Everything else varies freely: a colour cast per image,
saturation and brightness, scale, rotation, aspect and occlusion of the objects, background textures,
distractor strokes (lines and arcs that look like pieces of rings), blur and noise. Twenty labeled images
sample that variation sparsely; unlabeled images fill it in, and because the classes stay separable, a
teacher's pseudo-labels on them are mostly right. With overlapping families (``hue_jitter=0.07``) colour
is ambiguous in the tails and the first pseudo-labels swap classes about three times as often
(scripts/pseudo_label_quality.py). At 64x64 a few hundred images train a segmentation network from
scratch on a CPU in minutes."""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gta.errors import ConfigError, OccupiedPathError

from .source import Sample, SegmentationSource, fixed_labels

__all__ = ["SyntheticShapes", "render_scene"]

# Bump when the rendering changes, so existing caches are regenerated instead of silently reused.
GENERATOR_VERSION = 4

# Probabilities of flat, gradient, stripes and blotches, for the background.
BACKGROUND_TEXTURES = (0.3, 0.4, 0.15, 0.15)
#: default spread (standard deviation) of an object's hue around its class hue, the class hues being 0.2
#: apart: at 0.03 the families are separated by about three spreads, at 0.07 their tails overlap
HUE_JITTER = 0.03


def _class_colour(rng: np.random.Generator, cls: int, num_classes: int, jitter: float) -> np.ndarray:
    """A saturated RGB colour from class ``cls``'s hue family (hues evenly spaced, jittered)."""
    hue = ((cls - 1) / (num_classes - 1) + rng.normal(0, jitter)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    return np.array(rgb, dtype=np.float32) * 255


def _object_texture(rng: np.random.Generator, cls: int, num_classes: int, size: int, jitter: float) -> np.ndarray:
    """Flat or a gradient between two colours of the class's hue family."""
    a, b = _class_colour(rng, cls, num_classes, jitter), _class_colour(rng, cls, num_classes, jitter)
    if rng.random() < 0.5:
        return np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    return (a + (b - a) * t[..., None]).astype(np.float32)


_POOLS = (  # (list file, id prefix, seed stream): separate streams keep each pool stable when others resize
    ("labeled_pool", "lab", 0),
    ("unlabeled", "unl", 1),
    ("val", "val", 2),
)


def _texture(rng: np.random.Generator, size: int, kinds: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)) -> np.ndarray:
    """A random ``size x size x 3`` float colour field: flat, gradient, stripes or blotches, drawn with
    probabilities ``kinds``."""
    base = rng.uniform(0, 255, 3)
    other = rng.uniform(0, 255, 3)
    kind = rng.choice(4, p=kinds)
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == 3:  # blotches: bicubic upsampling of a coarse random grid
        coarse = rng.uniform(0, 1, (rng.integers(2, 6), rng.integers(2, 6))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = rng.uniform(0, 2 * math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        if kind == 1:  # linear gradient
            t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
        else:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2, 8) * u + rng.uniform(0, 2 * math.pi))
    return (base + (other - base) * np.clip(t, 0, 1)[..., None]).astype(np.float32)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return _place(np.stack([rx * np.cos(t), ry * np.sin(t)], 1), cx, cy, angle)


def _place(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotate shape-local points by ``angle`` and move them to ``(cx, cy)``."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _fill(size: int, polygon: np.ndarray) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Boolean footprint of one object of class ``cls`` (1 disc, 2 ring, 3 square, 4 triangle, 5 cross)."""
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    r = rng.uniform(0.15, 0.32) * size
    angle = rng.uniform(0, 2 * math.pi)
    if cls in (1, 2):
        aspect = rng.uniform(0.75, 1.0)
        footprint = _fill(size, _ellipse(cx, cy, r, r * aspect, angle))
        if cls == 2:  # the hole shows whatever lies underneath, so it keeps that label
            k = rng.uniform(0.45, 0.65)
            footprint &= ~_fill(size, _ellipse(cx, cy, r * k, r * aspect * k, angle))
        return footprint
    if cls == 3:
        hx = 0.85 * r
        hy = hx * rng.uniform(0.8, 1.0)
        return _fill(size, _place(np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]]), cx, cy, angle))
    if cls == 4:
        t = np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        radii = r * rng.uniform(0.9, 1.15, 3)
        return _fill(size, _place(np.stack([radii * np.cos(t), radii * np.sin(t)], 1), cx, cy, angle))
    if cls == 5:
        a, w = r, r * rng.uniform(0.28, 0.42)
        arms = [[w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w],
                [-w, -a], [w, -a]]  # fmt: skip
        return _fill(size, _place(np.array(arms, dtype=float), cx, cy, angle))
    raise ValueError(f"unknown shape class {cls}")


def _distractors(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Thin background strokes: straight lines and arcs (pieces of rings that are not rings)."""
    draw = ImageDraw.Draw(canvas)
    size = canvas.width
    for _ in range(rng.integers(0, 3)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            draw.line([tuple(p) for p in (rng.uniform(0, size, (2, 2))).tolist()], fill=colour, width=width)
        else:
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.1, 0.3) * size
            start = rng.uniform(0, 360)
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r],
                start,
                start + rng.uniform(60, 200),
                fill=colour,
                width=width,
            )


def render_scene(
    rng: np.random.Generator, size: int, num_classes: int = 6, first_class: int | None = None,
    hue_jitter: float = HUE_JITTER,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 HxWx3, label uint8 HxW)`` pair; ``first_class`` forces the first object's class
    (used to cycle through the classes so even a tiny dataset contains all of them)."""
    background = _texture(rng, size, BACKGROUND_TEXTURES)
    grey = background.mean(axis=2, keepdims=True)
    background = grey + rng.uniform(0.1, 0.4) * (background - grey)  # muted, so objects stand out
    canvas = Image.fromarray(background.astype(np.uint8))
    _distractors(rng, canvas)
    image = np.asarray(canvas, dtype=np.float32).copy()
    label = np.zeros((size, size), dtype=np.uint8)
    for index in range(rng.integers(1, 4)):
        cls = first_class if index == 0 and first_class is not None else int(rng.integers(1, num_classes))
        footprint = _shape_mask(rng, cls, size)
        if not footprint.any():
            continue
        texture = _object_texture(rng, cls, num_classes, size, hue_jitter)
        image[footprint] = texture[footprint]
        label[footprint] = cls
    image = image * rng.uniform(0.8, 1.2, 3)  # a colour cast per image shifts every hue a little
    blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), (size, size, 3))
    return np.clip(noisy, 0, 255).round().astype(np.uint8), label


class SyntheticShapes(SegmentationSource):
    """Generated shapes dataset, cached under ``root`` on first use.

    Layout: ``images/<id>.png``, ``masks/<id>.png`` (palette PNGs of class ids), ``lists/{labeled_pool,
    unlabeled,val}.txt`` and ``meta.json`` (all generation parameters; a mismatch triggers regeneration).
    Generation is deterministic in ``seed`` and publishes the finished directory with one atomic rename,
    so interrupted or concurrent generators never leave or read a half-written dataset.
    """

    num_classes = 6
    class_names = ["background", "disc", "ring", "square", "triangle", "cross"]

    def __init__(
        self,
        root: str | Path,
        num_labeled_pool: int = 200,
        num_unlabeled: int = 300,
        num_val: int = 100,
        image_size: int = 64,
        seed: int = 0,
        hue_jitter: float = HUE_JITTER,
        crop_size: int | None = None,
        scale_range: Sequence[float] = (0.75, 1.5),
        **source_kwargs,
    ) -> None:
        """Crops of ``crop_size`` (None: ``image_size``, whole images) after a mild rescaling: at 64 px a 0.5x
        scale shrinks the smallest shapes to a few pixels and turns most of the crop into padding."""
        source_kwargs = fixed_labels(
            "SyntheticShapes", source_kwargs, num_classes=type(self).num_classes,
            class_names=list(type(self).class_names),
        )
        if min(num_labeled_pool, num_val) < 1 or num_unlabeled < 0:
            raise ConfigError("SyntheticShapes needs num_labeled_pool >= 1, num_val >= 1, num_unlabeled >= 0")
        if image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {image_size}")
        if not 0 <= hue_jitter <= 0.5:
            raise ConfigError(f"dataset.hue_jitter must lie in [0, 0.5] (a fraction of the hue circle), got {hue_jitter}")
        crop_size = image_size if crop_size is None else crop_size
        super().__init__(root, crop_size=crop_size, scale_range=scale_range, **source_kwargs)
        self.params = {
            "dataset": "SyntheticShapes",
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "image_size": int(image_size),
            "num_labeled_pool": int(num_labeled_pool),
            "num_unlabeled": int(num_unlabeled),
            "num_val": int(num_val),
            "hue_jitter": float(hue_jitter),
            "class_names": list(self.class_names),
        }
        self._pools: dict[str, list[Sample]] | None = None

    def pools(self) -> dict[str, list[Sample]]:
        if self._pools is None:
            self.ensure_generated()
            lists = {}
            for name, _, _ in _POOLS:
                ids = (self.root / "lists" / f"{name}.txt").read_text().split()
                lists[name] = [
                    Sample(i, self.root / "images" / f"{i}.png", self.root / "masks" / f"{i}.png")
                    for i in ids
                ]
            self._pools = {
                "labeled": lists["labeled_pool"],
                "unlabeled": lists["unlabeled"],
                "val": lists["val"],
            }
        return self._pools

    def is_generated(self, directory: Path | None = None) -> bool:
        """Whether ``directory`` (default ``root``) holds a finished dataset with exactly these parameters."""
        try:
            return _read_meta(directory or self.root) == self.params
        except (OSError, ValueError):
            return False

    def ensure_generated(self) -> None:
        """Generate the dataset into a temporary sibling of ``root`` and rename it into place, unless
        ``root`` already holds it."""
        if self.is_generated():
            return
        if self.root.exists() and not _is_replaceable(self.root):
            raise OccupiedPathError(
                f"{self.root} exists and is not a SyntheticShapes cache; refusing to overwrite it. "
                "Point the dataset root at an empty or new directory."
            )
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.tmp-", dir=self.root.parent))
        try:
            self._generate_into(tmp)
            self._publish(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _generate_into(self, out: Path) -> None:
        for sub in ("images", "masks", "lists"):
            (out / sub).mkdir()
        size = self.params["image_size"]
        flat_palette = [v for colour in self.palette for v in colour]
        counts = {
            "labeled_pool": self.params["num_labeled_pool"],
            "unlabeled": self.params["num_unlabeled"],
            "val": self.params["num_val"],
        }
        for name, prefix, stream in _POOLS:
            ids = [f"{prefix}_{i:05d}" for i in range(counts[name])]
            for i, sample_id in enumerate(ids):
                rng = np.random.default_rng([self.params["seed"], stream, i])
                first = 1 + i % (self.num_classes - 1)
                image, label = render_scene(rng, size, self.num_classes, first, self.params["hue_jitter"])
                Image.fromarray(image).save(out / "images" / f"{sample_id}.png")
                mask = Image.fromarray(label)
                mask.putpalette(flat_palette)  # mode "P": class ids that image viewers show in colour
                mask.save(out / "masks" / f"{sample_id}.png")
            (out / "lists" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        # meta.json last: its presence marks a complete dataset.
        (out / "meta.json").write_text(json.dumps(self.params, indent=2, sort_keys=True) + "\n")

    def _publish(self, tmp: Path) -> None:
        for _ in range(5):
            try:
                os.rename(tmp, self.root)  # atomic; fails if root exists and is not empty
                return
            except OSError:
                if self.is_generated():
                    return  # a concurrent generator got there first
            if not _is_replaceable(self.root):
                raise OccupiedPathError(f"{self.root} appeared and is not a SyntheticShapes cache")
            # A stale cache (other parameters): move it out of the way atomically, then retry.
            graveyard = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.old-", dir=self.root.parent))
            try:
                os.rename(self.root, graveyard / "old")
            except FileNotFoundError:
                pass  # someone else moved it already
            finally:
                shutil.rmtree(graveyard, ignore_errors=True)
        raise RuntimeError(f"Could not publish the generated dataset to {self.root} (concurrent writers?)")


def _read_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def _is_replaceable(path: Path) -> bool:
    """Only an empty directory or an earlier SyntheticShapes cache may be replaced."""
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        return _read_meta(path).get("dataset") == "SyntheticShapes"
    except (OSError, ValueError, AttributeError):
        return False
