"""The record of the sample files a run's loaders skipped (``data.on_bad_sample=skip``):
``<run dir>/bad_samples.jsonl``, one JSON line per file, and their number as the ``data/bad_samples`` metric."""

from __future__ import annotations

import json
from pathlib import Path

from gta.engine.distributed import Distributed
from gta.tracking import Logger

#: in the run directory: one JSON line per sample file the loaders skipped
BAD_SAMPLES = "bad_samples.jsonl"


class BadSampleLog:
    def __init__(self, run_dir: Path, dist: Distributed) -> None:
        self.path, self.dist = run_dir / BAD_SAMPLES, dist
        self.files: set[str] = set()

    def start(self, resumed: bool) -> None:
        """A fresh run forgets another run's record in this directory; a resumed one reloads its own."""
        if not resumed:
            if self.dist.is_main:
                self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            self.files = {json.loads(line)["file"] for line in self.path.read_text().splitlines() if line}

    def record(self, skipped: list[tuple[str, str]], step: int, logger: Logger) -> None:
        """Append the ``(file, message)`` pairs every rank skipped since the last call and log their number
        so far. Runs on all ranks (it gathers), at the same steps."""
        found = self.dist.gather_object(skipped)
        new = {path: message for part in found for path, message in part if path not in self.files}
        if not new:
            return
        self.files.update(new)
        if self.dist.is_main:
            with open(self.path, "a") as record:
                for path, message in new.items():
                    record.write(json.dumps({"step": step, "file": path, "error": message}) + "\n")
        logger.log_metrics({"data/bad_samples": len(self.files)}, step=step)
