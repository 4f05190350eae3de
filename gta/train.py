"""The ``train`` command: build every part from the config, train, evaluate, log, summarise."""

from __future__ import annotations

import atexit
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gta.contract import check_method, check_network
from gta.data import build_loaders, crop_warning, select_split, split_params, write_split
from gta.data.sampler import derive_seed
from gta.engine import distributed
from gta.engine.checkpoint import LAST, load_checkpoint
from gta.engine.evaluate import Validation
from gta.engine.runtime import configure_cuda, ensure_writable, seed_everything
from gta.engine.signals import STOP_SIGNALS, StopSignals, TrainingInterrupted, stop_signals
from gta.engine.snapshots import Snapshots
from gta.engine.trainer import Trainer
from gta.errors import ConfigError, MissingPathError
from gta.suggest import did_you_mean
from gta.tracking import Logger, NullLogger, flatten_config
from gta.tracking.sweep import (
    PARENT_FILE,
    SweepParent,
    grid_keys,
    grid_point,
    run_tags,
    sweep_dir_of_job,
    sweep_tags,
    uses_mlflow,
)


def network_factory(node: DictConfig) -> Callable[[], nn.Module]:
    """What a method calls to make its network: the model node built and checked against the contract."""
    build = instantiate(node, _partial_=True)
    return lambda: check_network(build(), f"model._target_={node._target_}")


def network_name(cfg: DictConfig) -> str:
    """The run's network as a person chose it: the model option (``deeplabv3plus_small``), else its target."""
    choice = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    return choice or cfg.model._target_


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def task_overrides() -> list[str]:
    """The command-line overrides of this run (in a sweep: including the grid point's)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def experiment_file() -> str | None:
    """The experiments/ file this run was composed with (``+experiment=NAME``), if any."""
    return HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None


#: written into the run directory once a run has finished and logged everything; a sweep re-run into the
#: same directory skips the jobs that have one
RESULT_FILE = "result.json"


def finished_result(run_dir: Path, overrides: list[str]) -> float | None:
    """The reported mIoU of a job that already finished in ``run_dir`` with these overrides, else None."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("overrides") != overrides:
        previous = " ".join(record.get("overrides", []))
        print(f"{path} belongs to another grid point ({previous}): training anew")
        return None
    return float(record["value"])


def find_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``resume=PATH``; by default the run directory's own ``checkpoints/last.pt`` if there is one (a re-run
    of the same command, or a requeued SLURM job); ``resume=never`` starts afresh."""
    if resume == "never":
        return None
    if resume is None:
        last = run_dir / "checkpoints" / LAST
        return last if last.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise MissingPathError(
            f"resume={resume}: no checkpoint file there. Give a checkpoint (e.g. <run dir>/checkpoints/"
            "last.pt), null to continue from the run directory's own, or never to start afresh"
        )
    return path


def snapshots(cfg: DictConfig, source, val, logger) -> Snapshots | None:
    """The pictures of each evaluation, unless there is nowhere to log them."""
    if cfg.trainer.snapshot_images <= 0 or isinstance(logger, NullLogger):
        return None
    return Snapshots(
        val, cfg.trainer.snapshot_images, palette=source.palette, class_names=source.class_names,
        mean=source.mean, std=source.std, protocol=instantiate(cfg.eval),
    )


def open_logger(cfg: DictConfig, dist, run_dir: Path, name: str, state: dict | None) -> Logger:
    """The run's tracking (rank 0 alone logs); on resume it continues the checkpoint's tracking run, so one
    run holds the whole history, and in a sweep it nests under the sweep's parent run."""
    if not dist.is_main:
        return NullLogger()
    defaults = {"run_name": name, "fallback_dir": str(run_dir), "run_id": state["run_id"] if state else None}
    sweep_dir = sweep_dir_of_job()
    if sweep_dir is not None and uses_mlflow(cfg):
        # read when the job's run is created: a sweep that started during an outage has no parent run yet
        defaults["parent_file"] = str(sweep_dir / PARENT_FILE)
    return instantiate(cfg.logger, **{k: v for k, v in defaults.items() if cfg.logger.get(k, 1) is None})


def targets(node: Any, key: str = "") -> list[tuple[str, dict]]:
    """``(key, node)`` of every node with a ``_target_`` in a config (as plain containers), depth first."""
    if isinstance(node, dict):
        target = node.get("_target_")
        found = [(key, node)] if isinstance(target, str) and "${" not in target else []  # an interpolation: as built
        return found + [t for k, v in node.items() for t in targets(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in targets(v, f"{key}[{i}]")]
    return []


def check_targets(cfg: DictConfig) -> None:
    """Every class or function the config names imports and takes the keys its node gives, before anything is
    built; else a ConfigError naming the key, with how to make a package Python cannot find findable, or the
    arguments the class takes."""
    for key, node in targets(OmegaConf.to_container(cfg, resolve=False)):
        target = node["_target_"]
        package = target.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key}._target_={target}: Python finds no module {package}; put the directory that holds it on "
                f"PYTHONPATH (PYTHONPATH=/path/to/that/dir gta train ...) or install its package (pip install -e "
                "/path/to/the/project)"
            )
        try:
            built = get_object(target)
        except ImportError as err:
            raise ConfigError(f"{key}._target_={target} does not import: {err.__cause__ or err}") from err
        takes = keyword_arguments(built)
        for name in node:
            if takes is not None and not name.startswith("_") and name not in takes:
                raise ConfigError(
                    f"{key}.{name}: {target} takes no argument {name}{did_you_mean(name, takes)} Its arguments: "
                    f"{', '.join(takes)}"
                )


def keyword_arguments(built: Any) -> list[str] | None:
    """The arguments a function or class takes by name, a class's ``**kwargs`` followed up its bases' ``__init__``
    (GTASeg passes its options on to SelfTraining); None where any name may do."""
    functions = [c.__init__ for c in built.__mro__ if "__init__" in vars(c)] if isinstance(built, type) else [built]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: list[str] = []
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a callable whose signature Python cannot tell
            return None
        names += [p.name for p in parameters if p.kind in named and p.name != "self" and p.name not in names]
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None


def record_run(cfg: DictConfig, logger: Logger, run_dir: Path, split, overrides: list[str]) -> None:
    """Tags, params, the resolved config and the split lists, in the run directory and the tracking run."""
    logger.set_tags(run_tags(cfg, overrides, experiment_file()))
    # report.* is where the run sits in a table: tags above, not hyper-parameters
    logger.log_params(flatten_config({k: v for k, v in cfg.items() if k != "report"}) | split_params(split))
    resolved = run_dir / "config.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.log_artifact(resolved)
    for path in write_split(split, run_dir / "split"):
        logger.log_artifact(path, artifact_path="split")


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train the run ``cfg`` describes into ``run_dir`` (default: Hydra's run directory); its reported mIoU. Stop
    signals are recorded from here to the end (gta.engine.signals): honoured while training, ignored after."""
    with stop_signals() as stop:
        return train_job(cfg, run_dir, stop)


def train_job(cfg: DictConfig, run_dir: Path | None, stop: StopSignals) -> float:
    # One of several processes under torchrun or in a multi-task SLURM job: data-parallel training
    dist = distributed.setup(cfg.device)
    check_targets(cfg)
    check_method(get_class(cfg.method._target_), f"method._target_={cfg.method._target_}")
    run_dir = ensure_writable(Path(run_dir or output_dir()))
    overrides = task_overrides()
    done = finished_result(run_dir, overrides) if dist.is_main and sweep_dir_of_job() is not None else None
    checkpoint = find_checkpoint(cfg.resume, run_dir)
    # Every process trains into rank 0's run directory, from the checkpoint rank 0 found there.
    run_dir, done, checkpoint = dist.broadcast_object((run_dir, done, checkpoint))
    if done is not None:
        if dist.is_main:
            print(f"{run_dir} finished before ({RESULT_FILE}): skipped; delete that file to train it again")
        return done
    state = load_checkpoint(checkpoint) if checkpoint else None  # a bad file fails before any work
    configure_cuda(dist.device, cudnn_benchmark=cfg.trainer.cudnn_benchmark)
    # Each rank draws its own CutMix boxes and dropout masks; rank 0 keeps the seed, so a single process
    # trains as it always did. (The models start from rank 0's weights whatever the seed.)
    seed_everything(cfg.seed if dist.is_main else derive_seed(cfg.seed, dist.rank))

    source = instantiate(cfg.dataset)
    split = select_split(source, cfg.split, cfg.data.split_seed, cfg.data.split_dir, cfg.data.splits)
    if dist.is_main and (warning := crop_warning(source, split.labeled)):
        print(f"warning: {warning}", file=sys.stderr)
    method = instantiate(cfg.method, model=network_factory(cfg.model))
    loaders = build_loaders(
        source, split, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
        need_unlabeled=method.uses_unlabeled, rank=dist.rank, world_size=dist.world_size,
        pin_memory=dist.device.type == "cuda", val_batch_size=cfg.data.val_batch_size,
        prefetch_factor=cfg.data.prefetch_factor, on_bad_sample=cfg.data.on_bad_sample,
        ignored_signals=STOP_SIGNALS, views=view_pipelines(cfg, method), second_unlabeled=method.second_unlabeled,
    )
    validation = Validation(
        loaders.val, instantiate(cfg.eval), source.num_classes, source.ignore_index, list(source.class_names)
    )
    name = f"{type(method).__name__}-{type(source).__name__}-split{cfg.split}-seed{cfg.seed}"
    sweep = SweepParent.read(sweep_dir_of_job()) if sweep_dir_of_job() is not None else None
    if sweep is not None and sweep.grid:  # in a sweep's run list, what tells the runs apart comes first
        name = grid_point(overrides, list(sweep.grid))
    logger = open_logger(cfg, dist, run_dir, name, state)
    try:
        if dist.is_main:
            record_run(cfg, logger, run_dir, split, overrides)
        trainer = Trainer(
            OmegaConf.to_object(cfg.trainer), method, loaders, instantiate(cfg.optimizer), validation, run_dir,
            logger=logger, dist=dist, snapshots=snapshots(cfg, source, loaders.val.items, logger),
        )
        if state is not None:
            trainer.resume(state, checkpoint)
            if dist.is_main:
                print(f"resuming from {checkpoint} after iteration {trainer.start_iter}", file=sys.stderr)
            del state
        result = trainer.fit()
        stop.finish()  # what follows saves and logs a finished run: a signal now lets it finish
        if dist.is_main:
            logger.log_artifact(trainer.save_reported_model())
            if trainer.bad_samples.files:
                logger.log_artifact(trainer.bad_samples.path)
    except TrainingInterrupted as stop:
        logger.close("KILLED")
        print(stop, file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None  # the status a shell reports for that signal
    except (KeyboardInterrupt, SystemExit):
        logger.close("KILLED")
        raise
    except BaseException:
        logger.close("FAILED")
        raise
    logger.close()
    reported = result.miou[trainer.reported]
    if dist.is_main:
        record = {"value": reported, "reported": trainer.reported, "miou": result.miou, "overrides": overrides,
                  "run_id": logger.run_id, "network": network_name(cfg), "labeled": len(split.labeled),
                  "iterations": trainer.total_iters, "wall_time_s": round(trainer.wall_time, 1)}
        (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        print(summary(trainer, source, split, logger))
        # composed in-process (a script), a run has no command line to tell its budget by
        line = comparison(overrides, network_name(cfg)) if HydraConfig.initialized() else None
        if line:
            print(line)
    return reported


def view_pipelines(cfg: DictConfig, method) -> dict:
    """The pipelines of the unlabeled views the method reads besides the weak one, from ``data.views``."""
    missing = [name for name in method.views if name not in cfg.data.views]
    if missing:
        raise ConfigError(
            f"{type(method).__name__} reads the unlabeled views {', '.join(method.views)}, but data.views has no "
            f"{', '.join(missing)} (it defines {', '.join(cfg.data.views) or 'none'}); define it in a config "
            f"file (data: {{views: {{{missing[0]}: {{}}}}}} is the default photometric view)"
        )
    return {name: instantiate(cfg.data.views[name]) for name in method.views}


def summary(trainer: Trainer, source, split, logger: Logger) -> str:
    """What a person reads at the end of a run: every model's mIoU, the time, where the files are."""
    method, result, best = trainer.method, trainer.history[-1], trainer.best
    lines = [
        f"\n{type(method).__name__} on {type(source).__name__}, {len(split.labeled)} labeled ({split.family} "
        f"{split.name}) / {len(split.unlabeled)} unlabeled images, {trainer.total_iters} iterations on "
        f"{trainer.device}"
    ]
    for model_name, value in result.miou.items():
        marker = "  <- reported" if model_name == trainer.reported else ""
        if model_name == method.reported != trainer.reported:  # Method.reported_at: not yet worth reporting
            marker = "  not reported: the run ended inside the warm-up, this is still the untrained copy"
        lines.append(f"  val mIoU {model_name:<9} {value:7.2%}{marker}  (last, step {result.step})")
    lines.append(f"  best     {trainer.reported:<9} {best['miou']:7.2%}  (step {best['step']})")
    lines.append(f"  wall time {trainer.wall_time:.0f} s")
    if trainer.bad_samples.files:
        lines.append(f"  skipped    {len(trainer.bad_samples.files)} unusable sample files, listed in "
                     f"{trainer.bad_samples.path}")
    lines.append(f"  run files  {trainer.run_dir}")
    lines.append(f"  logged to  {logger.location}")
    if logger.ui_hint:
        lines.append(f"  browse     {logger.ui_hint}")
    return "\n".join(lines)


#: what ``make compare`` measured at the embedded dataset's default budget (scripts/compare_methods.py
#: --reference): the demo prints it beside its own result
REFERENCE = Path(__file__).resolve().parent / "data" / "synthetic_compare.json"
#: overrides that leave that budget as it is: which method or seed, where and how the run is logged
NEUTRAL = ("seed", "method", "logger", "trainer.progress", "device", "data.num_workers", "hydra", "model")


def comparison(overrides: list[str], network: str) -> str | None:
    """The line that tells what a default-budget run just showed: the methods as ``make compare``
    measured them at that budget with this network; None when the run changed the budget."""
    if not REFERENCE.is_file():
        return None
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if not all(k.split(".")[0] in NEUTRAL or k in NEUTRAL for k in keys):
        return None
    record = json.loads(REFERENCE.read_text())
    rows = [r for r in record["rows"] if r["network"] == network]
    if not rows:
        return None

    def cell(r: dict) -> str:
        text = f"{r['mean']:.2f}" + (f" [{r['low']:.2f}, {r['high']:.2f}]" if r.get("low") is not None else "")
        d = r.get("difference")
        if d and d["low"] is not None:
            text += f" ({d['verdict']} {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] to {d['to']})"
        return text

    cells = ", ".join(f"{r['method']} {cell(r)}" for r in rows if r["labels"] != "all")
    bound = next((f"; SupOnly on all {r['labeled']} labels {cell(r)}" for r in rows if r["labels"] == "all"), "")
    seeds = f"{min(record['seeds'])}-{max(record['seeds'])}"
    lines = [f"  compare    make compare at this budget ({network}, seeds {seeds}, {record['date']}), % mIoU, mean "
             f"[95 % interval] (difference paired by seed): {cells}{bound}"]
    if moved := max(record.get("moved") or [], key=lambda m: m["max_abs"], default=None):
        lines.append(f"             a run of one seed may land {moved['max_abs']:.2f} points from that seed's value in the "
                     f"table: the same seed moved that far {moved['between']} (the order of float sums differs "
                     "between machines and thread counts, and training amplifies it)")
    lines.append("             (README: Results on the embedded dataset)")
    return "\n".join(lines)


# --- the Hydra callbacks of the train command (conf/train.yaml: hydra.callbacks) -------------------------
class SweepParentRun(Callback):
    """A ``--multirun`` opens one MLflow parent run, under which every job's run nests (gta/tracking/sweep.py):
    opened when the multirun starts, closed when it ends.

    A sweep that stops on a failed job never reaches ``on_multirun_end``; the parent is then closed
    as FAILED when the launching process exits.
    """

    def __init__(self) -> None:
        self._parent: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Launchers pickle the callbacks to the jobs; the open parent stays in the launching process.
        return {**self.__dict__, "_parent": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Under torchrun every process runs the sweep; rank 0 opens the parent, the others log nothing.
        if not uses_mlflow(config) or int(os.environ.get("RANK", 0)) != 0:
            return
        from gta.tracking.mlflow import MLflowLogger, resolve_tracking_uri

        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        uri = resolve_tracking_uri(config.logger.tracking_uri)
        previous = SweepParent.read(sweep_dir)
        overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        grid = grid_keys(config)
        if previous is not None and previous.tracking_uri == uri and previous.run_id:
            # The same sweep again (resuming): its jobs join the runs already under this parent.
            logger = MLflowLogger(uri, run_id=previous.run_id, fallback_dir=sweep_dir)
        else:
            # the file names the jobs' runs after the grid now, and their parent once the server has created it
            SweepParent(uri, None, None, tuple(grid)).write(sweep_dir)
            table = OmegaConf.select(config, "report.table")
            experiment = OmegaConf.select(config, "hydra.runtime.choices.experiment")
            tags = sweep_tags(config, overrides, experiment) | {"sweep_dir": str(sweep_dir)}
            # named after its grid: "table4: method × seed"
            name = " × ".join(grid) or "sweep"
            logger = MLflowLogger(
                uri, experiment_name=config.logger.experiment_name, fallback_dir=sweep_dir,
                run_name=f"{table}: {name}" if table else name, tags=tags, publish=str(sweep_dir / PARENT_FILE),
            )
        self._parent = logger
        atexit.register(self._close, "FAILED")
        print(f"[sweep] parent {logger.location}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent is not None:
            multirun = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
            if multirun.is_file():
                self._parent.log_artifact(multirun)
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self._parent is not None:
            self._parent.close(status)
            self._parent = None


class SharedStartTime(Callback):
    """One run directory for all processes of a torchrun launch (gta/engine/distributed.py).

    Every process composes the config itself, so Hydra's ``${now:...}`` in ``hydra.run.dir`` and
    ``hydra.sweep.dir`` would take each process's own start time, and processes that start a second
    apart would write into different directories. This makes ``now`` rank 0's start time everywhere,
    before Hydra creates the directory. (Tasks of a submitit job receive the launcher's config, already
    resolved, and need nothing.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _share_start_time(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _share_start_time(config, "hydra.sweep.dir")


def _share_start_time(config: DictConfig, key: str) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    start: datetime = distributed.setup(str(config.device)).broadcast_object(datetime.now())
    OmegaConf.register_new_resolver("now", lambda pattern: start.strftime(pattern), use_cache=True, replace=True)
    # Resolving caches the value in this config; a sweep's job configs copy that cache (Hydra's
    # load_sweep_config), so they keep rank 0's time after Hydra registers its own resolver again.
    OmegaConf.select(config, key)
