"""Sweeps on a real SLURM cluster with accounting and a real MLflow tracking server (PostgreSQL behind it), both
started by ``scripts/cluster.sh`` (``make test`` starts and stops them). Without them these tests skip, naming
what is missing; under CI (``CI=true``) they fail instead. The time-limit case is in test_cluster_timelimit.py,
so that it runs beside these."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from cluster import (
    PAUSED,
    Gates,
    accounting,
    children,
    finish,
    interrupt,
    job_ids,
    log_of,
    received,
    slurm,
    sweep,
    teacher,
    tracked,
    wait_for,
)
from helpers import ROOT, environment, gta, tiny
from mlflow import MlflowClient

from gta.tracking.mlflow import UNSENT_FILE

pytestmark = pytest.mark.slow


# --- 1. a table as one job array, nested under one parent run, reported -----------------------------------------
def test_table_is_one_job_array_nested_under_one_parent(lab, tmp_path):
    sweep_dir = tmp_path / "table4"
    started = time.monotonic()
    out = sweep(sweep_dir, "+experiment=instant/table4", "seed=0", f"dataset.root={tmp_path / 'data'}",
                *slurm("hydra.launcher.array_parallelism=2"), *tracked(lab, "table4")).stdout
    ids = job_ids(sweep_dir, 4)
    array = {i.split("_")[0] for i in ids}
    assert len(array) == 1 and f"as SLURM array {array.pop()}" in out
    # the last job's result is read as soon as it is written; its process ends a moment later
    records = wait_for(lambda: [r for r in [accounting(ids[0].split("_")[0])] if {x["State"] for x in r} == {
        "COMPLETED"}], "the array's end in sacct", timeout=60)[0]
    assert sorted(r["JobID"] for r in records) == ids
    first = min(datetime.fromisoformat(r["Start"]) for r in records) - min(
        datetime.fromisoformat(r["Submit"]) for r in records)
    print(f"4 jobs, 2 at a time: {time.monotonic() - started:.0f} s from the command to its end; "
          f"submission to the first start {first.total_seconds():.0f} s")
    # array_parallelism: never more than two tasks running at once
    spans = [(datetime.fromisoformat(r["Start"]), datetime.fromisoformat(r["End"])) for r in records]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap <= 2, spans

    client, parent, runs = children(lab, sweep_dir)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert sorted(r.data.tags["row"] for r in runs) == ["gta", "gta_no_reweight", "mean_teacher", "suponly"]
    table = gta("report", str(sweep_dir)).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(n=1)" in line]
    assert [line.split("|")[1].strip() for line in rows] == ["SupOnly", "MT", "GTA w/o re-weighting", "GTA-Seg"]


# --- 4. a failing grid point fails alone; the same sweep again trains only what did not finish ------------------
def test_a_failing_job_fails_alone_and_a_rerun_trains_only_it(lab, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*tiny(tmp_path / "data", iters=2, logger=None), "split=2,nosuch,4", *slurm(), *tracked(lab, "fail")]
    failed = sweep(sweep_dir, *args, returncode=1)
    said = failed.stdout + failed.stderr
    assert "1 of 3 jobs failed" in said and "job 1 (split=nosuch) failed: split must be" in said, said[-3000:]
    log = Path(said.split("its log: ")[1].split()[0])
    assert log.is_file() and "nosuch" in log.read_text()
    assert "Traceback" not in failed.stderr
    finished = {job: (sweep_dir / job / "result.json").stat().st_mtime_ns for job in ("0", "2")}
    assert not (sweep_dir / "1" / "result.json").exists()

    client, parent, runs = children(lab, sweep_dir)
    top = client.get_run(parent.run_id)
    assert top.info.status == "FAILED" and top.data.tags["failed_jobs"] == "1 of 3 jobs failed"
    # the runs list reads: the parent named after its grid, each job after its point
    assert top.info.run_name == "split" and sorted(r.info.run_name for r in runs) == ["split=2", "split=4"]
    assert {r.data.tags["mlflow.user"] for r in runs} == {getpass.getuser()} == {top.data.tags["mlflow.user"]}
    assert {r.data.tags["mlflow.source.type"] for r in runs} == {"JOB"}
    assert {r.info.status for r in runs} == {"FINISHED"}

    first = set(job_ids(sweep_dir, 3))
    again = sweep(sweep_dir, *args, returncode=1)
    assert "1 of 3 jobs failed" in again.stdout + again.stderr
    rerun = sorted(set(job_ids(sweep_dir, 6)) - first, key=lambda i: int(i.split("_")[1]))
    for job, mtime in finished.items():
        assert (sweep_dir / job / "result.json").stat().st_mtime_ns == mtime  # not trained again
        name = rerun[int(job)]
        assert "finished before" in (sweep_dir / ".submitit" / name / f"{name}_0_log.out").read_text()
    assert len(children(lab, sweep_dir)[2]) == len(runs)  # no new run for a skipped job


# --- 2. preemption and requeue resume in the same run directory and MLflow run -----------------------------------
ITERS, EVERY, HOLD = 60, 10, 20


def test_preempted_and_requeued_jobs_resume_to_the_same_teacher(lab, tmp_path, start_sweep):
    """Three jobs of one grid point: one interrupted as submitit does it (SIGTERM, then SIGUSR2: checkpoint and
    requeue; with a limit under 10 minutes submitit counts it as a time-out), one requeued with ``scontrol
    requeue`` (SIGTERM, then SIGKILL: it resumes from its last periodic checkpoint), one left alone. The first two
    are held at iteration HOLD until their signals have arrived. All end with the same teacher, bit for bit, each in
    its first MLflow run holding every step once."""
    gates = Gates(tmp_path / "gates", {0: HOLD, 1: HOLD})
    run = [*tiny(tmp_path / "data", iters=ITERS, logger=None), f"trainer.checkpoint_every={EVERY}",
           f"trainer.log_every={EVERY}", PAUSED, *tracked(lab, "preempt")]
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(sweep_dir, "report.row=interrupted,requeued,alone", *run, *slurm(), **gates.env)
    interrupted, requeued, _ = job_ids(sweep_dir, 3)
    gates.wait(0, 1)
    signalled, signalled_at = time.monotonic(), datetime.now()
    subprocess.run(["scontrol", "requeue", requeued], check=True)
    interrupt(interrupted, log_of(sweep_dir, interrupted))
    gates.open(0)  # its iteration ends: a checkpoint, then submitit's requeue
    wait_for(lambda: received(log_of(sweep_dir, requeued), "SIGTERM"), "SIGTERM to reach the requeued job")
    # killed while held, started again, held again: sacct says REQUEUED already while the first start is dying
    wait_for(lambda: "resuming from" in log_of(sweep_dir, requeued).read_text(), "the requeued job's second start",
             timeout=180)
    gates.open(1)
    finish(process, sweep_dir)
    restarts = {r["JobID"]: datetime.fromisoformat(r["Start"]) for r in accounting(interrupted.split("_")[0])}
    print(f"signal to the end of the sweep: {time.monotonic() - signalled:.0f} s; from the signal to the "
          f"requeued job's start: {(restarts[requeued] - signalled_at).total_seconds():.0f} s (scontrol requeue), "
          f"{(restarts[interrupted] - signalled_at).total_seconds():.0f} s (interrupted)")

    reference = teacher(sweep_dir / "2")
    client = MlflowClient(lab["GTA_CLUSTER_TRACKING_URI"])
    # interrupted: saved when its held iteration ended; requeued: killed while held, so its last periodic checkpoint
    for run_dir, job, resumed_at in [(sweep_dir / "0", interrupted, HOLD + 1), (sweep_dir / "1", requeued, HOLD)]:
        log = log_of(sweep_dir, job).read_text()
        resumed = [line for line in log.splitlines() if line.startswith("resuming from")]
        assert resumed == [f"resuming from {run_dir / 'checkpoints' / 'last.pt'} after iteration {resumed_at}"], \
            log[-3000:]
        state = teacher(run_dir)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), f"{run_dir}'s teacher differs"
        # one history in one run: every logged step there once, across the requeue (a step logged after the last
        # checkpoint, lost to a hard kill and trained again on resume, is not logged again)
        record = json.loads((run_dir / "result.json").read_text())
        assert client.get_run(record["run_id"]).info.status == "FINISHED"
        history = client.get_metric_history(record["run_id"], "train/student/loss_l")
        assert sorted(m.step for m in history) == list(range(EVERY, ITERS + 1, EVERY))
    assert len(children(lab, sweep_dir)[2]) == 3


# --- 3. two tasks of one SLURM job train as torchrun's two processes do ------------------------------------------
def test_two_task_job_matches_torchrun(lab, tmp_path):
    run = [*tiny(tmp_path / "data", iters=6), "method.warmup_epochs=1"]
    sweep_dir = tmp_path / "sweep"
    sweep(sweep_dir, "seed=0", *run, *slurm("hydra.launcher.tasks_per_node=2"))
    (job,) = job_ids(sweep_dir, 1)
    assert (sweep_dir / ".submitit" / job / f"{job}_1_log.out").is_file()  # a second task ran
    local = tmp_path / "torchrun"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "gta", "train",
                    *run, "seed=0", f"hydra.run.dir={local}"], cwd=ROOT, env=environment(), check=True,
                   capture_output=True, text=True, timeout=300)
    on_slurm, on_torchrun = (json.loads((d / "result.json").read_text()) for d in (sweep_dir / "0", local))
    assert on_slurm["miou"] == on_torchrun["miou"]
    a, b = teacher(sweep_dir / "0"), teacher(local)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 5. the tracking server dies mid-sweep, jobs start and end without it, it comes back: nothing is lost --------
def test_server_outage_loses_no_metric(lab, tmp_path, start_sweep, tracking_server):
    """The sweep's own server is killed while jobs 0 and 1 are held at iteration 20. Job 0 then ends during the
    outage, and job 2 starts and ends during it (two jobs run at a time): what they could not send, job 2's run itself
    included, waits in their run directories until ``gta sync``. Job 1 trains to iteration 60 without the server
    (its values wait in memory), is suspended by SLURM until the server is back, then sends them late. Every run ends
    FINISHED under the sweep's parent, every step once."""
    sweep_dir = tmp_path / "sweep"
    gates = Gates(tmp_path / "gates", {0: 20, 1: 20})
    process = start_sweep(sweep_dir, *tiny(tmp_path / "data", logger=None), "trainer.iters=60,120,60", PAUSED,
                          *slurm("hydra.launcher.array_parallelism=2"), "trainer.log_every=10",
                          *tracked(lab, "outage", tracking_server.uri), "logger.retry_interval=1", **gates.env)
    jobs = job_ids(sweep_dir, 3)
    gates.wait(0, 1)
    tracking_server.kill()  # the server dies without a word
    killed = time.monotonic()
    gates.hold(1, 60)
    gates.open(0)
    gates.wait(1)
    wait_for(lambda: "could not log" in log_of(sweep_dir, jobs[1]).read_text(), "job 1 to see the outage")
    subprocess.run(["scontrol", "suspend", jobs[1]], check=True)
    for job in (0, 2):
        wait_for(lambda job=job: (sweep_dir / str(job) / "result.json").is_file(), f"job {job} to end", timeout=300)
        assert (sweep_dir / str(job) / UNSENT_FILE).is_file(), job
        assert "gta sync" in log_of(sweep_dir, jobs[job]).read_text()
    assert json.loads((sweep_dir / "2" / "result.json").read_text())["run_id"] is None  # never reached the server
    tracking_server.start()
    subprocess.run(["scontrol", "resume", jobs[1]], check=True)
    print(f"tracking server down for {time.monotonic() - killed:.0f} s")
    gates.open(1)
    finish(process, sweep_dir, timeout=400)
    assert not (sweep_dir / "1" / UNSENT_FILE).exists()  # job 1 sent its buffer late

    said = gta("sync", str(sweep_dir)).stdout
    for job in (0, 2):
        kept = sweep_dir / str(job) / UNSENT_FILE
        assert f"{kept}: sent" in said and not kept.exists()
    client, parent, runs = children({"GTA_CLUSTER_TRACKING_URI": tracking_server.uri}, sweep_dir)
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert sorted(r.info.run_name for r in runs) == ["trainer.iters=120", "trainer.iters=60", "trainer.iters=60"]
    for run in runs:
        assert run.info.status == "FINISHED"
        length = int(run.info.run_name.split("=")[1])
        for key in ("train/student/loss_l", "lr/student"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(10, length + 1, 10)), (run.info.run_name, key)
        assert client.get_metric_history(run.info.run_id, "val/miou")
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
