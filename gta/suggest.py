"""One line for a config that does not compose: the unknown key or group option, what exists there instead,
and the nearest name (``method.dorp: no such key of method=gta; did you mean drop? Its keys: ...``).

Hydra's own message advises appending the key (``+method.dorp=...``), which only moves the failure to where
the class is built; this one suggests appending only a key that the node's ``_target_`` takes.
"""

from __future__ import annotations

import difflib
import inspect

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from gta.config import CONF_DIR


def did_you_mean(name: str, candidates: list[str]) -> str:
    """``"; did you mean X?"`` for the candidate nearest ``name``, or a full stop when none is near."""
    near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else "."


def explain_composition(error: ConfigCompositionException, config_name: str, overrides: list[str]) -> str | None:
    """The line for an unknown group option or key, or None for another composition error."""
    if isinstance(error, MissingConfigException) and "/" in (error.missing_cfg_file or ""):
        group, option = error.missing_cfg_file.rsplit("/", 1)
        # the schemas are gta's own, named only in config files' defaults lists (where a misspelt one is looked for)
        schemas = option.startswith("schema_")
        options = [o for o in error.options or [] if schemas or not o.startswith("schema_")]
        near = did_you_mean(option, options)
        return f"{group}={option}: no such option of {group}{near} Its options: {', '.join(options)}"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return unknown_key(cause.full_key, config_name, overrides)
    return None


def unknown_key(full_key: str, config_name: str, overrides: list[str]) -> str | None:
    """The line for ``full_key``, which its node lacks: the node's keys, read from the config composed without
    the override that set it."""
    parent, _, key = full_key.rpartition(".")
    cfg = compose_without(full_key, config_name, overrides)
    node = OmegaConf.select(cfg, parent) if cfg is not None and parent else cfg
    if not isinstance(node, DictConfig):
        return None
    choice = cfg.hydra.runtime.choices.get(parent)
    where = f"{parent}={choice}" if choice else (parent or f"the {config_name} config")
    target = node.get("_target_")
    if isinstance(target, str) and key in parameters(target):
        return (f"{full_key}: {where} does not set it, though {target} takes it: add it with +{full_key}=VALUE, "
                f"or in a config file")
    keys = [k for k in node if not str(k).startswith("_") and k != "hydra"]
    return f"{full_key}: no such key of {where}{did_you_mean(key, keys)} Its keys: {', '.join(keys)}"


def parameters(target: str) -> list[str]:
    """The names of the arguments ``target`` (a class or function, by import path) takes; none if it does not
    import."""
    try:
        return list(inspect.signature(get_object(target)).parameters)
    except (ImportError, ValueError, TypeError):
        return []


def compose_without(full_key: str, config_name: str, overrides: list[str]) -> DictConfig | None:
    """The config with Hydra's node, composed from ``overrides`` less the ones that set ``full_key`` and the
    sweeps (one value of each is enough to tell the keys); None when it does not compose either."""
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException:  # a flag's value (--config-dir DIR) is no override
        return None
    kept = [o.input_line for o in parsed if o.key_or_group != full_key and not o.is_sweep_override()]
    GlobalHydra.instance().clear()  # the failed command leaves Hydra initialised
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, overrides=kept, return_hydra_config=True)
    except HydraException:
        return None
