"""Errors in what the user gave: a path, a list, a dataset file, a config value.

Their message names the input at fault and says what to do, so the command line (``gta.cli``) prints
that message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows it). Every other exception is a
bug and keeps its traceback. Each class also derives from the built-in exception it refines, so code
that catches ``ValueError`` or ``FileNotFoundError`` catches these too.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BadSampleError",
    "ConfigError",
    "ContractError",
    "DataError",
    "MissingFilesError",
    "MissingPathError",
    "NoRunsError",
    "OccupiedPathError",
    "UnavailableWeightsError",
    "UnreachableServerError",
    "UnwritablePathError",
    "UserError",
]


class UserError(Exception):
    """The user's input is at fault; the message says which and what to do."""


class ConfigError(UserError, ValueError):
    """A setting (a config value or a command-line override) that cannot work."""


class ContractError(UserError, TypeError):
    """A class that a config's ``_target_`` names lacks what its extension point requires (gta/contract.py)."""


class DataError(UserError, ValueError):
    """A dataset whose lists or files do not fit together, or do not fit the config."""


class BadSampleError(DataError):
    """One sample's image or mask cannot be used (unreadable, wrongly sized, labels outside the classes).

    ``problem`` is a few words for a table of problems, ``path`` the file at fault."""

    def __init__(self, message: str, path: Path | str | None = None, problem: str = "unusable") -> None:
        super().__init__(message)
        self.path, self.problem = path, problem


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory that the config names, or that a dataset's layout requires, does not exist."""


class MissingFilesError(MissingPathError):
    """Listed samples whose image or mask file does not exist; ``missing`` holds ``(sample id, path)``
    for every one of them (the message names the first few)."""

    def __init__(self, message: str, missing: list[tuple[str, Path]] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


class OccupiedPathError(UserError, FileExistsError):
    """A path the config names holds something else, which is not overwritten."""


class UnwritablePathError(UserError, PermissionError):
    """A directory or file the run must write to is not writable."""


class UnreachableServerError(UserError, ConnectionError):
    """A server the config names does not answer."""


class UnavailableWeightsError(UserError, ConnectionError):
    """Pretrained weights the config asks for are neither in the local cache nor reachable over the network."""


class NoRunsError(UserError, LookupError):
    """What ``gta report`` was asked to tabulate holds no finished runs."""
