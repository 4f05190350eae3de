"""The dependency rules of the package, checked by importing each layer in a fresh interpreter and
looking at what got loaded: data, models and methods never load the engine; the engine loads no method,
no dataset and no Hydra; the commands that load a saved model do not load another command."""

from __future__ import annotations

import json

import pytest
from helpers import python

RULES = {
    # layer: modules (prefixes) it must not load
    "gta.contract": ["gta.methods", "gta.engine", "gta.data", "gta.models", "gta.tracking"],
    "gta.methods": ["gta.engine", "gta.data", "gta.models", "gta.tracking", "hydra"],
    "gta.data": ["gta.engine", "gta.methods", "gta.models", "gta.tracking", "hydra"],
    "gta.models": ["gta.engine", "gta.methods", "gta.data", "gta.tracking", "hydra"],
    "gta.tracking": ["gta.engine", "gta.methods", "gta.data", "gta.models", "mlflow"],
    "gta.engine.trainer": ["gta.methods", "gta.data", "gta.models", "hydra", "mlflow"],
    "gta.predict": ["gta.eval", "gta.train", "gta.cli"],
    "gta.export": ["gta.eval", "gta.train", "gta.cli"],
    "gta.report": ["gta.cli", "gta.train", "gta.engine"],
}


def loaded_by(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    return json.loads(python("-c", code).stdout)


@pytest.mark.parametrize("layer", RULES)
def test_each_layer_loads_only_what_it_may(layer):
    loaded = loaded_by(layer)
    assert layer in loaded
    forbidden = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in RULES[layer])]
    assert forbidden == [], f"importing {layer} loads {forbidden}"
