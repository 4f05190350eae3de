"""Pictures logged with each evaluation, so that a run can be judged by eye in the MLflow UI.

Under ``images/step_<N>/``: ``validation.png`` (a fixed set of validation images: image | ground truth |
every evaluated model), ``unlabeled.png`` (what the method makes of the latest unlabeled batch, from
``Method.inspect``), and per evaluated model ``iou_<model>.png`` and ``confusion_<model>.png``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from gta.contract import Batch, Method
from gta.engine import visualize
from gta.engine.evaluate import EvalProtocol, predict_logits
from gta.errors import BadSampleError
from gta.tracking import Logger

#: a panel's longer side is brought into this range (in pixels): small images are enlarged by a whole
#: factor so that titles fit and pixels stay crisp, large ones shrunk so that a grid stays small
MIN_SIDE, MAX_SIDE = 128, 320


def _fit(panel: np.ndarray) -> Image.Image:
    image = Image.fromarray(panel)
    side = max(image.size)
    factor = -(-MIN_SIDE // side) if side < MIN_SIDE else min(1.0, MAX_SIDE / side)
    if factor == 1:
        return image
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.NEAREST)


class Snapshots:
    def __init__(
        self,
        val: Dataset,
        count: int,
        *,
        palette: Sequence[Sequence[int]],
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        protocol: EvalProtocol,
    ) -> None:
        if count < 1:
            raise ValueError(f"Snapshots needs at least one image, got trainer.snapshot_images={count}")
        # Spread over the validation set, and the same images at every evaluation.
        picks = np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int))
        self.val = []
        for i in picks:
            try:
                self.val.append(val[int(i)])
            except BadSampleError as error:  # evaluation skips it or stops, as data.on_bad_sample says
                warnings.warn(f"{error}: not pictured", RuntimeWarning, 2)
        self.count = count
        self.palette, self.class_names = [list(c) for c in palette], list(class_names)
        self.mean, self.std, self.protocol = mean, std, protocol

    def _colors(self, labels: torch.Tensor) -> np.ndarray:
        return visualize.colorize(labels, self.palette)

    def _with_legend(self, picture: Image.Image) -> Image.Image:
        columns = min(len(self.class_names), 6)
        return visualize.grid([[picture], [visualize.legend(self.class_names, self.palette, columns)]], gap=0)

    @torch.no_grad()
    def validation(self, models: Mapping[str, nn.Module], device: torch.device) -> Image.Image:
        rows = []
        for image, mask in self.val:
            row = [visualize.denormalize(image, self.mean, self.std), self._colors(mask)]
            for model in models.values():
                model.eval()
                logits = predict_logits(model, image[None].to(device), self.protocol, len(self.class_names))
                row.append(self._colors(logits.argmax(1)[0]))
            rows.append([_fit(panel) for panel in row])
        return self._with_legend(visualize.grid(rows, ["image", "ground truth", *models]))

    def unlabeled(self, method: Method, batch: Batch) -> Image.Image | None:
        """One row per unlabeled image: the image, then each map of ``method.inspect``."""
        if batch.unlabeled is None:
            return None
        part = Batch(batch.image, batch.mask, batch.unlabeled[: self.count], batch.unlabeled_mask[: self.count])
        maps = method.inspect(part)
        if not maps:
            return None
        titles, columns = ["unlabeled"], []
        for title, values in maps.items():
            if values.dtype == torch.bool:
                columns.append([visualize.binary_map(v) for v in values])
            elif values.is_floating_point():
                top = max(1.0, float(values.max()))  # confidences span [0, 1]; weights may exceed 1
                title = title if top == 1.0 else f"{title} (0-{top:.2g})"
                columns.append([visualize.colormap(v / top) for v in values])
            else:
                columns.append([self._colors(v) for v in values])
            titles.append(title)
        images = [visualize.denormalize(x, self.mean, self.std) for x in part.unlabeled]
        rows = [[_fit(panel) for panel in (image, *(c[i] for c in columns))] for i, image in enumerate(images)]
        return self._with_legend(visualize.grid(rows, titles))

    def log(
        self,
        logger: Logger,
        step: int,
        models: Mapping[str, nn.Module],
        iou: Mapping[str, Sequence[float]],
        confusion: Mapping[str, torch.Tensor],
        method: Method,
        batch: Batch | None,
        device: torch.device,
    ) -> None:
        folder = f"images/step_{step:06d}"
        pictures = {"validation": self.validation(models, device)}
        if batch is not None and (unlabeled := self.unlabeled(method, batch)) is not None:
            pictures["unlabeled"] = unlabeled
        for name in models:
            pictures[f"iou_{name}"] = visualize.iou_chart(iou[name], self.class_names, f"{name}: IoU at step {step}")
            pictures[f"confusion_{name}"] = visualize.confusion_chart(
                confusion[name], self.class_names, f"{name}: confusion at step {step} (rows sum to 1)"
            )
        for name, picture in pictures.items():
            logger.log_image(np.asarray(picture), f"{folder}/{name}.png")
