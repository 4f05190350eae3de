"""End to end through the real CLI: runs land in MLflow; bad input fails with a message naming it."""

from pathlib import Path

import pytest
from helpers import gta, python, tiny

pytestmark = pytest.mark.slow  # every test runs the command in a subprocess

#: the lines Hydra writes around an error's message, which gta leaves out where its message says everything
HYDRA_LINES = ("Set the environment variable HYDRA_FULL_ERROR=1", "Error executing job with overrides")


def alone(stderr: str) -> bool:
    """Whether an error's message stands without a traceback and without Hydra's lines around it."""
    return "Traceback" not in stderr and not any(line in stderr for line in HYDRA_LINES)


def run4(data_root: Path, logger: str = "none") -> list[str]:
    """4 iterations on 4 + 4 images, 2 of warm-up and 2 past it, every second one logged."""
    return [*tiny(data_root, unlabeled=0, iters=4, logger=logger), "trainer.log_every=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def test_multirun_of_all_methods_logs_each_run_to_mlflow(tmp_path, data_root):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = gta("train", "--multirun", "method=suponly,mean_teacher,gta", *run4(data_root, logger="mlflow"),
                 f"logger.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert "val mIoU teacher" in result.stdout and "logged to  MLflow run" in result.stdout
    assert f"browse     mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in result.stdout
    # without launcher=, Hydra's basic launcher ran the jobs in this one process (submitit leaves .submitit/)
    written = {p.name for p in (tmp_path / "sweep").iterdir()}
    assert {"0", "1", "2"} <= written and ".submitit" not in written, written

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gta").experiment_id])
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == len(jobs) + 1 and len({r.data.tags["mlflow.parentRunId"] for r in jobs}) == 1
    by_method = {r.data.params["method._target_"].rsplit(".", 1)[1]: r for r in jobs}
    assert set(by_method) == {"SupOnly", "MeanTeacher", "GTASeg"}
    for name, run in by_method.items():
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train/student/loss_l")
        assert [m.step for m in history] == [2, 4]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "split"} <= artifacts
        assert f"{'student' if name == 'SupOnly' else 'teacher'}.pt" in artifacts
        assert run.data.params["split"] == "4" and run.data.params["ema.alpha"] == "0.99"
    gta_metrics = by_method["GTASeg"].data.metrics
    for model in ("teacher", "student", "assistant"):
        assert 0.0 <= gta_metrics[f"val/{model}/miou"] <= 1.0
        assert f"val/{model}/iou/background" in gta_metrics
    assert gta_metrics["val/miou"] == gta_metrics["val/teacher/miou"]
    assert "train/assistant/loss_u" in by_method["GTASeg"].data.metrics  # past warm-up, the assistant learned

    # the pictures of the evaluation at step 4, read back from the store
    from PIL import Image

    def pictures(run):
        return {a.path.rsplit("/", 1)[1]: a for a in client.list_artifacts(run.info.run_id, "images/step_000004")}

    gta_run = by_method["GTASeg"].info.run_id
    assert set(pictures(by_method["GTASeg"])) == {"validation.png", "unlabeled.png"} | {
        f"{chart}_{model}.png" for chart in ("iou", "confusion") for model in ("teacher", "student", "assistant")
    }
    assert "unlabeled.png" not in pictures(by_method["SupOnly"])  # it never sees an unlabeled image
    folder = Path(client.download_artifacts(gta_run, "images/step_000004", str(tmp_path / "pictures")))
    # 4 rows of image | truth | teacher | student | assistant, the 32-pixel panels enlarged 4 times
    validation = Image.open(folder / "validation.png")
    assert validation.mode == "RGB" and 5 * 128 < validation.width < 5 * 128 + 60
    assert 4 * 128 < validation.height < 4 * 128 + 90  # + titles and the class legend
    unlabeled = Image.open(folder / "unlabeled.png")  # 2 rows: image | pseudo-label | confidence | dropped | weight
    assert 5 * 128 < unlabeled.width < 5 * 128 + 60 and 2 * 128 < unlabeled.height < 2 * 128 + 90
    assert min(Image.open(folder / "iou_teacher.png").size) >= 200


@pytest.mark.parametrize(("overrides", "culprit"), [
    (["trainer.itres=3"], "trainer.itres"),
    (["split=5000"], "split=5000 is not possible"),
    (["split=many"], "split must be a number of labeled images or 'all', got 'many'"),
    (["device=cuda"], "device=cuda"),
    (["trainer.progress=often"], "trainer.progress must be one of"),
    (["dataset.pad_label=9"], "pad_label=9 is not a class index"),  # raised inside hydra's instantiate
    (["hydra.run.dir=/proc/gta-run"], "/proc/gta-run"),
])
def test_bad_input_fails_with_a_message_naming_the_culprit(overrides, culprit, tmp_path, data_root):
    if culprit == "device=cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    result = gta("train", *run4(data_root), *overrides, cwd=tmp_path, returncode=1)
    assert culprit in result.stderr, result.stderr[-2000:]
    if "hydra.run.dir" not in overrides[0]:  # Hydra creates the run directory, and reports that failure itself
        assert alone(result.stderr), result.stderr[-2000:]  # the message, not forty lines of stack


@pytest.mark.parametrize("full_error", ["0", "1"])
def test_a_missing_root_ends_with_its_message_and_hydra_full_error_shows_the_stack(full_error, tmp_path):
    overrides = ["dataset=folder", "dataset.num_classes=3", "dataset.root=/no/such/root", "logger=none"]
    result = gta("train", *overrides, cwd=tmp_path, returncode=1, HYDRA_FULL_ERROR=full_error)
    assert "Dataset root /no/such/root does not exist" in result.stderr, result.stderr[-2000:]
    if full_error == "1":
        assert "Traceback" in result.stderr and "gta.errors.MissingPathError: Dataset root" in result.stderr
    else:
        assert alone(result.stderr), result.stderr[-2000:]


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only errors in the user's input lose their stack: an error of the code shows where it happened."""
    code = (
        "import sys, gta.train\n"
        "def broken(cfg): raise ValueError('not the user: a bug')\n"
        "gta.train.run = broken\n"
        "from gta.cli import main\n"
        "main(['train', 'logger=none'])\n"
    )
    result = python("-c", code, cwd=tmp_path, timeout=300, returncode=1)
    assert "Traceback" in result.stderr and "in broken" in result.stderr
    assert "ValueError: not the user: a bug" in result.stderr


def test_a_failing_job_of_a_multirun_fails_the_sweep_naming_it(tmp_path, data_root):
    unsplit = [o for o in run4(data_root) if not o.startswith("split=")]
    result = gta("train", "--multirun", "split=4,many", *unsplit, "method=suponly", f"hydra.sweep.dir={tmp_path}/sweep",
                 cwd=tmp_path, returncode=1)
    assert "val mIoU student" in result.stdout  # the good job ran
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # which job failed, and why
    failed = [line for line in result.stderr.splitlines() if line.startswith("Error executing job with overrides")]
    assert len(failed) == 1 and "'split=many'" in failed[0], result.stderr[-2000:]
    assert "split must be a number of labeled images or 'all', got 'many'" in result.stderr


def test_logger_none_runs_without_ever_importing_mlflow(tmp_path, data_root):
    overrides = [*run4(data_root), "method=suponly", f"hydra.run.dir={tmp_path}/run"]
    code = (
        "import sys\nfrom gta.cli import main\n"
        f"main(['train', *{overrides!r}])\n"
        "print('mlflow imported:', 'mlflow' in sys.modules)\n"
    )
    result = python("-c", code, cwd=tmp_path, timeout=300)
    assert "mlflow imported: False" in result.stdout
