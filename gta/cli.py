"""``python -m gta <command> [hydra overrides]``: one Hydra application per command.

A command that fails on the user's input (a :class:`gta.errors.UserError`: a missing dataset root, a bad
list, an impossible split, a corrupt file, a bad config value, an unreachable tracking server) ends with
that error's message alone and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig

from gta.config import CONF_DIR
from gta.errors import UserError
from gta.schema import register_configs

register_configs()


class CommandFailed(CompactHydraException):
    """A user error's message: Hydra prints a compact exception's message without a traceback and exits
    with status 1 (in a ``--multirun``, after the other jobs, naming the failed job's overrides)."""


def user_error(error: BaseException) -> UserError | None:
    """``error`` if it is a user error, or the user error a failed ``hydra.utils.instantiate`` wraps."""
    while isinstance(error, InstantiationException):
        error = error.__cause__
    return error if isinstance(error, UserError) else None


def full_error() -> bool:
    """Hydra's own debug switch: ``HYDRA_FULL_ERROR=1`` shows every error's complete traceback."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def hydra_command(name: str, module: str) -> Callable[[], Any]:
    """A Hydra application composing ``conf/<name>.yaml`` and handing it to ``gta.<module>.run``; the
    module is imported only when the command runs, so ``--help`` stays fast."""

    @hydra.main(config_path=CONF_DIR, config_name=name, version_base="1.3")
    def command(cfg: DictConfig) -> Any:
        try:
            return importlib.import_module(f"gta.{module}").run(cfg)
        except Exception as error:
            user = user_error(error)
            if user is None or full_error():
                raise
            raise CommandFailed(str(user)) from None

    return command


def plain_command(module: str) -> Callable[[], None]:
    """A command of its own arguments (``python -m gta <command> --help``): ``gta.<module>.main``, a user
    error ending it with its message alone and exit status 1."""

    def command() -> None:
        main = importlib.import_module(f"gta.{module}").main
        try:
            main(sys.argv[1:])
        except UserError as error:
            if full_error():
                raise
            print(error, file=sys.stderr)
            sys.exit(1)

    return command


COMMANDS = {
    "train": hydra_command("train", "train"),
    "check": hydra_command("check", "check"),
    "eval": hydra_command("eval", "eval"),
    "predict": hydra_command("predict", "predict"),
    "export": hydra_command("export", "export"),
    "report": plain_command("report"),
    "sync": plain_command("sync"),
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
