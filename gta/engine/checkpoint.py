"""Full-state checkpoints: written atomically, loaded as plain data, checked against the models they fill.

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts), so it loads with
``torch.load(weights_only=True)`` and never runs code from the file:

    format       FORMAT, bumped when the layout changes
    models       {name: state_dict} of every model of the method (``checkpoint["models"]["teacher"]``)
    optimizers   {name: state_dict} of every optimiser
    scalers      {name: GradScaler state_dict} of every optimiser under trainer.precision=fp16, else empty
    iteration    iterations completed; with iters_per_epoch it fixes the epoch and the sampler position
    iters_per_epoch
    rng          Python, NumPy, torch CPU and CUDA generator states (of rank 0 when data-parallel)
    rng_other_ranks
                 the same for ranks 1, 2, ... of a data-parallel run (empty for one process)
    best         {"step", "miou"} of the best evaluation so far, or None
    metrics      the training losses summed since the last log step (averaged over the ranks), so logged
                 averages do not change
    run_id       the tracking run to continue, or None

Files are written to a temporary sibling, fsynced and renamed over the old one, so a kill or a full disk
during a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gta.errors import MissingPathError, UnwritablePathError, UserError

FORMAT = 2
#: formats load_checkpoint reads, each upgraded to FORMAT (1: before scalers)
READABLE = (1, 2)
LAST, BEST = "last.pt", "best.pt"
_TMP_SUFFIX = ".tmp"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read, or does not fit the run it is loaded into."""


# --- files -----------------------------------------------------------------------------------------
def save_atomic(state: Mapping, path: Path) -> None:
    """Write ``state`` to ``path`` so that ``path`` always holds either the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to other files
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint exists"
            reason = err.strerror or err
            raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from err
        raise
    # The rename itself must reach the disk too, or a power cut could bring the old directory entry back.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint as plain data (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint (truncated, not a torch file, or it holds objects other "
            f"than plain data, which are never unpickled): {first_line}"
        ) from err
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a gta checkpoint of a format this version reads {READABLE} (found format {found!r})"
        )
    if state["format"] == 1:
        state["scalers"] = {}
    state["format"] = FORMAT
    return state


class Checkpointer:
    """``<directory>/last.pt`` and ``<directory>/best.pt``; removes temporary files of interrupted writes."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UnwritablePathError(
                f"cannot create the checkpoint directory {directory}: {err.strerror}"
            ) from err
        if not os.access(directory, os.W_OK):
            raise UnwritablePathError(f"the checkpoint directory {directory} is not writable")
        self.directory = directory
        for stale in directory.glob(f".*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @property
    def best(self) -> Path:
        return self.directory / BEST

    def save(self, state: Mapping, best: bool = False) -> Path:
        path = self.best if best else self.last
        save_atomic(state, path)
        return path


# --- random number generators ----------------------------------------------------------------------
def rng_state() -> dict:
    """Every generator training draws from, as plain data."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (str(name), key.tolist(), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# --- the training state ----------------------------------------------------------------------------
def capture(models: Mapping[str, nn.Module], optimizers: Mapping, scalers: Mapping, dist) -> dict:
    """The models, optimisers, loss scalers and every rank's generators, as checkpoint entries.

    With several processes every rank must call it: it gathers their generators."""
    rng = dist.gather_object(rng_state())
    return {
        "format": FORMAT,
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "scalers": {name: scaler.state_dict() for name, scaler in scalers.items()},
        "rng": rng[0],
        "rng_other_ranks": rng[1:],
    }


def restore(state: Mapping, models: Mapping[str, nn.Module], optimizers: Mapping, scalers: Mapping, dist,
            source: Path | str) -> None:
    """Load what :func:`capture` saved, or fail naming what does not fit."""
    load_models(models, state["models"], source)
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, scaler in scalers.items():
        if name in state["scalers"]:  # else the checkpoint was not written in fp16: the scale starts afresh
            scaler.load_state_dict(state["scalers"][name])
    saved_rng = [state["rng"], *state.get("rng_other_ranks", [])]
    if len(saved_rng) != dist.world_size and dist.is_main:
        warnings.warn(
            f"{source} was written by {len(saved_rng)} processes, this run has {dist.world_size}: ranks "
            "without a saved random state keep a fresh one, so the run does not continue exactly",
            RuntimeWarning, 3,
        )
    if dist.rank < len(saved_rng):
        set_rng_state(saved_rng[dist.rank])


# --- models ----------------------------------------------------------------------------------------
def _shape(value) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def describe_mismatch(expected: Mapping, found: Mapping, limit: int = 5) -> list[str]:
    """What differs between the state dict a model expects and one from a checkpoint."""
    problems = []
    for key in expected:
        if key in found and _shape(expected[key]) != _shape(found[key]):
            problems.append(
                f"{key} has shape {_shape(found[key])} in the checkpoint, {_shape(expected[key])} here"
            )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"{len(missing)} entries missing from the checkpoint, e.g. {missing[:limit]}")
    if unexpected:
        problems.append(f"{len(unexpected)} entries the model does not have, e.g. {unexpected[:limit]}")
    return problems[: limit + 2]


def load_models(models: Mapping[str, nn.Module], saved: Mapping[str, Mapping], source: Path | str) -> None:
    """Load every model from ``saved``, or fail naming what does not fit (names, keys, shapes)."""
    if set(saved) != set(models):
        raise CheckpointError(f"{source} holds models {sorted(saved)}, this method has {sorted(models)}")
    for name, model in models.items():
        problems = describe_mismatch(model.state_dict(), saved[name])
        if problems:
            raise CheckpointError(
                f"{source} does not fit model '{name}' (another architecture or class count?):\n  "
                + "\n  ".join(problems)
            )
        model.load_state_dict(saved[name])
