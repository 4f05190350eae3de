"""A hold on a job's progress for the cluster tests, so that a signal or an outage lands where a test says it does
on a machine of any speed: GTA-Seg whose training step waits while the file ``$GTA_TEST_PAUSE/<job>`` (``<job>``: the
SLURM array task) holds an iteration it has reached, after writing that iteration to ``<job>.paused`` beside it
(``method._target_=tests.pausing.PausedGTASeg``; ``tests/cluster.py: Gates`` moves and opens the gates)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gta.methods import GTASeg


def hold(gate: Path) -> int | None:
    try:
        return int(gate.read_text())
    except FileNotFoundError:
        return None


class PausedGTASeg(GTASeg):
    def training_step(self, batch, progress, update):
        folder = os.environ.get("GTA_TEST_PAUSE")
        if folder:
            gate = Path(folder) / os.environ.get("SLURM_ARRAY_TASK_ID", "0")
            while (at := hold(gate)) is not None and progress.iteration >= at:
                gate.with_suffix(".paused").write_text(str(progress.iteration))
                time.sleep(0.1)
        return super().training_step(batch, progress, update)
