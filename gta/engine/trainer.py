"""The training engine: a plain PyTorch loop around a method's ``training_step``.

The engine owns devices, optimisers, the learning-rate schedule, data, evaluation, logging and the
progress report. It knows nothing of teachers or pseudo-labels: it asks the method which models it trains
and which it evaluates, and lets ``training_step`` call ``update(name, loss)`` whenever the algorithm
takes an optimisation step (``gta.contract``). Features live in modules of their own: model preparation
(``prepare``), precision, the non-finite guard (``guard``), data parallelism (``distributed``) and the
training state that checkpoints save and restore exactly (``checkpoint``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from gta.contract import Batch, Method, Progress, Unlabeled
from gta.engine import checkpoint
from gta.engine.bad_sample_log import BadSampleLog
from gta.engine.checkpoint import Checkpointer, CheckpointError
from gta.engine.config import TrainerConfig
from gta.engine.distributed import Distributed
from gta.engine.evaluate import EvalResult, Validation
from gta.engine.guard import NonFiniteGuard
from gta.engine.precision import Precision
from gta.engine.prepare import models_of, prepare
from gta.engine.progress import ProgressReport
from gta.engine.schedule import poly_factor, set_lr
from gta.engine.signals import TrainingInterrupted, stop_signals
from gta.engine.snapshots import Snapshots
from gta.errors import ConfigError
from gta.tracking import Logger, NullLogger


def param_groups(model: nn.Module, decoder_lr_mult: float) -> list[dict]:
    groups = getattr(model, "param_groups", None)
    return groups(decoder_lr_mult) if callable(groups) else [{"params": list(model.parameters())}]


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        method: Method,
        loaders,
        optimizer: Callable[[list[dict]], Optimizer],
        validation: Validation,
        run_dir: Path,
        *,
        logger: Logger | None = None,
        dist: Distributed | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.config, self.method, self.loaders, self.validation = config, method, loaders, validation
        self.dist = dist or Distributed()
        self.device = self.dist.device
        self.run_dir, self.logger, self.snapshots = run_dir, logger or NullLogger(), snapshots
        self.total_iters = config.iters if config.iters is not None else config.epochs * loaders.iters_per_epoch
        if self.total_iters <= 0:
            raise ConfigError(f"nothing to train: trainer.iters={config.iters}, trainer.epochs={config.epochs}")
        validation.protocol.select(method.evaluated_models(), method.reported)  # a bad eval.models fails here
        self.models = models_of(method)
        prepared = prepare(method, config, self.dist)
        self.memory_format, self.data_parallel = prepared.memory_format, prepared.data_parallel
        self.precision = Precision(config.precision, self.device)
        self.guard = NonFiniteGuard(config.on_nonfinite, self.dist)
        self.optimizers = {
            name: optimizer(param_groups(model, config.decoder_lr_mult))
            for name, model in method.trained_models().items()
        }
        # fp16: one loss scaler per optimiser, since each model's gradients overflow on their own
        scales = self.precision.scales_losses
        self.scalers = {name: self.precision.grad_scaler() for name in self.optimizers} if scales else {}
        self.checkpoints = Checkpointer(run_dir / "checkpoints")
        self.bad_samples = BadSampleLog(run_dir, self.dist)
        self.check_sync_every = config.eval_every if config.check_sync_every is None else config.check_sync_every
        self.start_iter = 0  # iterations already done (after resume)
        self.iteration = 0  # the iteration running (1-based)
        self.best: dict | None = None  # {"step", "miou"} of the best evaluation of the reported model
        self.reported = method.reported  # the model reported at the latest evaluation (Method.reported_at)
        self.saved: tuple[Path, int] | None = None  # the last checkpoint written and its iteration
        self.history: list[EvalResult] = []
        self.losses = LossSums()
        self._batch: Batch | None = None  # the latest training batch, for the pictures of an evaluation

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> EvalResult:
        """Train up to ``total_iters``, from ``start_iter`` after :meth:`resume`. A stop signal received
        meanwhile is honoured at the end of the iteration, after a checkpoint (``gta.engine.signals``)."""
        started = time.perf_counter()
        self.bad_samples.start(resumed=self.start_iter > 0)
        mode = self.config.progress if self.dist.is_main else "none"  # one report for all ranks
        report = ProgressReport(self.start_iter, self.total_iters, self.config.log_every, mode)
        with stop_signals() as stop, report:
            # a signal that came while the job was building: honoured before any work, as after an iteration
            if signum := self.dist.first_signal(stop.received):
                stop.received = signum
                path = self.save_checkpoint(self.start_iter)
                if stop.hand_over():
                    raise TrainingInterrupted(signum, self.start_iter, path)
            batches = self._batches(self.start_iter)
            self.method.train()
            for it in range(self.start_iter, self.total_iters):
                self._batch = next(batches)
                self._train_step(it)
                step = self.iteration
                if _every(step, self.check_sync_every, self.total_iters):
                    self.dist.check_sync(self.models, step)
                if _every(step, self.config.log_every, self.total_iters):
                    self._log(step, report)
                if _every(step, self.config.eval_every, self.total_iters):
                    result = self.evaluate(step)
                    report.write(f"step {step}: " + ", ".join(f"{n} mIoU {v:.2%}" for n, v in result.miou.items()))
                    report.set({"mIoU": 100 * result.miou[self.reported]}, ".1f")
                    self._keep_if_best(result)
                    self.method.train()
                report.advance(step)
                signum = stop.received = self.dist.first_signal(stop.received)  # all ranks stop together
                if signum or _every(step, self.config.checkpoint_every, self.total_iters):
                    path = self.save_checkpoint(step)
                if signum and stop.hand_over():
                    raise TrainingInterrupted(signum, step, path)
        if not self.history:  # resumed from the final checkpoint: nothing left to train
            self.evaluate(self.total_iters)
        self.wall_time = time.perf_counter() - started
        return self.history[-1]

    def _train_step(self, it: int) -> None:
        self.iteration = it + 1
        for name, opt in self.optimizers.items():
            start, stop = self.method.scheduled_span(name, self.total_iters)
            factor = poly_factor(it - start, stop - start, self.config.poly_power)
            set_lr(opt, factor if self.method.scheduled(name) else 1.0)
        with self.precision.autocast():
            progress = Progress(it, self.loaders.iters_per_epoch, self.total_iters)
            stats = self.method.training_step(self._batch, progress, self._update)
        self.dist.average_buffers(self.models.values())
        self.losses.add(stats)  # on the device until a log step: one host sync per log_every iterations

    def _update(self, name: str, loss: torch.Tensor) -> None:
        if not self.guard.allows(name, self.iteration, loss):
            return
        optimizer, scaler = self.optimizers[name], self.scalers.get(name)
        optimizer.zero_grad(set_to_none=True)
        with self.precision.full():  # backward outside autocast: its dtypes follow the forward's
            if scaler is not None:
                loss = scaler.scale(loss)  # data-parallel: averaged scaled, every rank sees the same overflow
            self.data_parallel[name](loss).backward()  # several processes: gradients averaged during backward
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()

    def _log(self, step: int, report: ProgressReport) -> None:
        self.guard.check(step, self.saved)
        losses = {f"train/{key}": value for key, value in self.losses.take(self.dist).items()}
        lrs = {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.logger.log_metrics(losses | lrs | {"epoch": (step - 1) // self.loaders.iters_per_epoch}, step=step)
        report.set({key.removeprefix("train/"): value for key, value in losses.items()})
        report.set({"lr": next(iter(lrs.values()))})
        self.bad_samples.record(self.loaders.bad_samples.take(), step, self.logger)

    def _batches(self, start_iter: int = 0) -> Iterator[Batch]:
        """Labeled and unlabeled batches (and the second unlabeled stream, when there is one) in lock-step;
        an epoch is one pass of the unlabeled sampler.

        Starts ``start_iter`` iterations in, skipping that far into the epoch's sampler (to resume)."""
        loaders = [self.loaders.labeled]
        if self.method.uses_unlabeled:
            loaders.append(self.loaders.unlabeled)
            if self.loaders.second_unlabeled is not None:
                loaders.append(self.loaders.second_unlabeled)
        epoch, offset = divmod(start_iter, self.loaders.iters_per_epoch)
        while True:
            for loader in loaders:
                loader.sampler.set_epoch(epoch, offset * loader.batch_size)
            for parts in zip(*loaders, strict=False):  # the loaders' lengths agree: iters_per_epoch batches
                yield self._to_device(parts)
            epoch, offset = epoch + 1, 0

    def _to_device(self, parts) -> Batch:
        (image, mask), *unlabeled = parts

        def move(t: torch.Tensor) -> torch.Tensor:
            layout = self.memory_format if t.dim() == 4 else torch.preserve_format
            return t.to(self.device, non_blocking=True, memory_format=layout)

        batch = Batch(image=move(image), mask=move(mask))
        if unlabeled:
            # each unlabeled item: the weak view, its padding mask, then the named views (Loaders.views)
            first, *second = (
                Unlabeled(move(u), move(m), {n: move(v) for n, v in zip(self.loaders.views, views, strict=True)})
                for u, m, *views in unlabeled
            )
            batch.unlabeled, batch.unlabeled_mask, batch.views = first.image, first.mask, first.views
            batch.second = second[0] if second else None
        return batch

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, step: int) -> EvalResult:
        self.guard.check(step, self.saved)
        self.reported = self.method.reported_at(Progress(step, self.loaders.iters_per_epoch, self.total_iters))
        models = self.validation.protocol.select(self.method.evaluated_models(), self.reported)
        with self.precision.autocast():
            result = self.validation.run(models, step, self.device)
        self.history.append(result)
        reported = result.miou[self.reported]
        best = max(reported, self.best["miou"] if self.best else float("-inf"))
        metrics = {"val/miou": reported, "val/best_miou": best} | self.validation.metrics(result)
        self.logger.log_metrics(metrics, step=step)
        self.bad_samples.record(self.loaders.bad_samples.take(), step, self.logger)
        if self.snapshots is not None:
            self.snapshots.log(
                self.logger, step, models, result.iou, result.confusion, self.method, self._batch,
                self.device,
            )
        return result

    def _keep_if_best(self, result: EvalResult) -> None:
        miou = result.miou[self.reported]
        if self.best is None or miou > self.best["miou"]:
            self.best = {"step": result.step, "miou": miou}
            state = self.state_dict(result.step)
            if self.dist.is_main:
                self.checkpoints.save(state, best=True)

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        """Everything needed to continue after iteration ``step`` exactly (layout: gta.engine.checkpoint).

        With several processes every rank must call it: it gathers their generators and losses."""
        return checkpoint.capture(self.models, self.optimizers, self.scalers, self.dist) | {
            "iteration": step,
            "iters_per_epoch": self.loaders.iters_per_epoch,
            "best": self.best,
            "metrics": self.losses.state_dict(self.dist),
            "run_id": self.logger.run_id,
        }

    def save_checkpoint(self, step: int) -> Path:
        self.guard.check(step, self.saved)
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
        checkpoint.restore(state, self.models, self.optimizers, self.scalers, self.dist, source)
        self.start_iter, self.best = state["iteration"], state["best"]
        self.losses.load_state_dict(state["metrics"], self.device)
        self.saved = (Path(source), state["iteration"])

    def save_reported_model(self) -> Path:
        """The final weights of the model the method reports (the teacher for GTA-Seg and Mean Teacher)."""
        name = self.reported
        path = self.run_dir / f"{name}.pt"
        torch.save(self.models[name].state_dict(), path)
        return path


def _every(step: int, period: int, last: int) -> bool:
    """Whether something done every ``period`` iterations (0: never) and after the last is due at ``step``."""
    return step == last or (period > 0 and step % period == 0)


class LossSums:
    """The logged scalars summed on the device between log steps, so that reading them costs one sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.count += 1

    def take(self, dist: Distributed) -> dict[str, float]:
        """The means since the last call, over the iterations and the ranks (the whole global batch)."""
        means = {key: float(total) / self.count for key, total in dist.mean(self.sums).items()}
        self.sums, self.count = {}, 0
        return means

    def state_dict(self, dist: Distributed) -> dict:
        return {"sums": {k: v.cpu() for k, v in dist.mean(self.sums).items()}, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = state["count"]
