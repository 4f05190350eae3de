"""What tracking costs a training run, measured against a real MLflow tracking server.

    python scripts/tracking_bench.py stall [--iters 300]
        Step times (median and maximum) of a short training run that logs every step, with its tracking server up,
        killed mid-run (SIGKILL) and frozen mid-run (SIGSTOP: connections accepted by the kernel, never answered).
    python scripts/tracking_bench.py load [--loggers 32 --steps 2000 --metrics 8 --every-ms 2] [--uri URI]
        Many processes logging to one server at once, as a table's jobs on a cluster do: each the project's
        MLflowLogger without training. Checks that every value arrived, each step once, and reports how long the
        buffers took to drain and the server's throughput.

Each starts a server of its own (sqlite behind it, in a temporary directory) and stops it, unless ``--uri`` names
one (``scripts/cluster.sh`` starts one over PostgreSQL). Results go to stdout and, as JSON, to
``bench-results/tracking_<kind>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"


# --- a tracking server of the script's own ---------------------------------------------------------------------
def healthy(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    except OSError:
        return False
    return True


@contextmanager
def server(folder: Path):
    """``mlflow server`` over sqlite in ``folder`` on a free port, in its own process group; yields (uri, pid)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # MLflow's job runner (about ten processes, 1.5 GB) off: unused, and its processes outlive a killed server
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        while not healthy(uri):
            if process.poll() is not None:
                raise RuntimeError(f"the MLflow server ended: {folder / 'server.log'}")
            time.sleep(0.5)
        yield uri, process.pid
    finally:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass
        process.wait()


@contextmanager
def given_or_own(uri: str | None, folder: Path):
    if uri:
        yield uri, None
    else:
        with server(folder) as started:
            yield started


# --- stall: step times with the server up, killed, frozen ----------------------------------------------------
def train_timed(uri: str, run_dir: Path, iters: int, fault: tuple[int, int] | None = None, at: int = 0) -> list[float]:
    """Seconds of each iteration of a short run logging every step to ``uri``; ``fault``, (signal, process group),
    is sent ``at`` iterations in."""
    from hydra import compose, initialize_config_dir

    from gta.config import CONF_DIR
    from gta.engine.progress import ProgressReport
    from gta.schema import register_configs
    from gta.train import run

    ends: list[float] = []
    advance = ProgressReport.advance

    def timed(self, step: int) -> None:
        ends.append(time.perf_counter())
        if fault is not None and step == at:
            os.killpg(fault[1], fault[0])
        advance(self, step)

    overrides = ["model=deeplabv3plus_small", "dataset.crop_size=64", "data.batch_size=2", "data.num_workers=0",
                 f"trainer.iters={iters}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=none",
                 "trainer.snapshot_images=0", "device=cpu", "logger=mlflow", f"logger.tracking_uri={uri}",
                 f"dataset.root={run_dir.parent / 'data'}"]
    register_configs()
    ProgressReport.advance = timed
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            run(compose("train", overrides=overrides), run_dir)
    finally:
        ProgressReport.advance = advance
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def stall(args) -> dict:
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("up", "killed", "frozen"):
            folder = Path(tmp) / case
            folder.mkdir()
            with server(folder) as (uri, pgid):
                fault = {"up": None, "killed": (signal.SIGKILL, pgid), "frozen": (signal.SIGSTOP, pgid)}[case]
                times = train_timed(uri, folder / "run", args.iters, fault, at=args.iters // 3)
            steps = times[:-1]  # the last holds the final evaluation
            results[case] = {"median_s": statistics.median(steps), "max_s": max(steps), "steps": len(steps)}
            print(f"server {case:<6}: median step {1000 * results[case]['median_s']:.1f} ms, maximum "
                  f"{1000 * results[case]['max_s']:.1f} ms over {len(steps)} steps", flush=True)
    base = results["up"]["median_s"]
    for case in ("killed", "frozen"):
        results[case]["max_over_median_up"] = results[case]["max_s"] / base
    return results


# --- load: many loggers at once ----------------------------------------------------------------------------------
def one_logger(uri: str, experiment: str, index: int, steps: int, metrics: int, every_ms: float, out) -> None:
    import warnings

    from gta.tracking.mlflow import MLflowLogger

    warnings.simplefilter("once")  # a refused request is retried; what counts is what arrives
    logger = MLflowLogger(uri, experiment_name=experiment, run_name=f"logger{index}", fallback_dir=out,
                          start_timeout=60, retry_interval=1)
    started = time.time()
    start = time.perf_counter()
    for step in range(steps):
        logger.log_metrics({f"m{k}": float(step * metrics + k) for k in range(metrics)}, step=step)
        time.sleep(every_ms / 1000)
    logged = time.perf_counter()
    while not logger.flush():  # an overloaded server times requests out: drained is when all is stored
        time.sleep(1)
    done = time.perf_counter()
    logger.close()
    unsent = (Path(out) / "unsent_tracking.jsonl").is_file()
    print(json.dumps({"run_id": logger.run_id, "log_s": logged - start, "drain_s": done - logged,
                      "start": started, "end": time.time(), "unsent_file": unsent}), flush=True)


def load(args) -> dict:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp, given_or_own(args.uri, Path(tmp)) as (uri, _):
        experiment = f"load-{int(time.time())}"
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.loggers) as pool:
            out = [pool.apply_async(_logged, (uri, experiment, i, args.steps, args.metrics, args.every_ms,
                                              str(Path(tmp) / f"logger{i}"))) for i in range(args.loggers)]
            reports = [json.loads(o.get()) for o in out]
        span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
        client = MlflowClient(uri)
        lost = duplicated = 0
        for report in reports:
            if report["run_id"] is None:
                lost += args.steps * args.metrics
                continue
            for k in range(args.metrics):
                got = [m.step for m in client.get_metric_history(report["run_id"], f"m{k}")]
                lost += args.steps - len(set(got))
                duplicated += len(got) - len(set(got))
        records = args.loggers * args.steps * args.metrics
        result = {"loggers": args.loggers, "steps": args.steps, "metrics": args.metrics, "every_ms": args.every_ms,
                  "records": records, "lost": lost, "duplicated": duplicated,
                  "unsent_files": sum(r["unsent_file"] for r in reports),
                  "drain_s_max": max(r["drain_s"] for r in reports),
                  "drain_s_median": statistics.median(r["drain_s"] for r in reports),
                  "log_s_median": statistics.median(r["log_s"] for r in reports),
                  "span_s": span, "records_per_s": records / span, "server": args.uri or "own, sqlite"}
    print(f"{args.loggers} loggers x {args.steps} steps x {args.metrics} metrics = {records} values in {span:.1f} s "
          f"({result['records_per_s']:.0f} values/s); lost {lost}, logged twice {duplicated}; buffers drained "
          f"{result['drain_s_median']:.1f} s (median) / {result['drain_s_max']:.1f} s (max) after the last call")
    if lost or duplicated or result["unsent_files"]:
        raise SystemExit("values were lost or logged twice")
    return result


def _logged(*args) -> str:
    """One logger in a pool process; its report line."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        one_logger(*args)
    return buffer.getvalue().strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="kind", required=True)
    s = commands.add_parser("stall", help="step times with the server up, killed, frozen")
    s.add_argument("--iters", type=int, default=300)
    s.set_defaults(run=stall)
    ld = commands.add_parser("load", help="many loggers at once against one server")
    ld.add_argument("--loggers", type=int, default=32)
    ld.add_argument("--steps", type=int, default=2000)
    ld.add_argument("--metrics", type=int, default=8)
    ld.add_argument("--every-ms", type=float, default=2.0)
    ld.add_argument("--uri", help="a running server to load (default: one of the script's own)")
    ld.set_defaults(run=load)
    args = parser.parse_args()
    result = args.run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"tracking_{args.kind}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
