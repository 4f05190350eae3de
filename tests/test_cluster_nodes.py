"""A job over two nodes on the local SLURM cluster (see test_cluster.py, whose helpers it shares): partition
``two`` of ``scripts/cluster.sh``, whose nodes n1 and n2 are two slurmd daemons on this host, under names that
resolve nowhere (a cluster's node names need not resolve where its jobs run). In a module of its own so that it
runs beside the other cluster tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cluster import finish, job_ids, slurm, teacher, wait_for
from helpers import ROOT, environment, free_port, tiny

pytestmark = pytest.mark.slow


def ended_step(step: str) -> dict[str, str] | None:
    """sacct's record of a job's step (``<job>.0``: the first ``srun``), once it says the step completed."""
    out = subprocess.run(["sacct", "-P", "-j", step, "-o", "JobID,State,NNodes,NTasks,NodeList"], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    keys = out[0].split("|")
    records = [dict(zip(keys, line.split("|"), strict=True)) for line in out[1:]]
    return next((r for r in records if r["JobID"] == step and r["State"] == "COMPLETED"), None)


def test_two_node_job_matches_torchrun(lab, tmp_path, start_sweep):
    """``hydra.launcher.nodes=2``, one task per node, trains one run over gloo, to the mIoU and the teacher, bit
    for bit, of ``torchrun --nnodes=2 --nproc_per_node=1`` started twice on this machine."""
    run = [*tiny(tmp_path / "data", iters=6), "method.warmup_epochs=1", "seed=0"]
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(sweep_dir, *run, *slurm("hydra.launcher.partition=two", "hydra.launcher.nodes=2",
                                                  "hydra.launcher.tasks_per_node=1"))
    local = tmp_path / "torchrun"  # meanwhile, the same run as two torchrun "nodes" on this machine
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    nodes = [subprocess.Popen([*torchrun, f"--node_rank={rank}", "-m", "gta", "train", *run, f"hydra.run.dir={local}"],
                              cwd=ROOT, env=environment(), stdout=(tmp_path / f"torchrun_{rank}.log").open("w"),
                              stderr=subprocess.STDOUT)
             for rank in (0, 1)]
    try:
        for rank, node in enumerate(nodes):
            assert node.wait(600) == 0, (tmp_path / f"torchrun_{rank}.log").read_text()[-5000:]
    finally:  # one failed: the other would wait for it at the rendezvous
        for node in nodes:
            node.kill()
    finish(process, sweep_dir, timeout=600)

    (job,) = job_ids(sweep_dir, 1)
    # the training's step: two tasks, one on each node; task i says it is on node i of 2
    step = wait_for(lambda: ended_step(f"{job}.0"), "the job's step to end in sacct", timeout=60)
    assert (step["NNodes"], step["NTasks"], step["NodeList"]) == ("2", "2", "n[1-2]"), step
    for task in (0, 1):
        log = (sweep_dir / ".submitit" / job / f"{job}_{task}_log.out").read_text()
        assert f"global_rank={task}(2)" in log and f"node={task}(2)" in log, log[-2000:]

    on_slurm, on_torchrun = (json.loads((d / "result.json").read_text()) for d in (sweep_dir / "0", local))
    assert on_slurm["miou"] == on_torchrun["miou"]
    a, b = teacher(sweep_dir / "0"), teacher(local)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
