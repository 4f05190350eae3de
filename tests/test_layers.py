"""The dependency rules of the package, checked two ways.

Statically, for every module under gta/: its imports (those inside functions too) point down the layers
of ``LAYERS`` and never form a circle. At run time, by importing each layer in a fresh interpreter and
looking at what got loaded: data, models and methods never load the engine; the engine loads no method,
no dataset and no Hydra; the commands that load a saved model do not load another command."""

from __future__ import annotations

import ast
import json

import pytest
from helpers import ROOT, python

#: the layers below the commands, by module prefix, each with the layers it may import; every other module
#: of the package is a command (cli, train, eval, the config tree, ...), which may import any layer
LAYERS = {
    "base": (["gta", "gta.errors", "gta.stats"], []),
    "contract": (["gta.contract"], ["base"]),
    "tracking": (["gta.tracking"], ["base"]),
    "data": (["gta.data"], ["base", "contract"]),
    "models": (["gta.models"], ["base", "contract"]),
    "methods": (["gta.methods"], ["base", "contract"]),
    "engine": (["gta.engine"], ["base", "contract", "tracking"]),
}
COMMANDS = "commands"


def layer_of(module: str) -> str:
    """The layer of a module: the one with the longest prefix matching it (``gta`` itself is only the
    package's ``__init__``), else the commands."""
    matches = [(len(prefix), layer) for layer, (prefixes, _) in LAYERS.items() for prefix in prefixes
               if module.startswith(prefix + ".") and prefix != "gta" or module == prefix]
    return max(matches)[1] if matches else COMMANDS


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (a package by its ``__init__``), parsed."""
    found = {}
    for path in sorted((ROOT / "gta").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
    return found


def imports() -> dict[str, set[str]]:
    """The modules of the package each module imports, anywhere in it: ``from X import Y`` counts as X.Y
    when that is a module, else as X."""
    parsed = modules()
    graph = {}
    for name, (tree, is_package) in parsed.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in parsed else base)
        graph[name] = {t for t in targets if t in parsed and t != name}
    return graph


def test_every_import_points_down_the_layers():
    upward = []
    for module, targets in imports().items():
        layer = layer_of(module)
        if layer == COMMANDS:
            continue
        allowed = {layer, *LAYERS[layer][1]}
        upward += [f"{module} ({layer}) imports {t} ({layer_of(t)})" for t in sorted(targets)
                   if layer_of(t) not in allowed]
    assert upward == [], "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = imports()
    circles = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                circle = path[path.index(target):]
                first = circle.index(min(circle))
                circles.add(" -> ".join([*circle[first:], *circle[:first], min(circle)]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))


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
