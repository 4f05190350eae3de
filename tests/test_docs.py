"""Every ``python -m gta ...`` / ``gta ...`` command that README.md and docs/*.md show, in fenced code blocks
and inline code, composes: a Hydra command's config is printed with ``--cfg job --resolve`` (nothing trains;
a sweep's first and last job), ``report`` and ``sync`` answer ``--help``. What cannot compose here is skipped
by ``CANNOT_COMPOSE`` only, each entry with its reason."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
from helpers import ROOT
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from gta import cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a command containing one of these is not composed: why
CANNOT_COMPOSE = {
    "my_conf": "the config directory of the user's own package, which the page only describes",
    "$SEARCH": "docs/extending.md's example package, on Hydra's search path only inside its ext/ directory",
}
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "&"}
#: the shell variables the pages' commands use, with a value the shell would put in their place
SHELL_VARIABLES = {"SLURM_JOB_ID": "1234"}


def snippets(text: str) -> list[str]:
    """The shell lines of the fenced code blocks (continuation lines joined) and the inline code spans."""
    found = []
    blocks = re.split(r"^```.*$", text, flags=re.MULTILINE)
    for i, block in enumerate(blocks):
        if i % 2:
            found += block.replace("\\\n", " ").splitlines()
        else:
            found += re.findall(r"`([^`\n]+)`", block)
    return found


def commands(line: str) -> list[list[str]]:
    """``[command, *arguments]`` of each gta command on a shell line: ``gta <command>`` or
    ``python -m gta <command>`` (also after torchrun), up to a shell operator or a comment; the shell
    variables of ``SHELL_VARIABLES`` expanded, a ``...`` (the rest of the command) left out."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # a line of prose or output with an unmatched quote; never a command's
        assert not re.search(r"(^|-m )gta \w", line), f"a command the shell cannot read: {line}"
        return []
    found = []
    for i, word in enumerate(words[:-1]):
        if word == "gta" and (i == 0 or words[i - 1] == "-m") and words[i + 1] in cli.COMMANDS:
            rest = words[i + 1:]
            end = next((k for k, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
            found.append([expand(w) for w in rest[:end] if w != "..."])
    return found


def expand(word: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARIABLES.get(m[1], m[0]), word)


def documented() -> list[tuple[str, list[str]]]:
    return [(f"{path.relative_to(ROOT)}: {shlex.join(command)}", command)
            for path in DOCS for line in snippets(path.read_text()) for command in commands(line)]


COMMANDS = documented()


def run(argv: list[str]) -> tuple[int, str]:
    """``python -m gta *argv`` in this process: its exit status and what it printed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            cli.main(argv)
    except SystemExit as end:
        return end.code or 0, out.getvalue()
    return 0, out.getvalue()


def jobs(arguments: list[str]) -> list[list[str]]:
    """The overrides of each job a command runs: one, or a ``--multirun``'s first and last."""
    overrides = [a for a in arguments if a not in ("--multirun", "-m")]
    if len(overrides) == len(arguments):
        return [overrides]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    every = [job for batch in batches for job in batch]
    return [every[0], every[-1]]


def test_the_docs_show_commands():
    shown = {name for _, (name, *_) in COMMANDS}
    assert {"train", "eval", "predict", "export", "check", "report", "sync"} <= shown, shown
    assert any(c == ["train", "dataset=cityscapes", "split=744", "dataset.root=/data/cityscapes"] for _, c in COMMANDS)


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_every_documented_command_composes(command):
    skip = [reason for mark, reason in CANNOT_COMPOSE.items() if any(mark in a for a in command)]
    if skip:
        pytest.skip(skip[0])
    name, *arguments = command
    if name in ("report", "sync"):
        code, printed = run([name, "--help"])
        assert code == 0 and "usage:" in printed, printed
        return
    for overrides in jobs([a for a in arguments if a != "--help"]):
        code, printed = run([name, "--cfg", "job", "--resolve", *overrides])
        assert code == 0, f"python -m gta {name} {shlex.join(overrides)}:\n{printed}"
