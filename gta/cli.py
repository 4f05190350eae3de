"""``python -m gta <command> [hydra overrides]``: one Hydra application per command."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gta.config import register_configs

#: The config tree ships beside the package (a cloned or editable checkout).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float:
    from gta.train import run

    return run(cfg)


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> float:
    from gta.eval import run

    return run(cfg)


@hydra.main(config_path=CONF_DIR, config_name="predict", version_base="1.3")
def predict(cfg: DictConfig) -> int:
    from gta.predict import run

    return run(cfg)


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def export(cfg: DictConfig) -> Path:
    from gta.export import run

    return run(cfg)


def report() -> None:
    """Tabulate a sweep like the paper (``python -m gta report --help``)."""
    from gta.report import main as report_main

    report_main(sys.argv[1:])


COMMANDS = {"train": train, "eval": evaluate, "predict": predict, "export": export, "report": report}
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
