"""Run ``python -m gta ...`` as a user would, on tiny synthetic data, in a subprocess of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny(data_root: Path) -> list[str]:
    """A run of a few seconds on the CPU: 8 labeled, 8 unlabeled, 4 validation images of 32 px."""
    return [
        f"dataset.root={data_root}", "dataset.num_labeled_pool=8", "dataset.num_unlabeled=8",
        "dataset.num_val=4", "dataset.image_size=32", "dataset.crop_size=32", "split=4",
        "model=deeplabv3plus_small", "data.batch_size=2", "data.num_workers=0", "data.val_batch_size=4",
        "trainer.iters=2", "trainer.eval_every=0", "device=cpu",
    ]


def gta(*args: str, cwd: Path | None = None, timeout: float = 600, ok: bool = True) -> subprocess.CompletedProcess:
    """``python -m gta *args`` with this interpreter and this checkout first on the path; fails loudly
    unless it exits 0 (``ok=False``: whatever it exits with)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HYDRA_FULL_ERROR": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gta", *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0 or not ok, f"python -m gta {' '.join(args)} failed:\n{output}"
    return result
