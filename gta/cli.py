"""``gta <command> [hydra overrides]`` (or ``python -m gta ...``): one Hydra application per command.

A command that fails on the user's input ends with one message and exit status 1, without a traceback and
without Hydra's lines around it: a :class:`gta.errors.UserError` (a missing dataset root, a bad list, an
impossible split, a corrupt file, a bad config value, an unreachable server) prints its message; a config
that does not compose (an unknown key or group option) prints what is wrong, what exists and the nearest
name (:mod:`gta.suggest`). ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, ConfigCompositionException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from gta.config import CONF_DIR
from gta.errors import UserError
from gta.schema import register_configs

register_configs()

#: Hydra's own debug switch as the user set it: ``HYDRA_FULL_ERROR=1`` shows every error's complete traceback.
#: (``main`` sets it for Hydra while a command runs, so that Hydra raises what it would print.)
FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"

#: the documentation, inside the package: in a checkout gta/docs links to docs/, a wheel carries a copy
DOCS_DIR = Path(__file__).resolve().parent / "docs"


def user_error(error: BaseException) -> UserError | None:
    """``error`` if it is a user error, or the user error a failed ``hydra.utils.instantiate`` wraps."""
    while isinstance(error, InstantiationException):
        error = error.__cause__
    return error if isinstance(error, UserError) else None


def explain(error: Exception, config_name: str, overrides: list[str]) -> str | None:
    """What to print for an error of the user's input, or None for a bug (which keeps its traceback)."""
    user = user_error(error)
    if user is not None:
        return str(user)
    if isinstance(error, ConfigCompositionException):
        from gta.suggest import explain_composition

        message = explain_composition(error, config_name, overrides)
        if message is not None:
            return message
    if isinstance(error, CompactHydraException):  # what Hydra itself would print, without its stack pointer
        cause = error.__cause__
        return f"{error}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(error)
    return None


def hydra_command(name: str, module: str) -> Callable[[], Any]:
    """A Hydra application composing ``conf/<name>.yaml`` and handing it to ``gta.<module>.run``; the
    module is imported only when the command runs, so ``--help`` stays fast."""

    @hydra.main(config_path=CONF_DIR, config_name=name, version_base="1.3")
    def command(cfg: DictConfig) -> Any:
        try:
            return importlib.import_module(f"gta.{module}").run(cfg)
        except Exception as error:
            user = user_error(error)
            if user is None:
                raise
            # A multirun's failed job is named by Hydra ("Error executing job with overrides"), then ``main``
            # prints the message; a single run prints it here, before Hydra would name an empty override list.
            if FULL_ERROR or HydraConfig.get().mode == RunMode.MULTIRUN:
                if user is not error:  # unwrapped: a job of another process returns its error pickled, causeless
                    raise user from error
                raise
            print(user, file=sys.stderr)
            raise SystemExit(1) from None

    return command


def plain_command(module: str) -> Callable[[], None]:
    """A command of its own arguments (``gta <command> --help``): ``gta.<module>.main``."""

    def command() -> None:
        importlib.import_module(f"gta.{module}").main(sys.argv[1:])

    return command


def docs_command() -> None:
    """Where the documentation of the installed package is, and what each file covers."""
    print(f"gta's documentation: {DOCS_DIR}")
    for path in sorted(DOCS_DIR.glob("*.md")):
        title = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"  {path.name:<15} {title}")


@dataclass(frozen=True)
class Command:
    run: Callable[[], Any]
    #: what it does, in one line
    summary: str
    #: its arguments in one example
    example: str
    #: the Hydra config it composes (None: a command of its own arguments)
    config: str | None = None


def hydra_entry(name: str, summary: str, example: str) -> Command:
    return Command(hydra_command(name, name), summary, example, name)


COMMANDS = {
    "train": hydra_entry("train", "train a method on a dataset, evaluate it, log the run",
                         "method=mean_teacher dataset=folder dataset.root=data/mine dataset.num_classes=5"),
    "check": hydra_entry("check", "read every image and mask of a run's data and list those that cannot be used",
                         "dataset=folder dataset.root=data/mine dataset.num_classes=5"),
    "eval": hydra_entry("eval", "evaluate a saved model on its run's validation set",
                        "checkpoint=RUN_DIR/teacher.pt"),
    "predict": hydra_entry("predict", "segment image files with a saved model",
                           "checkpoint=RUN_DIR/teacher.pt input=photos/ output=masks/"),
    "export": hydra_entry("export", "write a saved model as a file for use outside Python (torch.export, ONNX)",
                          "checkpoint=RUN_DIR/teacher.pt output=model.pt2"),
    "report": Command(plain_command("report"), "tabulate a sweep's runs as a paper table", "table4"),
    "sync": Command(plain_command("sync"), "send metrics that runs kept while their tracking server was away",
                    "outputs/"),
    "docs": Command(docs_command, "print where the documentation is", ""),
}


def program() -> str:
    """The command line the user typed to call gta: ``gta`` (the installed script) or ``python -m gta``."""
    return "gta" if Path(sys.argv[0]).name == "gta" else "python -m gta"


def usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} <command> [key=value ...] [--multirun] [--help]", "", "commands:"]
    for name, command in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {command.summary}")
        lines.append(f"  {'':<{width}}    {prog} {name} {command.example}".rstrip())
    lines += ["", f"{prog} <command> --help: the command's options; the documentation: {DOCS_DIR}"]
    return "\n".join(lines)


#: the config groups a person chooses from; the others are chosen for them (method_recipe by the method and the
#: dataset)
HIDDEN_GROUPS = ("method_recipe",)


def group_options(group: Path) -> list[str]:
    """A group's options, as ``group=option`` takes them (an experiment's sub-folder is part of its name)."""
    return sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))


def command_help(prog: str, name: str, command: Command) -> str:
    """``gta <command> --help`` of a Hydra command: what its config file says it does, the groups it chooses
    from and their options, where to see every key, where the documentation is."""
    conf = Path(CONF_DIR)
    header = []
    for line in (conf / f"{command.config}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    lines = [f"usage: {prog} {name} [key=value ...] [--multirun]", f"{command.summary}; e.g.",
             f"  {prog} {name} {command.example}", "", *header]
    if name in ("train", "check"):
        groups = sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in HIDDEN_GROUPS)
        width = max(len(g.name) for g in groups)
        lines += ["", "config groups (group=option; experiment is +experiment=option):"]
        lines += [f"  {g.name:<{width}}  {', '.join(group_options(g))}" for g in groups]
    lines += [
        "",
        f"every key with its value: {prog} {name} [key=value ...] --cfg job; Hydra's own help: --hydra-help",
        f"documentation: {DOCS_DIR} ({prog} docs)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    prog = program()
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(prog), file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"unknown command '{argv[0]}'", file=sys.stderr)
        sys.exit(0 if asked else 2)
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    if command.config is not None and ("--help" in rest or "-h" in rest):
        print(command_help(prog, name, command))
        return
    # Hydra and argparse read their arguments from sys.argv.
    sys.argv = [f"{prog} {name}", *rest]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it would print with its own lines around it
    try:
        command.run()
    except Exception as error:
        message = None if FULL_ERROR else explain(error, command.config or name, rest)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
