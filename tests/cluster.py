"""What the tests against the local SLURM cluster and MLflow server share (``scripts/cluster.sh`` starts them;
``make test`` starts and stops them; the fixtures ``lab`` and ``start_sweep`` are in conftest.py). Every sweep
trains seconds-long runs of the tiny synthetic dataset, one CPU per job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import torch
from helpers import ROOT, free_port, gta
from mlflow import MlflowClient

from gta.tracking.sweep import SweepParent

CLUSTER = ROOT / "scripts" / "cluster.sh"


def slurm(*extra: str) -> list[str]:
    """launcher=slurm on the local cluster's CPU partition, one CPU per job."""
    return ["launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10", *extra]


def tracked(lab, name: str, uri: str | None = None) -> list[str]:
    """Log to the tracking server (the cluster's unless ``uri``), into an experiment of this test's own."""
    return ["logger=mlflow", f"logger.tracking_uri={uri or lab['GTA_CLUSTER_TRACKING_URI']}",
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


def log_of(sweep_dir: Path, job: str) -> Path:
    """The standard error of a job's first task, where the trainer says what it received."""
    return sweep_dir / ".submitit" / job / f"{job}_0_log.err"


def received(log: Path, name: str) -> bool:
    return log.is_file() and f"{name} received" in log.read_text()


def interrupt(job: str, log: Path) -> None:
    """A preemption as submitit's ``SlurmJob._interrupt()`` makes it: SIGTERM, then SIGUSR2, each sent with
    ``scancel --signal``. Sent back to back, the second was lost once in two tries (slurmstepd had marked the step
    cancelled), so each is sent once the job's log says the one before arrived."""
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for(lambda: received(log, "SIGTERM"), "SIGTERM to reach the job", timeout=30)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: received(log, "SIGUSR2"), "SIGUSR2 to reach the job", timeout=30)


#: the method of a run a test holds at an iteration (tests/pausing.py)
PAUSED = "method._target_=tests.pausing.PausedGTASeg"


class Gates:
    """Holds jobs of a sweep run with :data:`PAUSED` at an iteration (0-based: after that many iterations) until the
    test moves or opens their gate: what happens to a job then happens at that iteration, however fast the machine
    trains."""

    def __init__(self, folder: Path, holds: dict[int, int]) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        for job, at in holds.items():
            self.hold(job, at)

    @property
    def env(self) -> dict[str, str]:
        return {"GTA_TEST_PAUSE": str(self.folder)}

    def hold(self, job: int, at: int) -> None:
        tmp = self.folder / f"{job}.tmp"
        tmp.write_text(str(at))
        tmp.replace(self.folder / str(job))  # the job never reads half a number

    def wait(self, *jobs: int, timeout: float = 300) -> None:
        """Until each job is held at its gate's iteration."""
        for job in jobs:
            at = (self.folder / str(job)).read_text()
            marker = self.folder / f"{job}.paused"
            wait_for(lambda marker=marker, at=at: marker.is_file() and marker.read_text() == at,
                     f"job {job} to reach iteration {at}", timeout=timeout)

    def open(self, job: int) -> None:
        (self.folder / str(job)).unlink()


#: MLflow's job runner (about ten processes, 1.5 GB) off: no test uses it, and its processes outlive a killed server
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class TrackingServer:
    """An MLflow tracking server of one test's own (sqlite behind it), for a test that kills it: no other test
    uses it. Started and restarted on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 300) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=SERVER_ENV)
        wait_for(self.healthy, f"the tracking server at {self.uri} (log: {self.folder / 'server.log'})",
                 timeout=timeout, every=0.5)

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.uri}/health", timeout=2)
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """As a machine that dies: no goodbye to the connections it holds."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
