"""``python -m gta <command> [hydra overrides]``: one Hydra application per command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from gta.config import register_configs

#: The config tree ships beside the package (a cloned or editable checkout).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


def hydra_command(name: str, module: str) -> Callable[[], Any]:
    """A Hydra application composing ``conf/<name>.yaml`` and handing it to ``gta.<module>.run``; the
    module is imported only when the command runs, so ``--help`` stays fast."""

    @hydra.main(config_path=CONF_DIR, config_name=name, version_base="1.3")
    def command(cfg: DictConfig) -> Any:
        return importlib.import_module(f"gta.{module}").run(cfg)

    return command


def report() -> None:
    """Tabulate a sweep like the paper (``python -m gta report --help``)."""
    from gta.report import main as report_main

    report_main(sys.argv[1:])


COMMANDS = {
    "train": hydra_command("train", "train"),
    "eval": hydra_command("eval", "eval"),
    "predict": hydra_command("predict", "predict"),
    "export": hydra_command("export", "export"),
    "report": report,
}
USAGE = "usage: python -m gta {" + ",".join(COMMANDS) + "} [key=value ...] [--multirun] [--help]"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command '{argv[0]}'", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    # Hydra reads its overrides from sys.argv.
    sys.argv = [f"gta {command}", *rest]
    COMMANDS[command]()
