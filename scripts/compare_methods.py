"""SupOnly, Mean Teacher and GTA-Seg at a dataset's default budget over three seeds, beside the
all-labels bound (SupOnly on every labeled image for the same number of iterations), for the dataset's
own network and for the ImageNet-pretrained EfficientNet-Lite0 (``model=deeplabv3plus_lite0``).

Every run is ``python -m gta train`` in a subprocess, ``--jobs`` at a time (each with its share of the
CPU threads), logged to MLflow (experiment "compare") unless ``--no-mlflow``. Writes
``bench-results/compare.{md,json}``; with ``--reference`` (and no overrides) also the table the demo
prints its comparison line from (``gta/data/synthetic_compare.json``).

    python scripts/compare_methods.py [--seeds 0 1 2] [--jobs 2] [--models own lite0] [overrides ...]
    python scripts/compare_methods.py dataset=folder dataset.root=/data/mine dataset.num_classes=4 ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from gta.train import REFERENCE, RESULT_FILE

#: the checkout this script belongs to
ROOT = Path(__file__).resolve().parents[1]

#: the baselines and the method, as the paper's tables define them (conf/method/)
METHODS = {"SupOnly": "suponly", "Mean Teacher": "mean_teacher", "GTA-Seg": "gta"}
#: --models names: the dataset's own network (its recipe's) and the pretrained encoder
MODELS = {"own": None, "lite0": "deeplabv3plus_lite0"}


def train(overrides: list[str], run_dir: Path, threads: int) -> dict:
    """One ``gta train`` run; its result.json (or the one it left before, if it finished)."""
    result = run_dir / RESULT_FILE
    if not result.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "gta", "train", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=none"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        (run_dir / "compare.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
    return json.loads(result.read_text())


def row(model: str, method: str, labels: str, results: list[dict]) -> dict:
    values = [100 * r["value"] for r in results]
    return {
        "model": model, "network": results[0]["network"], "method": method, "labels": labels,
        "labeled": results[0]["labeled"], "values": [round(v, 2) for v in values],
        "mean": round(statistics.mean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "seconds": round(statistics.mean(r["wall_time_s"] for r in results)),
        "iterations": results[0]["iterations"],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| network | method | labels | reported mIoU (%) | per seed | vs SupOnly | s per run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = [s for s in rows if (s["model"], s["method"], s["labels"]) == (r["model"], "SupOnly", r["labels"])]
        sup = same[0] if r["method"] != "SupOnly" else None
        delta = f"{r['mean'] - sup['mean']:+.2f}" if sup else ""
        values = ", ".join(f"{v:.2f}" for v in r["values"])
        lines.append(f"| {r['network']} | {r['method']} | {r['labeled']} | {r['mean']:.2f} ± {r['std']:.2f} | {values} | "
                     f"{delta} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--reference", action="store_true", help="also write the demo's comparison table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.reference and args.overrides:
        parser.error("--reference measures the default budget: give no overrides")
    logger = ["logger=none"] if args.no_mlflow else ["logger.experiment_name=compare"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()

    def jobs(model: str, method: str, extra: list[str], name: str) -> list[tuple[list[str], Path]]:
        chosen = [f"model={MODELS[model]}"] if MODELS[model] else []
        replaced = {e.split("=", 1)[0] for e in extra}
        kept = [o for o in args.overrides if o.split("=", 1)[0] not in replaced]
        overrides = [f"method={method}", *chosen, *logger, *kept, *extra]
        return [(overrides + [f"seed={s}"], args.out / "compare" / f"{model}-{name}-seed{s}") for s in args.seeds]

    def results(grid: list[list[tuple]]) -> list[list[dict]]:
        """Every job of ``grid``, --jobs at a time; each inner list is one row's seeds."""
        flat = [job for row_jobs in grid for job in row_jobs]
        if not args.no_mlflow:  # one run creates the tracking store, before several open it at once
            train(*flat[0], threads)
        done = iter(pool.map(lambda job: train(*job, threads), flat))
        return [[next(done) for _ in row_jobs] for row_jobs in grid]

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for model in args.models:
            grid = [jobs(model, method, [], method) for method in METHODS.values()]
            for method, found in zip(METHODS, results(grid), strict=True):
                rows.append(row(model, method, "split", found))
            # the bound: every labeled image, as many iterations as the semi-supervised runs
            bound = jobs(model, "suponly", ["split=all", f"trainer.iters={rows[-1]['iterations']}"], "all-labels")
            rows.append(row(model, "SupOnly", "all", results([bound])[0]))

    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(table)
    record = {"date": date.today().isoformat(), "seeds": args.seeds, "overrides": args.overrides, "rows": rows,
              "wall_time_s": round(time.perf_counter() - started)}
    (args.out / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.reference:
        REFERENCE.write_text(json.dumps(record, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
