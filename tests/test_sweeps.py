"""Sweeps: the launcher group (basic / submitit local / SLURM) and MLflow runs nested under one parent."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re

import pytest
import submitit.slurm.slurm as submitit_slurm
from helpers import gta, tiny
from hydra import compose
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from mlflow import MlflowClient
from mlflow.utils.file_utils import path_to_local_sqlite_uri

from gta.launcher import quiet_status_polls, rejection
from gta.report import report
from gta.tracking.sweep import PARENT_FILE, SweepParent

LAUNCHERS = {
    "basic": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.gta_launcher.SlurmLauncher",
}


def compose_with_hydra(overrides: list[str]):
    return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_group_picks_the_launcher(hydra_conf, launcher):
    cfg = compose_with_hydra([f"launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]
    assert cfg.hydra.runtime.choices["hydra/launcher"] == {"basic": "basic", "local": "submitit_local",
                                                           "slurm": "submitit_slurm"}[launcher]
    # "where to run" never changes "what to run"
    plain = compose("train", overrides=[f"launcher={launcher}"])
    assert plain == compose("train")


def _task(cfg):  # a module-level function: submitit pickles the task
    return 0


class Submitted(Exception):
    pass


def sbatch_script(tmp_path, monkeypatch, *overrides: str) -> tuple[str, object]:
    """The sbatch script ``--multirun ema.alpha=0.99,0.999 launcher=slurm *overrides`` submits (sbatch not run)."""
    scripts = []

    def capture(self, command):
        scripts.append(self._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_submit_command", capture)
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    cfg = compose_with_hydra(["launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides])
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks())
    launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=_task, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["ema.alpha=0.99"], ["ema.alpha=0.999"]], initial_job_idx=0)
    (script,) = scripts
    return script, launcher


def test_slurm_sweep_is_one_job_array(hydra_conf, tmp_path, monkeypatch):
    """`--multirun ema.alpha=0.99,0.999 launcher=slurm` writes one sbatch array script, one task per GPU."""
    script, launcher = sbatch_script(
        tmp_path, monkeypatch, "hydra.launcher.partition=gpu", "hydra.launcher.account=seg",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.array_parallelism=1")
    lines = set(script.splitlines())
    flags = ["--array=0-1%1", "--partition=gpu", "--account=seg", "--gpus-per-node=4", "--ntasks-per-node=4",
             "--cpus-per-task=8", "--mem=64GB", "--time=1440", "--signal=USR2@300"]
    for flag in flags:
        assert f"#SBATCH {flag}" in lines, f"{flag} missing from\n{script}"
    assert "export OMP_NUM_THREADS=8" in lines
    assert launcher.params["max_num_timeout"] > 0  # requeued on timeout


def test_cpu_partition_gets_one_task_per_node(hydra_conf, tmp_path, monkeypatch):
    script, _ = sbatch_script(tmp_path, monkeypatch, "hydra.launcher.gpus_per_node=0")
    assert "#SBATCH --ntasks-per-node=1" in script.splitlines()


def test_a_refused_submission_names_sbatch_error_and_setting():
    said = rejection('sbatch: error: Invalid numeric value "0" for --ntasks-per-node.\n', "/s/.submitit/%j")
    assert said.splitlines()[0] == 'sbatch refused the sweep\'s job array: Invalid numeric value "0" for ' \
        '--ntasks-per-node.'
    assert "hydra.launcher.tasks_per_node=" in said and "/s/.submitit/" in said and "%j" not in said
    assert "hydra.launcher.partition=" in rejection("sbatch: error: invalid partition specified: gpu", "/s")
    assert "hydra.launcher.gpus_per_node=" in rejection(
        "sbatch: error: Invalid generic resource (gres) specification", "/s")


def test_status_poll_warnings_show_once(caplog):
    """submitit numbers its sacct polls; the same trouble is shown once, whatever the poll's number."""
    quiet_status_polls()
    log = logging.getLogger("submitit")
    with caplog.at_level(logging.WARNING, logger="submitit"):
        for call in range(1, 6):
            log.warning(f"Call #{call} - Bypassing sacct error Command 'sacct' returned 1, status may be inaccurate.")
        log.warning("Call #6 - Bypassing sacct error something else")
    assert len(caplog.records) == 2
    assert "Call #" not in caplog.records[0].getMessage()


GRID = ["ema.alpha=0.9,0.99", "method.warmup_epochs=0,1"]


def tables(out: str) -> list[list[str]]:
    """The Markdown tables of a report's output, each as its lines."""
    found, current = [], []
    for line in out.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found, current = [*found, current], []
    return found
ROWS, COLUMNS = ["alpha 0.9", "alpha 0.99"], ["warm-up 0", "warm-up 1"]


@pytest.fixture(scope="module")
def grid(module_dir):
    """A 2x2 grid run with submitit_local into a fresh sqlite store: (sweep dir, store URI)."""
    store = path_to_local_sqlite_uri(module_dir / "mlflow.db")
    sweep = module_dir / "sweep"
    gta("train", "--multirun", *tiny(module_dir / "data", logger="mlflow"), "launcher=local", f"hydra.sweep.dir={sweep}",
        f"logger.tracking_uri={store}", "logger.experiment_name=grid", "report.table=grid",
        "report.title=A 2x2 grid", "report.row=alpha ${ema.alpha}",
        "report.column=warm-up ${method.warmup_epochs}", *GRID)
    return sweep, store


@pytest.mark.slow
def test_local_grid_nests_every_run_under_one_parent(grid):
    """A 2x2 grid with submitit_local: four processes, four runs under the parent the launcher made."""
    sweep, store = grid
    parent = SweepParent.read(sweep)
    assert json.loads((sweep / PARENT_FILE).read_text())["run_id"] == parent.run_id
    client = MlflowClient(store)
    runs = client.search_runs([parent.experiment_id])
    assert len(runs) == 5
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not top]
    assert top.info.run_id == parent.run_id and top.info.status == "FINISHED"
    assert top.data.tags["table"] == "grid" and top.data.tags["git_commit"]
    assert "multirun.yaml" in {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.run_id}
    assert all(r.info.status == "FINISHED" and "val/miou" in r.data.metrics for r in children)
    cells = {(r.data.tags["row"], r.data.tags["column"]) for r in children}
    assert cells == {(row, column) for row in ROWS for column in COLUMNS}
    for r in children:
        tags = r.data.tags
        assert tags["table"] == "grid" and tags["seed"] == "0"
        assert tags["git_commit"] == top.data.tags["git_commit"]
        assert tags["mlflow.source.git.commit"] == tags["git_commit"].removesuffix("-dirty")
        assert f"ema.alpha={r.data.params['ema.alpha']}" in tags["overrides"].split()
        assert (r.data.params["split/family"], r.data.params["split/size"]) == ("random", "4")
    # every job ran in its own process, as submitit_local does
    assert len(list((sweep / ".submitit").iterdir())) >= 4


@pytest.mark.slow
def test_report_of_the_grid(grid, tmp_path):
    """`python -m gta report <sweep dir>` prints the 2x2 table, writes md/csv/png, logs them to the parent;
    the parent run id gives the same table."""
    sweep, store = grid
    out = gta("report", str(sweep)).stdout
    lines = tables(out)[0]
    assert lines[0].split("|")[2:-1] == [f" {c} " for c in COLUMNS]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ROWS
    assert all(line.count("(n=1)") == 2 for line in lines[2:])
    assert "## A 2x2 grid" in out
    files = sorted(p.name for p in (sweep / "report").iterdir())
    assert files == ["table.csv", "table.md", "table.png"]
    with (sweep / "report" / "table.csv").open() as f:
        records = list(csv.DictReader(f))
    assert [(r["row"], r["column"], r["n"]) for r in records] == [
        (row, column, "1") for row in ROWS for column in COLUMNS]
    # one random draw of 4 (data.split_seed), named by the SHA-1 of the labeled.txt every job wrote
    sha1 = hashlib.sha1((sweep / "0" / "split" / "labeled.txt").read_bytes()).hexdigest()
    assert {(r["split_family"], r["split_list"], r["split_size"], r["labeled_sha1"]) for r in records} == {
        ("random", "4", "4", sha1)}
    assert f"random 4 (4 images, `{sha1[:8]}`)" in out
    parent = SweepParent.read(sweep)
    client = MlflowClient(store)
    logged = {a.path for a in client.list_artifacts(parent.run_id, "report")}
    assert logged == {"report/table.csv", "report/table.md", "report/table.png"}

    by_id = report(parent.run_id, tmp_path / "by-id", tracking_uri=store)
    assert (by_id.rows, by_id.columns) == (ROWS, COLUMNS)
    assert by_id.markdown == (sweep / "report" / "table.md").read_text()


@pytest.mark.slow
def test_report_of_a_sweep_without_experiment_file(tmp_path):
    """`--multirun method=suponly,gta seed=0,1` without an experiment file: the report names its rows after
    the key that varies and its one column after the metric, and shows no paper it does not have."""
    store = path_to_local_sqlite_uri(tmp_path / "mlflow.db")
    sweep = tmp_path / "sweep"
    gta("train", "--multirun", *tiny(tmp_path / "data", logger="mlflow"), f"hydra.sweep.dir={sweep}",
        f"logger.tracking_uri={store}", "method=suponly,gta", "seed=0,1")
    out = gta("report", str(sweep)).stdout
    lines, difference = tables(out)
    assert lines[0] == "| method | val/miou |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["gta", "suponly"]
    assert all("(n=2)" in line for line in lines[2:])
    # each cell's interval; suponly against the first row, paired by seed, with its verdict
    assert all(re.search(r"± \d+\.\d\d \[-?\d+\.\d\d, \d+\.\d\d\] \(n=2\)", line) for line in lines[2:]), lines
    assert "Difference to gta (points), paired by seed" in out
    assert re.fullmatch(r"\| suponly \| (gain|loss|tie) [-+]\d+\.\d\d \[[-+]\d+\.\d\d, [-+]\d+\.\d\d\] \(n=2\) \|",
                        difference[2])
    assert "paper" not in out
    assert sorted(p.name for p in (sweep / "report").iterdir()) == ["table.csv", "table.md", "table.png"]
    assert (sweep / "report" / "table.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_rerunning_a_sweep_skips_finished_jobs(tmp_path):
    """Into the same sweep dir: finished jobs are skipped, unfinished ones run, runs join the same parent."""
    store = path_to_local_sqlite_uri(tmp_path / "mlflow.db")
    sweep = tmp_path / "sweep"
    args = ["train", "--multirun", *tiny(tmp_path / "data", logger="mlflow"), f"hydra.sweep.dir={sweep}",
            f"logger.tracking_uri={store}", "seed=0,1"]
    gta(*args)
    first = SweepParent.read(sweep)
    results = {job: json.loads((sweep / job / "result.json").read_text()) for job in ("0", "1")}
    assert [r["overrides"][-1] for r in results.values()] == ["seed=0", "seed=1"]
    (sweep / "1" / "result.json").unlink()  # as if job 1 had been killed before the end
    finished = (sweep / "0" / "result.json").stat().st_mtime_ns

    out = gta(*args).stdout
    assert out.count("skipped") == 1 and f"{sweep / '0'} finished before" in out
    assert (sweep / "0" / "result.json").stat().st_mtime_ns == finished  # job 0 did not run again
    assert (sweep / "1" / "result.json").is_file()  # job 1 did, to its end
    assert SweepParent.read(sweep) == first  # the same parent run, re-opened
    client = MlflowClient(store)
    jobs = client.search_runs([first.experiment_id], f"tags.mlflow.parentRunId = '{first.run_id}'")
    # job 1 resumes from its final checkpoint, so it continues its own MLflow run rather than starting one
    assert sorted(r.data.tags["seed"] for r in jobs) == ["0", "1"]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert json.loads((sweep / "1" / "result.json").read_text())["run_id"] == results["1"]["run_id"]
