"""The ``predict`` command: segment your own images with a trained model.

``python -m gta predict checkpoint=<run_dir>/teacher.pt input=photos/ output=predictions/`` rebuilds the
network from the run's ``config.yaml`` (as ``eval`` does), runs it on every whole image (any size; greyscale,
palette and RGBA images are converted to RGB) and writes, per image, ``<stem>.png`` (a palette PNG whose
pixel values are class ids, coloured with the dataset's palette) and ``<stem>_overlay.jpg`` (the prediction
blended over the image). A directory is read without its sub-directories unless ``recursive=true``, which
mirrors the sub-directories under ``output``. Files that are not images are skipped with a warning; hidden
files (names starting with ".") are ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision import tv_tensors
from tqdm.auto import tqdm

from gta.data import eval_transform
from gta.engine.runtime import resolve_device
from gta.engine.visualize import colorize, overlay
from gta.errors import ConfigError, DataError, MissingPathError
from gta.saved import load_model


def find_inputs(path: Path, recursive: bool, output: Path) -> dict[Path, Path]:
    """``{input file: where its outputs go, less the suffixes}``: the file itself, or the directory's files
    in order (none from under ``output``, so a re-run does not segment its own results)."""
    if path.is_file():
        return {path: output / path.stem}
    if not path.is_dir():
        raise MissingPathError(f"input: no file or directory at {path}")
    results = output.resolve()
    if results == path.resolve():
        raise ConfigError(f"output={output} is the input directory: the masks could overwrite images there")
    sources: dict[Path, Path] = {}  # output -> input
    for file in sorted(path.rglob("*") if recursive else path.iterdir()):
        relative = file.relative_to(path)
        hidden = any(part.startswith(".") for part in relative.parts)
        if file.is_file() and not hidden and results not in file.resolve().parents:
            target = output / relative.parent / file.stem
            if target in sources:
                raise ConfigError(f"input: {sources[target]} and {file} would both be written to {target}.png")
            sources[target] = file
    return {file: target for target, file in sources.items()}


def read_rgb(path: Path) -> Image.Image | None:
    """The image at ``path`` as RGB, or None (with a warning naming the file) if PIL cannot read it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports unreadable files in all three ways
        warnings.warn(f"{path} skipped: not an image PIL can read ({err})", stacklevel=2)
        return None


def run(cfg: DictConfig) -> int:
    """Write a mask and an overlay for every image under ``cfg.input``; returns how many were written."""
    inputs = Path(cfg.input).expanduser()
    output = Path(cfg.output).expanduser()
    files = find_inputs(inputs, cfg.recursive, output)
    model, run_cfg = load_model(cfg)
    device = resolve_device(cfg.device)
    model.to(device)
    source = instantiate(run_cfg.dataset)  # only its metadata: palette, normalisation; reads no files
    transform = eval_transform(source.mean, source.std)
    palette = [v for color in source.palette for v in color]

    written = 0
    for file, target in tqdm(files.items(), desc="predict", unit="image", dynamic_ncols=True):
        image = read_rgb(file)
        if image is None:
            continue
        rgb = np.array(image)
        x = transform(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)))
        with torch.inference_mode():
            labels = model(x[None].to(device)).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.fromarray(labels)
        mask.putpalette(palette)  # mode "P": the values stay class ids, viewers show the dataset's colours
        mask.save(f"{target}.png")
        blended = overlay(rgb, colorize(labels, source.palette), cfg.alpha)
        Image.fromarray(blended).save(f"{target}_overlay.jpg", quality=90)
        written += 1
    if not written:
        raise DataError(f"input: no image PIL can read at {inputs}")
    print(f"{written} of {len(files)} files segmented into {output} ({type(source).__name__} classes: "
          f"{', '.join(source.class_names)})")  # fmt: skip
    return written
