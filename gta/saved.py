"""A model saved by ``train``, rebuilt from its run's config: what ``eval``, ``predict`` and ``export`` load.

The network, the dataset's classes and its normalisation come from the run's resolved ``config.yaml``
(beside the checkpoint, or one directory up); the weights from the checkpoint, a ``<model>.pt`` state_dict
or a training-state checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gta.errors import ConfigError, MissingPathError

RUN_CONFIG = "config.yaml"
#: what conf/eval.yaml may change in the run's config
OVERRIDABLE = (
    "dataset.root", "eval.mode", "eval.crop_size", "eval.stride", "data.val_batch_size", "data.num_workers",
    "device",
)  # fmt: skip


def find_run_config(checkpoint: Path, config: str | None) -> Path:
    """``config`` if given, else the run's config.yaml beside the checkpoint or one directory up (for
    training-state checkpoints kept in ``<run_dir>/checkpoints/``)."""
    if config is not None:
        candidates = [Path(config).expanduser()]
    else:
        candidates = [checkpoint.parent / RUN_CONFIG, checkpoint.parent.parent / RUN_CONFIG]
    for path in candidates:
        if path.is_file():
            return path
    raise MissingPathError(
        f"No run config for {checkpoint}: looked for {', '.join(map(str, candidates))}. Pass config=PATH "
        "(the config.yaml a training run writes to its run directory)"
    )


def load_model_state(checkpoint: Path, model_name: str) -> dict[str, torch.Tensor]:
    """A Segmenter state_dict: the file itself, or ``models[model_name]`` of a training-state checkpoint."""
    if not checkpoint.is_file():
        raise MissingPathError(f"checkpoint: no file at {checkpoint}")
    try:  # every file train writes is plain data, which the restricted loader reads
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports truncated or foreign files in many ways
        raise ConfigError(f"checkpoint {checkpoint} cannot be read as a PyTorch file: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("models"), dict):
        if model_name not in state["models"]:
            raise ConfigError(
                f"checkpoint {checkpoint} holds the models {sorted(state['models'])}, not '{model_name}'; "
                "choose one with model_name=..."
            )
        state = state["models"][model_name]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {checkpoint} is neither a model state_dict nor a dict with 'models'")
    return state


def run_config(cfg: DictConfig) -> DictConfig:
    """The training run's config with this command's non-null values laid over it."""
    run_cfg = OmegaConf.load(find_run_config(Path(cfg.checkpoint).expanduser(), cfg.config))
    OmegaConf.set_struct(run_cfg, False)
    for key in OVERRIDABLE:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            OmegaConf.update(run_cfg, key, value, merge=False)
    return run_cfg


def load_model(cfg: DictConfig) -> tuple[nn.Module, DictConfig]:
    """The model saved in ``cfg.checkpoint`` (``cfg.model_name`` of a training-state checkpoint), on the CPU
    in eval mode, and its run's config with the command's values laid over it (:func:`run_config`)."""
    checkpoint = Path(cfg.checkpoint).expanduser()
    state = load_model_state(checkpoint, cfg.model_name)
    run_cfg = run_config(cfg)
    # The weights come from the checkpoint: never download or read pretrained weights.
    pretrained = getattr(get_class(run_cfg.model._target_), "pretrained_arguments", ())
    model = instantiate(run_cfg.model, **dict.fromkeys(pretrained))
    incompatible = model.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit the run's model ({run_cfg.model._target_}): missing "
            f"{incompatible.missing_keys[:3]}, unexpected {incompatible.unexpected_keys[:3]}"
        )
    return model.eval(), run_cfg
