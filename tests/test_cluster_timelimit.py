"""A job that reaches its time limit on the local SLURM cluster (see test_cluster.py, whose helpers it shares):
SLURM's own warning before the limit, submitit's checkpoint and requeue, the resume. In a module of its own so
that it runs beside the other cluster tests: it needs more than one start of a 2-minute job."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from cluster import accounting, finish, job_ids, slurm, teacher, tracked
from helpers import GTA, ROOT, environment, tiny
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

#: enough iterations to outlast the first warning (SLURM checks limits every 30 s, so a warning 60 s before a
#: 2-minute limit comes 60 to 90 s into each start) on a fast machine; a slow one needs more starts
ITERS, EVERY = 900, 50


def test_a_job_at_its_time_limit_is_requeued_and_resumes(lab, tmp_path, start_sweep):
    """SLURM signals SIGUSR2 ``signal_delay_s`` before the limit, submitit counts a time-out, checkpoints and
    requeues, and the job resumes from ``last.pt``, as often as the training needs; it ends with the teacher of
    the same run left alone, bit for bit, in one MLflow run holding every logged step once."""
    run = [*tiny(tmp_path / "data", iters=ITERS, logger=None), f"trainer.log_every={EVERY}",
           f"trainer.checkpoint_every={ITERS}", "seed=0"]
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(sweep_dir, *run, *tracked(lab, "time-limit"),
                          *slurm("hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"))
    alone = tmp_path / "alone"  # meanwhile, the same run without a limit, here
    subprocess.run([*GTA, "train", *run, "logger=none", f"hydra.run.dir={alone}"], cwd=ROOT, env=environment(),
                   check=True, capture_output=True, timeout=900)
    finish(process, sweep_dir, timeout=900)
    (job,) = job_ids(sweep_dir, 1)
    starts = [r["State"] for r in accounting(job, requeues=True)]
    assert starts[-1] == "COMPLETED" and set(starts[:-1]) == {"REQUEUED"} and len(starts) >= 2, starts

    log = (sweep_dir / ".submitit" / job / f"{job}_0_log.err").read_text()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("resuming from")]
    assert resumed and 0 < resumed[-1] < ITERS, log[-3000:]
    state, reference = teacher(sweep_dir / "0"), teacher(alone)
    assert all(torch.equal(state[k], reference[k]) for k in reference), "the requeued job's teacher differs"
    record = json.loads((sweep_dir / "0" / "result.json").read_text())
    client = MlflowClient(lab["GTA_CLUSTER_TRACKING_URI"])
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(record["run_id"], "train/student/loss_l")
    assert sorted(m.step for m in history) == list(range(EVERY, ITERS + 1, EVERY))
    print(f"{len(starts)} starts of a 2-minute job; resumed after iterations {resumed}")

