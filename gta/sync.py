"""``python -m gta sync [PATH ...]``: send what runs kept in ``unsent_tracking.jsonl`` (metric values, params,
tags, files, their end) because their tracking server could not be reached when they ended. A run resumed in
the same directory sends its file itself; this is for runs that are over."""

from __future__ import annotations

import argparse
from pathlib import Path

from gta.errors import MissingPathError, UnreachableServerError
from gta.tracking.mlflow import UNSENT_FILE, replay_unsent


def main(argv: list[str]) -> None:
    what = f"send what runs kept in {UNSENT_FILE} while their tracking server was away"
    parser = argparse.ArgumentParser(description=what)
    parser.add_argument("paths", nargs="*", type=Path, default=[Path()],
                        help=f"run or sweep directories (searched for {UNSENT_FILE}) or such files; "
                             "default: the current directory")
    args = parser.parse_args(argv)
    files = []
    for path in args.paths:
        if not path.exists():
            raise MissingPathError(f"{path}: no such file or directory")
        # a sweep's own file (its parent run) before its jobs', whose runs nest under it
        files += [path] if path.is_file() else sorted(path.rglob(UNSENT_FILE), key=lambda f: (len(f.parts), f))
    if not files:
        print(f"nothing to send: no {UNSENT_FILE} under {', '.join(map(str, args.paths))}")
    failed = []
    for file in files:
        try:
            for run_id, count in replay_unsent(file).items():
                print(f"{file}: sent {count} records to run {run_id}")
        except UnreachableServerError as error:
            failed.append(str(error))
    if failed:
        raise UnreachableServerError("\n".join(failed))
