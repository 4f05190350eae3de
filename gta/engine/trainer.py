"""The training engine: a plain PyTorch loop around a method's ``training_step``.

The engine owns devices, optimisers, the learning-rate schedule, data, evaluation, logging and the
progress bar. It knows nothing of teachers or pseudo-labels: it asks the method which models it trains,
which it evaluates, and lets ``training_step`` call ``update(name, loss)`` whenever the algorithm takes
an optimisation step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from gta.engine.evaluate import EvalProtocol, confusion_matrices, iou_from_confusion
from gta.engine.schedule import poly_factor, set_lr
from gta.methods.base import Batch, Method, Progress
from gta.tracking import Logger, NullLogger


@dataclass
class EvalResult:
    step: int
    miou: dict[str, float]
    iou: dict[str, list[float]]
    confusion: dict[str, torch.Tensor] = field(repr=False)


def param_groups(model: nn.Module, decoder_lr_mult: float) -> list[dict]:
    groups = getattr(model, "param_groups", None)
    return groups(decoder_lr_mult) if callable(groups) else [{"params": list(model.parameters())}]


class Trainer:
    def __init__(
        self,
        method: Method,
        loaders,
        optimizer: Callable[[list[dict]], Optimizer],
        *,
        iters: int | None,
        epochs: int,
        eval_every: int,
        log_every: int,
        decoder_lr_mult: float,
        poly_power: float,
        device: torch.device,
        eval_protocol: EvalProtocol,
        num_classes: int,
        ignore_index: int,
        class_names: list[str],
        run_dir: Path,
        logger: Logger | None = None,
    ) -> None:
        self.method = method.to(device)
        self.loaders = loaders
        self.device = device
        self.optimizers = {
            name: optimizer(param_groups(model, decoder_lr_mult))
            for name, model in method.trained_models().items()
        }
        self.total_iters = iters if iters is not None else epochs * loaders.iters_per_epoch
        if self.total_iters <= 0:
            raise ValueError(f"nothing to train: trainer.iters={iters}, trainer.epochs={epochs}")
        self.eval_every, self.log_every, self.poly_power = eval_every, log_every, poly_power
        self.eval_protocol, self.num_classes, self.ignore_index = eval_protocol, num_classes, ignore_index
        self.eval_models = eval_protocol.select(method.evaluated_models(), method.reported)  # fails early
        self.class_names = class_names
        self.run_dir = run_dir
        self.logger = logger or NullLogger()
        self.history: list[EvalResult] = []

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> EvalResult:
        started = time.perf_counter()
        batches = self._batches()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.method.train()
        bar = tqdm(range(self.total_iters), desc="train", dynamic_ncols=True)
        for it in bar:
            progress = Progress(it, self.loaders.iters_per_epoch, self.total_iters)
            factor = poly_factor(it, self.total_iters, self.poly_power)
            for name, opt in self.optimizers.items():
                set_lr(opt, factor if self.method.scheduled(name) else 1.0)

            stats = self.method.training_step(next(batches), progress, self._update)

            # Losses stay on the device until a log step: one host sync per log_every iterations.
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            count += 1
            step = it + 1
            if step % self.log_every == 0 or step == self.total_iters:
                metrics = {f"train/{key}": float(total) / count for key, total in sums.items()}
                metrics.update({f"lr/{n}": opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()})
                metrics["epoch"] = progress.epoch
                self.logger.log_metrics(metrics, step=step)
                shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("train/")}
                bar.set_postfix(shown)
                sums, count = {}, 0
            if (self.eval_every and step % self.eval_every == 0) or step == self.total_iters:
                result = self.evaluate(step)
                bar.write(f"step {step}: " + ", ".join(f"{n} mIoU {v:.2%}" for n, v in result.miou.items()))
                self.method.train()
        bar.close()
        self.wall_time = time.perf_counter() - started
        return self.history[-1]

    def _update(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def _batches(self) -> Iterator[Batch]:
        """Labeled and unlabeled batches in lock-step; an epoch is one pass of the unlabeled sampler."""
        loaders = [self.loaders.labeled]
        if self.method.uses_unlabeled:
            loaders.append(self.loaders.unlabeled)
        epoch = 0
        while True:
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            for parts in zip(*loaders, strict=False):
                yield self._to_device(parts)
            epoch += 1

    def _to_device(self, parts) -> Batch:
        (image, mask), *unlabeled = parts
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        batch = Batch(image=move(image), mask=move(mask))
        if unlabeled:
            batch.unlabeled, batch.unlabeled_mask = (move(t) for t in unlabeled[0])
        return batch

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, step: int) -> EvalResult:
        confusion = confusion_matrices(
            self.eval_models, self.loaders.val, self.num_classes, self.ignore_index, self.eval_protocol,
            self.device,
        )
        ious = {name: iou_from_confusion(cm) for name, cm in confusion.items()}
        result = EvalResult(
            step=step,
            miou={name: float(iou.nanmean()) for name, iou in ious.items()},
            iou={name: iou.tolist() for name, iou in ious.items()},
            confusion=confusion,
        )
        self.history.append(result)
        reported = self.method.reported
        metrics = {"val/miou": result.miou[reported], "val/best_miou": self.best.miou[reported]}
        for name, iou in ious.items():
            metrics[f"val/{name}/miou"] = result.miou[name]
            metrics.update(
                {
                    f"val/{name}/iou/{cls}": float(v)
                    for cls, v in zip(self.class_names, iou, strict=True)
                    if not v.isnan()
                }
            )
        self.logger.log_metrics(metrics, step=step)
        return result

    @property
    def best(self) -> EvalResult:
        """The evaluation with the highest mIoU of the reported model (the earliest of equals)."""
        if not self.history:
            raise RuntimeError("no evaluation has run yet")
        return max(self.history, key=lambda r: r.miou[self.method.reported])

    def save_reported_model(self) -> Path:
        """The final weights of the model the method reports (the teacher for GTA-Seg and Mean Teacher)."""
        name = self.method.reported
        path = self.run_dir / f"{name}.pt"
        torch.save(self.method.evaluated_models()[name].state_dict(), path)
        return path
