"""``launcher=slurm``: Hydra's submitit launcher with what a cluster user meets on top of it (the launcher
class is ``hydra_plugins.gta_launcher.SlurmLauncher``: Hydra finds launchers in that package only).

- A submission that sbatch rejects ends the sweep with sbatch's own words and the launcher setting to change,
  instead of submitit's traceback.
- The sweep waits for every job, not only up to the first failure: a failed grid point fails alone, named with
  its overrides and its log, the others finish, and the sweep's MLflow parent run records which failed.
- submitit's job-status poll (``sacct``) warns once per kind of trouble, not at every poll.
- A suspended job (``scontrol suspend``, or a cluster that preempts by suspending) is waited for: submitit
  would take it for a job that is over, and its result for lost.
"""

from __future__ import annotations

import logging
import re

from hydra.errors import CompactHydraException

#: the setting (``hydra.launcher.<key>``) behind each sbatch option, to name in a rejection
SETTINGS = {
    "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node", "gres": "gpus_per_node",
    "partition": "partition", "account": "account", "mem": "mem_gb", "time": "timeout_min",
    "cpus-per-task": "cpus_per_task", "nodes": "nodes", "qos": "qos",
}
#: words of sbatch's refusals that point at a setting without naming its option
HINTS = {"partition": "partition", "account": "account", "generic resource": "gpus_per_node",
         "gpu": "gpus_per_node", "time limit": "timeout_min", "memory": "mem_gb",
         "node configuration": "cpus_per_task, mem_gb or gpus_per_node"}


#: SLURM states of a job that is not over which submitit takes for an end
NOT_OVER = {"SUSPENDED", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "CONFIGURING", "STAGE_OUT"}


def over(job) -> bool:
    """Whether a submitit job has ended (its result written, or SLURM says it ended)."""
    return job.done() and (job.paths.result_pickle.exists() or job.state.upper() not in NOT_OVER)


class SweepFailed(CompactHydraException):
    """Hydra prints a compact exception's message alone and exits with status 1."""


class JobFailed(RuntimeError):
    """A job's run failed; raised in the job so that SLURM records the failure."""


def last_line(error: BaseException) -> str:
    """The line that says what went wrong: the end of a job's traceback, or a user error's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("-" * 5)]
    raised = [m.group(1) for line in lines if (m := re.match(r"^[\w.]+(?:Error|Exception|Failed): (.*)", line))]
    return (raised or lines or [type(error).__name__])[-1]


def rejection(stderr: str, folder: str) -> str:
    """What to tell when sbatch refuses the array: its words, and the setting that would change the option."""
    said = " ".join(line.removeprefix("sbatch: error: ").strip() for line in stderr.splitlines() if line.strip())
    options = re.findall(r"--([a-z-]+)", said)
    keys = [SETTINGS[o] for o in options if o in SETTINGS]
    keys += [key for words, key in HINTS.items() if not keys and words in said.lower()]
    setting = (f"change hydra.launcher.{keys[0]}=..." if keys else "change the hydra.launcher.* setting it names")
    return (f"sbatch refused the sweep's job array: {said}\n{setting} (conf/launcher/slurm.yaml lists them; "
            f"the script it was given is under {folder.split('%j')[0]})")


class _OncePerKind(logging.Filter):
    """Lets a status-poll warning through once: submitit numbers each poll ("Call #12 - ..."), so the same
    trouble would otherwise print again every few seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = re.sub(r"Call #\d+ - ", "", record.getMessage())
        if kind in self.seen:
            return False
        self.seen.add(kind)
        record.msg, record.args = f"{kind} (shown once; the sweep keeps polling)", ()
        return True


def quiet_status_polls() -> None:
    log = logging.getLogger("submitit")
    if not any(isinstance(f, _OncePerKind) for f in log.filters):
        log.addFilter(_OncePerKind())
