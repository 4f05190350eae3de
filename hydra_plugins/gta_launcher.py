"""The launcher of ``launcher=slurm`` (what it adds to Hydra's submitit launcher: ``gta.launcher``)."""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

from gta.engine.signals import STOP_SIGNALS
from gta.launcher import JobFailed, SweepFailed, last_line, over, quiet_status_polls, rejection
from gta.tracking.sweep import grid_keys, grid_point, note_failed_jobs


class SlurmLauncher(SubmititSlurmLauncher):
    def __call__(self, *args, **kwargs) -> JobReturn:
        """One job, on the cluster. Hydra hands a failure back as a result; here it is also written to the job's
        log and fails the SLURM job, so that ``sacct`` says FAILED rather than COMPLETED."""
        result = super().__call__(*args, **kwargs)
        if result.status == JobStatus.FAILED:
            error = result._return_value
            if isinstance(error, CompactHydraException):  # a user error: its message says it all
                print(error, file=sys.stderr)
            else:
                traceback.print_exception(error)
            raise JobFailed(str(error)) from None
        # finished: a stop signal from here to the process's exit (submitit's requeue) would start it again
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        quiet_status_polls()
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        # the keys every submitit executor knows go as they are, the others carry the executor's prefix
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        arguments = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
                     for o, n in zip(job_overrides, numbers, strict=True)]
        try:
            jobs = executor.map_array(self, *zip(*arguments, strict=True))
        except submitit.core.utils.FailedJobError as e:
            raise SweepFailed(rejection(str(e), folder)) from None
        print(f"[sweep] {len(jobs)} job(s) as SLURM array {jobs[0].job_id.split('_')[0]}; logs in {folder}")

        while not all(over(job) for job in jobs):
            time.sleep(1)
        returns, failures, grid = [], [], grid_keys(self.config)
        for job, overrides, number in zip(jobs, job_overrides, numbers, strict=True):
            try:
                result = job.results()[0]
            except Exception as e:  # the process died: killed, out of memory, cancelled
                result = JobReturn(status=JobStatus.FAILED, _return_value=e)
            if result.status == JobStatus.FAILED:
                failures.append(f"job {number} ({grid_point(list(overrides), grid) or number}) failed: "
                                f"{last_line(result._return_value)}\n    its log: {job.paths.stderr}")
            returns.append(result)
        if failures:
            summary = f"{len(failures)} of {len(jobs)} jobs failed"
            note_failed_jobs(Path(str(self.config.hydra.sweep.dir)), summary, failures)
            raise SweepFailed("\n".join([f"{summary}; the others finished:", *failures,
                                         "Fix what the log says, then run the same command again: the finished "
                                         "jobs are skipped."]))
        return returns


