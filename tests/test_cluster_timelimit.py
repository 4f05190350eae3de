"""A job that reaches its time limit on the local SLURM cluster (see test_cluster.py, whose helpers it shares):
SLURM's own warning before the limit, submitit's checkpoint and requeue, the resume. In a module of its own so
that it runs beside the other cluster tests: it needs more than one start of a 2-minute job."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from cluster import PAUSED, Gates, accounting, finish, job_ids, log_of, received, slurm, teacher, tracked, wait_for
from helpers import GTA, ROOT, environment, tiny
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

#: the job is held at HOLD until SLURM's warning has come (60 to 90 s into a start: SLURM checks limits every 30 s),
#: so that at least one requeue happens on a machine of any speed (on a slow one the warning may come before HOLD)
ITERS, EVERY, HOLD = 150, 50, 50


def test_a_job_at_its_time_limit_is_requeued_and_resumes(lab, tmp_path, start_sweep):
    """SLURM signals SIGUSR2 ``signal_delay_s`` before the limit, submitit counts a time-out, checkpoints and
    requeues, and the job resumes from ``last.pt``, as often as the training needs; a warning that comes after
    training lets the job complete. It ends with the teacher of the same run left alone, bit for bit, in one MLflow
    run holding every logged step once."""
    run = [*tiny(tmp_path / "data", iters=ITERS, logger=None), f"trainer.log_every={EVERY}",
           f"trainer.checkpoint_every={ITERS}", "seed=0", PAUSED]
    sweep_dir = tmp_path / "sweep"
    gates = Gates(tmp_path / "gates", {0: HOLD})
    process = start_sweep(sweep_dir, *run, *tracked(lab, "time-limit"),
                          *slurm("hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"), **gates.env)
    alone = tmp_path / "alone"  # meanwhile, the same run without a limit, here
    subprocess.run([*GTA, "train", *run, "logger=none", f"hydra.run.dir={alone}"], cwd=ROOT, env=environment(),
                   check=True, capture_output=True, timeout=900)
    (job,) = job_ids(sweep_dir, 1)
    gates.wait(0)
    wait_for(lambda: received(log_of(sweep_dir, job), "SIGUSR2"), "SLURM's warning before the time limit",
             timeout=240)
    gates.open(0)
    finish(process, sweep_dir, timeout=900)
    # the sweep reads the job's result as soon as it is written; its process ends in SLURM a moment later
    starts = wait_for(lambda: (states := [r["State"] for r in accounting(job, requeues=True)])[-1] != "RUNNING"
                      and states, "the job's end in sacct", timeout=60)
    assert starts[-1] == "COMPLETED" and set(starts[:-1]) == {"REQUEUED"} and len(starts) >= 2, starts

    log = log_of(sweep_dir, job).read_text()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("resuming from")]
    # after the held iteration, or before it where start-up took longer than SLURM's warning (a loaded machine)
    assert resumed and resumed[0] <= HOLD + 1 and resumed == sorted(resumed), log[-3000:]
    state, reference = teacher(sweep_dir / "0"), teacher(alone)
    assert all(torch.equal(state[k], reference[k]) for k in reference), "the requeued job's teacher differs"
    record = json.loads((sweep_dir / "0" / "result.json").read_text())
    client = MlflowClient(lab["GTA_CLUSTER_TRACKING_URI"])
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(record["run_id"], "train/student/loss_l")
    assert sorted(m.step for m in history) == list(range(EVERY, ITERS + 1, EVERY))
    print(f"{len(starts)} starts of a 2-minute job; resumed after iterations {resumed}")
