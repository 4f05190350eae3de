"""The training engine: a plain PyTorch loop around a method's ``training_step``.

The engine owns devices, optimisers, the learning-rate schedule, data, evaluation, logging and the
progress bar. It knows nothing of teachers or pseudo-labels: it asks the method which models it trains,
which it evaluates, and lets ``training_step`` call ``update(name, loss)`` whenever the algorithm takes
an optimisation step. Checkpoints hold the whole training state, so a resumed run continues exactly where
the interrupted one stopped (see ``gta.engine.checkpoint``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from gta.contract import Batch, Method, Progress
from gta.engine.checkpoint import (
    FORMAT,
    Checkpointer,
    CheckpointError,
    load_models,
    rng_state,
    set_rng_state,
)
from gta.engine.distributed import Distributed, to_sync_batchnorm
from gta.engine.evaluate import EvalProtocol, confusion_matrices, iou_from_confusion
from gta.engine.precision import Precision
from gta.engine.progress import ProgressReport
from gta.engine.schedule import poly_factor, set_lr
from gta.engine.signals import StopSignals, TrainingInterrupted
from gta.engine.snapshots import Snapshots
from gta.errors import ConfigError, UserError
from gta.tracking import Logger, NullLogger


@dataclass
class EvalResult:
    step: int
    miou: dict[str, float]
    iou: dict[str, list[float]]
    confusion: dict[str, torch.Tensor] = field(repr=False)


ON_NONFINITE = ("stop", "skip")

#: in the run directory: one JSON line per sample file the loaders skipped (data.on_bad_sample=skip)
BAD_SAMPLES = "bad_samples.jsonl"


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss was NaN or infinite (``trainer.on_nonfinite=stop``)."""


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
        checkpoint_every: int = 0,
        on_nonfinite: str = "stop",
        progress: str = "auto",
        snapshots: Snapshots | None = None,
        dist: Distributed | None = None,
        sync_bn: bool = False,
        check_sync_every: int = 0,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if sync_bn:
            to_sync_batchnorm(method, device)
        self.method = method.to(device)
        # channels_last: the weights and the input batches (the layout convolutions run fastest in on GPUs)
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        if channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.dist = dist or Distributed(device=device)
        self.check_sync_every = check_sync_every
        self.loaders = loaders
        self.device = device
        self.precision = Precision(precision, device)
        self.optimizers = {
            name: optimizer(param_groups(model, decoder_lr_mult))
            for name, model in method.trained_models().items()
        }
        # fp16: one loss scaler per optimiser, since each model's gradients overflow on their own
        self.scalers = {name: self.precision.grad_scaler() for name in self.optimizers} if (
            self.precision.scales_losses) else {}
        self.total_iters = iters if iters is not None else epochs * loaders.iters_per_epoch
        if self.total_iters <= 0:
            raise ConfigError(f"nothing to train: trainer.iters={iters}, trainer.epochs={epochs}")
        self.eval_every, self.log_every, self.poly_power = eval_every, log_every, poly_power
        self.eval_protocol, self.num_classes, self.ignore_index = eval_protocol, num_classes, ignore_index
        self.eval_models = eval_protocol.select(method.evaluated_models(), method.reported)  # fails early
        self.class_names = class_names
        self.run_dir = run_dir
        self.logger = logger or NullLogger()
        self.history: list[EvalResult] = []
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"trainer.on_nonfinite must be one of {ON_NONFINITE}, got '{on_nonfinite}'")
        self.checkpoint_every, self.on_nonfinite = checkpoint_every, on_nonfinite
        self.progress, self.snapshots = progress, snapshots
        self._batch: Batch | None = None  # the latest training batch, for the pictures of an evaluation
        self.checkpoints = Checkpointer(run_dir / "checkpoints")
        self.models = {**method.evaluated_models(), **method.trained_models()}
        distinct = {id(m): m for m in self.models.values()}.values()
        if sum(len(m.state_dict()) for m in distinct) != len(method.state_dict()):
            raise ValueError(f"{type(method).__name__} keeps state outside its models; checkpoints miss it")
        self.dist.broadcast_models(distinct)  # every rank starts from rank 0's models
        if compile:  # in place: the state_dict keys, and so the checkpoints, stay those of the plain models
            for model in distinct:
                model.compile()
        self.start_iter = 0  # iterations already done (after resume)
        self.best: dict | None = None  # {"step", "miou"} of the best evaluation of the reported model
        self.saved: tuple[Path, int] | None = None  # the last checkpoint written and its iteration
        self._sums: dict[str, torch.Tensor] = {}  # losses summed since the last log step
        self._count = 0
        self._iteration = 0
        # trainer.on_nonfinite=stop: the updates since the last check, as (model, iteration), and on the
        # device the 1-based position among them of the first non-finite loss (0: none) and its value
        self._pending: list[tuple[str, int]] = []
        self._first_nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self._nonfinite_loss = torch.zeros((), device=device)
        self.bad_files: set[str] = set()  # sample files skipped by the loaders, as recorded in BAD_SAMPLES

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> EvalResult:
        """Train up to ``total_iters``, from ``start_iter`` after :meth:`resume`. A stop signal received
        meanwhile is honoured at the end of the iteration, after a checkpoint (``gta.engine.signals``)."""
        with StopSignals() as stop:
            return self._fit(stop)

    def _fit(self, stop: StopSignals) -> EvalResult:
        started = time.perf_counter()
        if self.start_iter == 0 and self.dist.is_main:
            (self.run_dir / BAD_SAMPLES).unlink(missing_ok=True)  # another run's, in this directory before
        batches = self._batches(self.start_iter)
        self.method.train()
        mode = self.progress if self.dist.is_main else "none"  # one report for all ranks
        report = ProgressReport(self.start_iter, self.total_iters, self.log_every, mode)
        for it in range(self.start_iter, self.total_iters):
            self._iteration = it + 1
            progress = Progress(it, self.loaders.iters_per_epoch)
            factor = poly_factor(it, self.total_iters, self.poly_power)
            for name, opt in self.optimizers.items():
                set_lr(opt, factor if self.method.scheduled(name) else 1.0)

            self._batch = next(batches)
            with self.precision.autocast():
                stats = self.method.training_step(self._batch, progress, self._update)
            self.dist.average_buffers(self.models.values())

            # Losses stay on the device until a log step: one host sync per log_every iterations.
            for key, value in stats.items():
                self._sums[key] = self._sums.get(key, 0.0) + value.detach().float()
            self._count += 1
            step = it + 1
            if self.check_sync_every and (step % self.check_sync_every == 0 or step == self.total_iters):
                self.dist.check_sync(self.models, step)
            if step % self.log_every == 0 or step == self.total_iters:
                self._check_finite()
                sums = self.dist.mean(self._sums)  # the losses of the whole global batch
                metrics = {f"train/{key}": float(total) / self._count for key, total in sums.items()}
                metrics.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()})
                metrics["epoch"] = progress.epoch
                self.logger.log_metrics(metrics, step=step)
                report.set({k.removeprefix("train/"): v for k, v in metrics.items() if k.startswith("train/")})
                report.set({"lr": next(iter(self.optimizers.values())).param_groups[0]["lr"]})
                self._sums, self._count = {}, 0
                self._record_bad_samples(step)
            if (self.eval_every and step % self.eval_every == 0) or step == self.total_iters:
                result = self.evaluate(step)
                report.write(f"step {step}: " + ", ".join(f"{n} mIoU {v:.2%}" for n, v in result.miou.items()))
                report.set({"mIoU": 100 * result.miou[self.method.reported]}, ".1f")
                self._keep_if_best(result)
                self.method.train()
            report.advance(step)
            signum = stop.received = self.dist.first_signal(stop.received)  # all ranks stop together
            due = self.checkpoint_every and step % self.checkpoint_every == 0
            if signum or due or step == self.total_iters:
                path = self.save_checkpoint(step)
            if signum and stop.hand_over():
                report.close()
                raise TrainingInterrupted(signum, step, path)
        report.close()
        if not self.history:  # resumed from the final checkpoint: nothing left to train
            self.evaluate(self.total_iters)
        self.wall_time = time.perf_counter() - started
        return self.history[-1]

    def _update(self, name: str, loss: torch.Tensor) -> None:
        if self.on_nonfinite == "skip":
            # Whether to step must be known now: one host sync per update. Every rank sees every rank's
            # loss, so all of them skip together.
            value = self.dist.nonfinite(loss)
            if value is not None:
                warnings.warn(
                    f"non-finite loss {value} for model '{name}' at iteration {self._iteration}; step skipped "
                    "(trainer.on_nonfinite=skip)", RuntimeWarning, 3,
                )
                return
        else:
            self._watch(name, loss.detach())
        optimizer, scaler = self.optimizers[name], self.scalers.get(name)
        optimizer.zero_grad(set_to_none=True)
        with self.precision.full():  # backward outside autocast: its dtypes follow the forward's
            if scaler is None:
                loss.backward()
                self.dist.average_gradients(optimizer)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                self.dist.average_gradients(optimizer)  # scaled: every rank sees the same overflow
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()

    def _watch(self, name: str, loss: torch.Tensor) -> None:
        """Note a non-finite loss on the device, without waiting for it; :meth:`_check_finite` reads it."""
        self._pending.append((name, self._iteration))
        first = (self._first_nonfinite == 0) & ~loss.isfinite()
        self._first_nonfinite = torch.where(first, len(self._pending), self._first_nonfinite)
        self._nonfinite_loss = torch.where(first, loss.float(), self._nonfinite_loss)

    def _check_finite(self) -> None:
        """Stop if a loss watched since the last check was NaN or infinite. One host sync; it runs at log
        steps and before every evaluation and checkpoint, so non-finite weights are never saved. Every rank
        runs the same updates, and sees every rank's record, so all of them stop together."""
        if not self._pending:
            return
        local = torch.stack([self._first_nonfinite.double(), self._nonfinite_loss.double()]).tolist()
        found = [(int(position), rank, value) for rank, (position, value) in enumerate(self.dist.gather_object(local))]
        first = min((position for position, _, _ in found if position), default=0)
        if first == 0:
            self._pending.clear()
            return
        name, iteration = self._pending[first - 1]
        values = ", ".join(
            f"{value} on rank {rank}" if self.dist.active else str(value)
            for position, rank, value in found if position == first
        )
        kept = (
            f"the last checkpoint, {self.saved[0]} (iteration {self.saved[1]}), is intact"
            if self.saved else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"non-finite loss {values} for model '{name}' at iteration {iteration}; training stopped at iteration "
            f"{self._iteration} (losses are checked at log steps and before evaluations and checkpoints) and {kept}. "
            "Lower the learning rate, or set trainer.on_nonfinite=skip to skip such steps"
        )

    def _batches(self, start_iter: int = 0) -> Iterator[Batch]:
        """Labeled and unlabeled batches in lock-step; an epoch is one pass of the unlabeled sampler.

        Starts ``start_iter`` iterations in, skipping that far into the epoch's sampler (to resume)."""
        loaders = [self.loaders.labeled]
        if self.method.uses_unlabeled:
            loaders.append(self.loaders.unlabeled)
        epoch, offset = divmod(start_iter, self.loaders.iters_per_epoch)
        while True:
            for loader in loaders:
                loader.sampler.set_epoch(epoch, offset * loader.batch_size)
            for parts in zip(*loaders, strict=False):
                yield self._to_device(parts)
            epoch, offset = epoch + 1, 0

    def _to_device(self, parts) -> Batch:
        (image, mask), *unlabeled = parts
        move = lambda t: t.to(  # noqa: E731
            self.device, non_blocking=True, memory_format=self.memory_format if t.dim() == 4 else torch.preserve_format
        )
        batch = Batch(image=move(image), mask=move(mask))
        if unlabeled:
            batch.unlabeled, batch.unlabeled_mask = (move(t) for t in unlabeled[0])
        return batch

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, step: int) -> EvalResult:
        self._check_finite()
        with self.precision.autocast():
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
        best = max(result.miou[reported], self.best["miou"] if self.best else float("-inf"))
        metrics = {"val/miou": result.miou[reported], "val/best_miou": best}
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
        self._record_bad_samples(step)
        if self.snapshots is not None:
            self.snapshots.log(
                self.logger, step, self.eval_models, result.iou, confusion, self.method, self._batch, self.device
            )
        return result

    def _keep_if_best(self, result: EvalResult) -> None:
        miou = result.miou[self.method.reported]
        if self.best is None or miou > self.best["miou"]:
            self.best = {"step": result.step, "miou": miou}
            state = self.state_dict(result.step)
            if self.dist.is_main:
                self.checkpoints.save(state, best=True)

    def _record_bad_samples(self, step: int) -> None:
        """Append the sample files every rank's loaders skipped since the last call to BAD_SAMPLES and log
        their number so far as ``data/bad_samples``. Runs on all ranks (it gathers), at the same steps."""
        bad_samples = getattr(self.loaders, "bad_samples", None)
        found = self.dist.gather_object(bad_samples.take() if bad_samples is not None else [])
        new = {path: message for part in found for path, message in part if path not in self.bad_files}
        if not new:
            return
        self.bad_files.update(new)
        if self.dist.is_main:
            with open(self.run_dir / BAD_SAMPLES, "a") as record:
                for path, message in new.items():
                    record.write(json.dumps({"step": step, "file": path, "error": message}) + "\n")
        self.logger.log_metrics({"data/bad_samples": len(self.bad_files)}, step=step)

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        """Everything needed to continue after iteration ``step`` exactly (layout: gta.engine.checkpoint).

        With several processes every rank must call it: it gathers their generators and losses."""
        rng = self.dist.gather_object(rng_state())
        return {
            "format": FORMAT,
            "method": type(self.method).__name__,
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
            "iteration": step,
            "epoch": step // self.loaders.iters_per_epoch,
            "iters_per_epoch": self.loaders.iters_per_epoch,
            "rng": rng[0],
            "rng_other_ranks": rng[1:],
            "best": self.best,
            "metrics": {"sums": {k: v.cpu() for k, v in self.dist.mean(self._sums).items()}, "count": self._count},
            "run_id": self.logger.run_id,
        }

    def save_checkpoint(self, step: int) -> Path:
        self._check_finite()
        state = self.state_dict(step)
        path = self.checkpoints.save(state) if self.dist.is_main else self.checkpoints.last
        self.saved = (path, step)
        return path

    def resume(self, state: dict, source: Path | str) -> None:
        """Restore a :meth:`state_dict`; :meth:`fit` then continues after its iteration."""
        if state["iters_per_epoch"] != self.loaders.iters_per_epoch:
            raise CheckpointError(
                f"{source} was written with {state['iters_per_epoch']} iterations per epoch, this run has "
                f"{self.loaders.iters_per_epoch}: resume with the same split, data.batch_size and dataset"
            )
        if state["iteration"] > self.total_iters:
            raise CheckpointError(
                f"{source} is at iteration {state['iteration']}, past the {self.total_iters} of this run"
            )
        load_models(self.models, state["models"], source)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, scaler in self.scalers.items():
            if name in state["scalers"]:  # else the checkpoint was not written in fp16: the scale starts afresh
                scaler.load_state_dict(state["scalers"][name])
        self.start_iter, self.best = state["iteration"], state["best"]
        self._sums = {k: v.to(self.device) for k, v in state["metrics"]["sums"].items()}
        self._count = state["metrics"]["count"]
        self.saved = (Path(source), state["iteration"])
        record = self.run_dir / BAD_SAMPLES
        if record.is_file():  # the files this run skipped before it was interrupted
            self.bad_files = {json.loads(line)["file"] for line in record.read_text().splitlines() if line}
        saved_rng = [state["rng"], *state.get("rng_other_ranks", [])]
        if len(saved_rng) != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"{source} was written by {len(saved_rng)} processes, this run has {self.dist.world_size}: ranks "
                "without a saved random state keep a fresh one, so the run does not continue exactly",
                RuntimeWarning, 2,
            )
        if self.dist.rank < len(saved_rng):
            set_rng_state(saved_rng[self.dist.rank])

    def save_reported_model(self) -> Path:
        """The final weights of the model the method reports (the teacher for GTA-Seg and Mean Teacher)."""
        name = self.method.reported
        path = self.run_dir / f"{name}.pt"
        torch.save(self.method.evaluated_models()[name].state_dict(), path)
        return path
