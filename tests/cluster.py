"""What the tests against the local SLURM cluster and MLflow server share (``scripts/cluster.sh`` starts them;
``make test`` starts and stops them; the fixtures ``lab`` and ``start_sweep`` are in conftest.py). Every sweep
trains seconds-long runs of the tiny synthetic dataset, one CPU per job."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import torch
from helpers import ROOT, gta
from mlflow import MlflowClient

from gta.tracking.sweep import SweepParent

CLUSTER = ROOT / "scripts" / "cluster.sh"


def slurm(*extra: str) -> list[str]:
    """launcher=slurm on the local cluster's CPU partition, one CPU per job."""
    return ["launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10", *extra]


def tracked(lab, name: str) -> list[str]:
    """Log to the tracking server, into an experiment of this test's own."""
    return ["logger=mlflow", f"logger.tracking_uri={lab['GTA_CLUSTER_TRACKING_URI']}",
            f"logger.experiment_name={name}-{uuid.uuid4().hex[:8]}", "trainer.snapshot_images=0"]


def sweep(sweep_dir: Path, *overrides: str, returncode: int | None = 0) -> subprocess.CompletedProcess:
    return gta("train", "--multirun", f"hydra.sweep.dir={sweep_dir}", *overrides, returncode=returncode)


def finish(process: subprocess.Popen, sweep_dir: Path, timeout: float = 300) -> str:
    process.wait(timeout)
    out = (sweep_dir.parent / f"{sweep_dir.name}.log").read_text()
    assert process.returncode == 0, out[-5000:]
    return out


def job_ids(sweep_dir: Path, count: int | None, timeout: float = 60) -> list[str]:
    """The SLURM ids of a sweep's ``count`` jobs (None: those there now), once submitted: ``<array>_<index>``, or
    the job's own for a single job."""
    folder = sweep_dir / ".submitit"
    end = time.monotonic() + timeout
    while True:
        ids = sorted((p.parent.name for p in folder.glob("*/*_submitted.pkl")),
                     key=lambda i: [int(n) for n in reversed(i.split("_"))])
        if count is None or len(ids) == count:
            return ids
        if time.monotonic() > end:
            raise AssertionError(f"{count} jobs never appeared in {folder}: {ids}")
        time.sleep(0.5)


def accounting(job: str, requeues: bool = False) -> list[dict[str, str]]:
    """sacct's records of ``job`` (an array: every task), as submitit reads them; with ``requeues``, one for each
    start of a requeued job (which keeps its id)."""
    out = subprocess.run(["sacct", "-X", "-P", *(["-D"] if requeues else []), "-j", job, "-o",
                          "JobID,State,Submit,Start,End,ExitCode"], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    keys = out[0].split("|")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out[1:]]


def wait_for(condition, what: str, timeout: float = 120, every: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"waited {timeout} s for {what}")


def children(lab, sweep_dir: Path):
    parent = SweepParent.read(sweep_dir)
    client = MlflowClient(lab["GTA_CLUSTER_TRACKING_URI"])
    runs = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    return client, parent, runs


def teacher(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "teacher.pt", map_location="cpu", weights_only=True)


def interrupt(job: str, log: Path) -> None:
    """A preemption as submitit's ``SlurmJob._interrupt()`` makes it: SIGTERM, then SIGUSR2, each sent with
    ``scancel --signal``. Sent back to back, the second was lost once in two tries (slurmstepd had marked the step
    cancelled), so each is sent once the job's log says the one before arrived."""
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for(lambda: "Bypassing signal SIGTERM" in log.read_text(), "SIGTERM to reach the job", timeout=30)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: "Caught signal SIGUSR2" in log.read_text(), "SIGUSR2 to reach the job", timeout=30)
