"""Never lose a run: checkpoints, exact resume, stop signals, the non-finite guard and bad checkpoints.

The in-process tests drive the Trainer with the tiny network of ``tests/tiny.py``; the end-to-end tests
run ``python -m gta train`` in subprocesses and kill them.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import GTA, ITERS, NaNAt, Recorder, assert_same_state, environment, make_trainer, tiny
from hydra import compose
from hydra.errors import ConfigCompositionException

from gta.contract import Progress
from gta.engine import checkpoint as ckpt
from gta.engine.checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_models
from gta.engine.guard import NonFiniteLossError
from gta.engine.signals import TrainingInterrupted

# --- resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [2, 3], ids=["before-hand-over", "after-hand-over"])
def test_stop_signal_checkpoints_and_resume_is_exact(source, tmp_path, stop):
    """Stopped after the warm-up's last iteration (the hand-over is the next) or after the hand-over's."""
    reference = make_trainer(source, tmp_path / "reference")
    reference.fit()

    stopped = make_trainer(source, tmp_path / "run", logger=Recorder(stop, signal.SIGUSR1))
    with pytest.raises(TrainingInterrupted, match=rf"SIGUSR1 after iteration {stop}.*last\.pt"):
        stopped.fit()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # our handler is gone again
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert (state["iteration"], state["iters_per_epoch"]) == (stop, 2)

    resumed = make_trainer(source, tmp_path / "run")
    resumed.resume(state, last)
    resumed.fit()
    assert_same_state(resumed.state_dict(ITERS)["models"], reference.state_dict(ITERS)["models"])
    assert_same_state(resumed.state_dict(ITERS)["optimizers"], reference.state_dict(ITERS)["optimizers"])
    later = {step: m for step, m in reference.logger.metrics.items() if step > stop}
    assert resumed.logger.metrics == later  # the same losses, logged once each
    assert resumed.history[-1].miou == reference.history[-1].miou

    # Re-running a finished run trains nothing and reports the final models again.
    again = make_trainer(source, tmp_path / "run")
    again.resume(load_checkpoint(last), last)
    assert again.fit().miou == reference.history[-1].miou


def test_stop_signal_goes_to_the_previous_handler_after_the_checkpoint(source, tmp_path):
    """What submitit relies on: its SIGUSR2 handler (requeue) runs once the state is saved."""
    seen = []
    last = tmp_path / "checkpoints" / "last.pt"
    requeue = lambda signum, frame: seen.append((signum, load_checkpoint(last)["iteration"]))  # noqa: E731
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        trainer = make_trainer(source, tmp_path, logger=Recorder(5, signal.SIGUSR2))
        trainer.fit()  # the handler returned, so training goes on
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, 5)]
    assert load_checkpoint(last)["iteration"] == ITERS


def test_best_checkpoint_is_kept(source, tmp_path):
    trainer = make_trainer(source, tmp_path, eval_every=2, checkpoint_every=3)
    trainer.fit()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    # the model reported at each evaluation: the student during the warm-up, the teacher after it
    per_epoch = trainer.loaders.iters_per_epoch
    scores = {r.step: r.miou[trainer.method.reported_at(Progress(r.step, per_epoch))] for r in trainer.history}
    assert best["best"] == {"step": max(scores, key=scores.get), "miou": max(scores.values())}
    assert best["iteration"] == best["best"]["step"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["best"] == best["best"]


# --- non-finite losses --------------------------------------------------------------------------------------


NAN_AT_5 = partial(NaNAt, at=4)  # GTA-Seg whose assistant loss turns NaN at the 5th iteration


def test_nonfinite_loss_stops_and_the_last_checkpoint_stays_good(source, tmp_path):
    trainer = make_trainer(source, tmp_path, method_cls=NAN_AT_5, checkpoint_every=2)
    last = tmp_path / "checkpoints" / "last.pt"
    expected = rf"non-finite loss nan for model 'assistant' at iteration 5.*{last} \(iteration 4\), is intact"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit()
    state = load_checkpoint(last)
    assert state["iteration"] == 4
    tensors = [t for weights in state["models"].values() for t in weights.values() if t.is_floating_point()]
    assert all(t.isfinite().all() for t in tensors)


def test_nonfinite_loss_between_log_steps_is_caught_before_the_checkpoint(source, tmp_path):
    """Losses are checked without a per-step sync: here first before the checkpoint due at iteration 6."""
    trainer = make_trainer(source, tmp_path, method_cls=NAN_AT_5, checkpoint_every=2, log_every=100)
    last = tmp_path / "checkpoints" / "last.pt"
    expected = (
        rf"non-finite loss nan for model 'assistant' at iteration 5; training stopped at iteration 6 .*"
        rf"{last} \(iteration 4\), is intact"
    )
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit()
    state = load_checkpoint(last)
    assert state["iteration"] == 4
    assert all(t.isfinite().all() for weights in state["models"].values() for t in weights.values())


def test_nonfinite_loss_skip_leaves_the_weights_finite(source, tmp_path):
    trainer = make_trainer(source, tmp_path, method_cls=NAN_AT_5, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="'assistant' at iteration 5; step skipped"):
        trainer.fit()
    assert all(p.isfinite().all() for p in trainer.method.parameters())
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        make_trainer(source, tmp_path, on_nonfinite="ignore")


# --- checkpoint files ---------------------------------------------------------------------------------------


def test_disk_full_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save({"format": ckpt.FORMAT, "iteration": 2})

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"last\.pt: No space left on device; the previous last\.pt is"):
        checkpoints.save({"format": ckpt.FORMAT, "iteration": 4})
    assert load_checkpoint(checkpoints.last)["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_a_kill_during_a_write_leaves_a_loadable_checkpoint(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save({"format": ckpt.FORMAT, "iteration": 2})
    (tmp_path / ".last.pt.4242.deadbeef.tmp").write_bytes(b"PK\x03\x04 what a SIGKILL left")
    assert load_checkpoint(checkpoints.last)["iteration"] == 2
    Checkpointer(tmp_path)  # the next run clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class Payload:
    """Anything but plain data: torch.load(weights_only=True) must refuse to build it."""


def test_unreadable_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": ckpt.FORMAT, "x": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt cannot be read as a checkpoint"):
        load_checkpoint(truncated)
    code = tmp_path / "code.pt"
    torch.save({"format": ckpt.FORMAT, "x": Payload()}, code)
    with pytest.raises(CheckpointError, match="code.pt cannot be read.*never unpickled"):
        load_checkpoint(code)
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=r"weights.pt is not a gta checkpoint of a format this version reads \(1, 2\)"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")


def test_checkpoint_of_another_model_names_the_mismatch(source, tmp_path):
    state = make_trainer(source, tmp_path / "a", num_classes=21).state_dict(0)
    trainer = make_trainer(source, tmp_path / "b")
    shapes = r"model 'teacher'.*\n  head\.weight has shape \[21, 6, 1, 1\] in the checkpoint, \[6, 6, 1, 1\]"
    with pytest.raises(CheckpointError, match=shapes):
        trainer.resume(state, "a.pt")
    with pytest.raises(CheckpointError, match=r"a.pt holds models \['student'\], this method has \['assis"):
        load_models(trainer.models, {"student": state["models"]["student"]}, "a.pt")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3))
    with pytest.raises(CheckpointError, match=r"2 entries missing from the checkpoint, e.g. \['0.weight'"):
        load_models({"teacher": other}, {"teacher": state["models"]["teacher"]}, "a.pt")

    state = trainer.state_dict(0)
    state["iters_per_epoch"] = 5
    with pytest.raises(CheckpointError, match="5 iterations per epoch, this run has 2"):
        trainer.resume(state, "b.pt")


# --- stop signals in every phase of a job --------------------------------------------------------------------


def test_a_signal_while_the_job_builds_stops_it_before_any_work(hydra_conf, tmp_path, monkeypatch):
    """From the start of the command: a signal while the data is prepared is honoured before the first
    iteration, with a checkpoint to resume from."""
    import gta.train
    from gta.train import run

    build_loaders = gta.train.build_loaders

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return build_loaders(*args, **kwargs)

    monkeypatch.setattr(gta.train, "build_loaders", signalled)
    with pytest.raises(SystemExit) as stopped:
        run(compose("train", overrides=tiny(tmp_path / "data", unlabeled=0, iters=4)), tmp_path / "run")
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 0
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_signal_after_training_lets_the_job_finish(hydra_conf, tmp_path, monkeypatch, capfd):
    """A scheduler's warning that comes while a finished run is saved and logged: the run finishes, and the
    handler that would requeue the job (submitit's) is not called."""
    from gta.engine.trainer import Trainer
    from gta.train import run

    save = Trainer.save_reported_model

    def signalled(self):
        os.kill(os.getpid(), signal.SIGUSR2)
        return save(self)

    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    monkeypatch.setattr(Trainer, "save_reported_model", signalled)
    try:
        value = run(compose("train", overrides=tiny(tmp_path / "data", unlabeled=0, iters=4)), tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [] and (tmp_path / "run" / "result.json").is_file() and value >= 0
    assert "SIGUSR2 after training: ignored, the job finishes" in capfd.readouterr().err


# --- configuration and the command --------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "culprit"), [
    ("trainer.checkpoint_evry=5", "checkpoint_evry"),
    ("trainer.checkpoint_every=often", "trainer.checkpoint_every"),
    ("resum=never", "resum"),
])
def test_new_keys_are_typed(hydra_conf, override, culprit):
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", overrides=[override])
    assert culprit in str(err.value) + str(err.value.__cause__)


def test_bad_resume_path_and_unwritable_run_directory(hydra_conf, tmp_path):
    from gta.train import run

    cfg = compose("train", overrides=[*tiny(tmp_path / "data"), f"resume={tmp_path}/nope.pt"])
    with pytest.raises(FileNotFoundError, match=rf"resume={tmp_path}/nope.pt: no checkpoint file there"):
        run(cfg, tmp_path / "run")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PermissionError, match="cannot create the run directory .*a-file/run"):
        run(cfg, tmp_path / "a-file" / "run")


# --- tracking -----------------------------------------------------------------------------------------------


def tracked(store: str, tmp_path: Path, experiment: str) -> list[str]:
    return [*tiny(tmp_path / "data", unlabeled=0, iters=6, logger="mlflow"), f"logger.tracking_uri={store}",
            f"logger.experiment_name={experiment}"]


def steps(client, run_id: str, key: str = "train/student/loss_l") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tracking_failing_mid_run_loses_no_metrics(hydra_conf, store, tmp_path, monkeypatch):
    import json

    from mlflow import MlflowClient

    from gta.train import run

    log_batch = MlflowClient.log_batch

    def server_gone_after_step_2(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step > 2 for m in metrics):
            raise ConnectionError("tracking server went away")
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", server_gone_after_step_2)
    with pytest.warns(RuntimeWarning) as record:
        run(compose("train", overrides=tracked(store, tmp_path, "flaky")), tmp_path / "run")
    monkeypatch.undo()
    fallback = tmp_path / "run" / "unsent_tracking.jsonl"
    messages = " ".join(str(w.message) for w in record)
    assert "tracking server went away; keeping them in memory and retrying" in messages
    assert f"written to {fallback}" in messages

    client = MlflowClient(store)
    (tracking_run,) = client.search_runs([client.get_experiment_by_name("flaky").experiment_id])
    unsent = [json.loads(line) for line in fallback.read_text().splitlines()]
    assert steps(client, tracking_run.info.run_id) == [1, 2]
    assert sorted(r["step"] for r in unsent if r.get("key") == "train/student/loss_l") == [3, 4, 5, 6]
    assert {r["run_id"] for r in unsent} == {tracking_run.info.run_id}
    assert unsent[-1]["status"] == "FINISHED"  # the run's end waits behind what it logged


def test_resume_continues_the_same_tracking_run(hydra_conf, store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from gta.tracking.mlflow import MLflowLogger
    from gta.train import run

    log_metrics = MLflowLogger.log_metrics

    def stop_after_step_3(self, metrics, step):
        log_metrics(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    cfg = compose("train", overrides=tracked(store, tmp_path, "resumed"))
    monkeypatch.setattr(MLflowLogger, "log_metrics", stop_after_step_3)
    with pytest.raises(SystemExit) as stopped:
        run(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGUSR1
    run_id = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["run_id"]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "KILLED"

    run(cfg, tmp_path / "run")
    experiment = client.get_run(run_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id) == [1, 2, 3, 4, 5, 6]  # each step once, in one run


# --- end to end: kill the command ---------------------------------------------------------------------------


def train_command(tmp_path: Path, run: str, *overrides: str) -> list[str]:
    return [*GTA, "train", *overrides, f"hydra.run.dir={tmp_path}/{run}"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_and_rerun_gives_bit_identical_weights(hydra_conf, tmp_path):
    from gta.train import run

    # 2 iterations per epoch, the first epoch a warm-up: checkpoints at 3 and 6 lie inside GTA-Seg epochs.
    args = [*tiny(tmp_path / "data", unlabeled=0, iters=8), "trainer.checkpoint_every=3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same reductions, bit for bit
    try:
        run(compose("train", overrides=args), tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)

    command = train_command(tmp_path, "run", *args)
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / "run" / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGKILL)  # at any moment: possibly while the next checkpoint is written
    process.wait()
    stopped_at = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"]
    assert stopped_at < 8 and not (tmp_path / "run" / "teacher.pt").exists()

    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {tmp_path}/run/checkpoints/last.pt after iteration {stopped_at}" in rerun.stderr
    expected = torch.load(tmp_path / "reference" / "teacher.pt", weights_only=True)
    resumed = torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)
    assert_same_state(resumed, expected)


@pytest.mark.slow
def test_sigterm_to_the_whole_job_saves_and_exits(tmp_path):
    """As SLURM does: every process of the job, DataLoader workers included, gets SIGTERM."""
    args = [*tiny(tmp_path / "data", unlabeled=0, iters=1000), "trainer.checkpoint_every=2", "data.num_workers=1"]
    process = subprocess.Popen(train_command(tmp_path, "run", *args), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(tmp_path / "run" / "checkpoints" / "last.pt", process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert f"stopped by SIGTERM after iteration {state['iteration']}" in stderr
    assert 2 <= state["iteration"] < 1000
