"""SupOnly, Mean Teacher, GTA-Seg, UniMatch and CPS at a dataset's default budget over five seeds, beside the
all-labels bound (SupOnly on every labeled image for the same number of iterations), for the dataset's
own network and for the ImageNet-pretrained EfficientNet-Lite0 (``model=deeplabv3plus_lite0``).

Each row gives its mean, std, n and 95 % interval, and each method its difference to SupOnly paired by
seed, a tie when that interval contains 0 (gta/stats.py). ``--recheck-threads N`` trains the rows of
``--recheck-methods`` again with N threads per run (``--recheck-seeds``: only those seeds): another thread
count sums floats in another order, as another machine does, and how far the same seed moves tells how far
a reader's rerun may land from a row.
``--against OLD.json`` says the same of an earlier table (another machine's compare.json, or the committed
reference), seed by seed.

Every run is ``python -m gta train`` in a subprocess, ``--jobs`` at a time (each with ``--threads``
threads, by default its share of the CPUs), logged to MLflow (experiment "compare") unless
``--no-mlflow``. A run whose directory holds a result.json is not trained again. Writes
``bench-results/compare.{md,json}``; with ``--reference`` (and no overrides) also the table the demo
prints its comparison line from (``gta/data/synthetic_compare.json``).

    python scripts/compare_methods.py [--seeds 0 1 2 3 4] [--jobs 2] [--models own lite0] [overrides ...]
    python scripts/compare_methods.py --methods SupOnly GTA-Seg --no-bound trainer.epochs=30
    python scripts/compare_methods.py dataset=folder dataset.root=/data/mine dataset.num_classes=4 ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from gta.stats import Estimate, estimate, format_difference, format_estimate, paired, verdict
from gta.train import REFERENCE, RESULT_FILE

#: the checkout this script belongs to
ROOT = Path(__file__).resolve().parents[1]

#: the rows: the baseline first (every other row is compared with it), then the methods, as the paper's
#: tables define them, UniMatch, the method most compared with since 2023, and CPS, the two-network baseline of
#: Table 1 (conf/method/)
METHODS = {"SupOnly": "suponly", "Mean Teacher": "mean_teacher", "GTA-Seg": "gta", "UniMatch": "unimatch",
           "CPS": "cps"}
BASELINE = next(iter(METHODS))
#: the rows --recheck-threads trains again by default: the pair the README's central claim compares
RECHECKED = ("SupOnly", "GTA-Seg")
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


def rounded(e: Estimate) -> dict:
    """An estimate as the json holds it: two decimals, std and interval None below two seeds."""
    number = lambda x: round(x, 2) if e.has_interval else None  # noqa: E731
    return {"mean": round(e.mean, 2), "std": number(e.std), "n": e.n, "low": number(e.low), "high": number(e.high)}


def stored(r: dict) -> Estimate:
    """A row's estimate as rounded() kept it."""
    number = lambda x: math.nan if x is None else x  # noqa: E731
    return Estimate(r["mean"], number(r["std"]), r["n"], number(r["low"]), number(r["high"]))


def row(model: str, method: str, labels: str, seeds: list[int], results: list[dict]) -> dict:
    values = [100 * r["value"] for r in results]
    return {
        "model": model, "network": results[0]["network"], "method": method, "labels": labels,
        "labeled": results[0]["labeled"], "seeds": seeds, "values": [round(v, 2) for v in values],
        **rounded(estimate(values)), "seconds": round(statistics.mean(r["wall_time_s"] for r in results)),
        "iterations": results[0]["iterations"],
    }


def by_seed(r: dict) -> dict[str, float]:
    return {str(s): v for s, v in zip(r["seeds"], r["values"], strict=True)}


def difference(r: dict, rows: list[dict]) -> Estimate | None:
    """``r`` minus the baseline row of its network and labels, paired by seed (None for the baseline)."""
    key = (r["model"], BASELINE, r["labels"])
    base = next((b for b in rows if (b["model"], b["method"], b["labels"]) == key), None)
    return None if base is None or base is r else paired(by_seed(r), by_seed(base))


def markdown(rows: list[dict], moved: list[dict] = ()) -> str:
    lines = [f"| network | method | labels | mIoU (%): mean ± std [95 % interval] (n) | per seed | vs {BASELINE} "
             "(paired by seed) | s per run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        values = ", ".join(f"{v:.2f}" for v in r["values"])
        d = difference(r, rows)
        lines.append(f"| {r['network']} | {r['method']} | {r['labeled']} | {format_estimate(stored(r))} | "
                     f"{values} | {format_difference(d) if d else ''} | {r['seconds']} |")
    for m in moved:
        lines += ["", f"The same seed moved {m['between']} by {m['mean_abs']:.2f} points on average and by "
                  f"{m['max_abs']:.2f} at most ({m['n']} runs: {', '.join(m['methods'])})."]
    return "\n".join(lines) + "\n"


def movement(pairs: list[tuple[dict, dict]], between: str) -> dict:
    """How far the same seeds moved from the first row of each pair to the second: each run's shift, their mean
    and largest size."""
    shifts = [{"method": a["method"], "network": a["network"], "seed": s, "values": [x, y], "moved": round(y - x, 2)}
              for a, b in pairs for s, x in zip(a["seeds"], a["values"], strict=True)
              if (y := by_seed(b).get(str(s))) is not None]
    sizes = [abs(s["moved"]) for s in shifts]
    return {"between": between, "methods": list(dict.fromkeys(a["method"] for a, _ in pairs)), "n": len(sizes),
            "mean_abs": round(statistics.fmean(sizes), 2), "max_abs": round(max(sizes), 2), "runs": shifts}


def same_rows(rows: list[dict], earlier: list[dict]) -> list[tuple[dict, dict]]:
    """The rows of an earlier table matched to today's by network, method and labels."""
    key = lambda r: (r["network"], r["method"], r["labels"])  # noqa: E731
    found = {key(r): r for r in rows}
    return [(e, found[key(e)]) for e in earlier if key(e) in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--no-bound", action="store_true", help="without the all-labels row")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, help="threads per run (default: the CPUs shared by --jobs)")
    parser.add_argument("--recheck-threads", type=int, help="train the --recheck-methods rows again with as many "
                        "threads per run, and say how far each seed moved")
    parser.add_argument("--recheck-methods", nargs="+", choices=list(METHODS), default=list(RECHECKED))
    parser.add_argument("--recheck-seeds", type=int, nargs="+", help="the seeds trained again (default: --seeds)")
    parser.add_argument("--against", type=Path, help="an earlier compare.json: how far the same seeds moved from it")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--reference", action="store_true", help="also write the demo's comparison table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.reference and args.overrides:
        parser.error("--reference measures the default budget: give no overrides")
    logger = ["logger=none"] if args.no_mlflow else ["logger.experiment_name=compare"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()

    def jobs(model: str, method: str, extra: list[str], name: str, folder: str = "compare",
             seeds: list[int] = args.seeds) -> list[tuple]:
        chosen = [f"model={MODELS[model]}"] if MODELS[model] else []
        replaced = {e.split("=", 1)[0] for e in extra}
        kept = [o for o in args.overrides if o.split("=", 1)[0] not in replaced]
        overrides = [f"method={method}", *chosen, *logger, *kept, *extra]
        return [(overrides + [f"seed={s}"], args.out / folder / f"{model}-{name}-seed{s}") for s in seeds]

    def results(grid: list[list[tuple]], threads: int) -> list[list[dict]]:
        """Every job of ``grid``, --jobs at a time; each inner list is one row's seeds."""
        flat = [job for row_jobs in grid for job in row_jobs]
        if not args.no_mlflow:  # one run creates the tracking store, before several open it at once
            train(*flat[0], threads)
        done = iter(pool.map(lambda job: train(*job, threads), flat))
        return [[next(done) for _ in row_jobs] for row_jobs in grid]

    rows, rechecked, moved = [], [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        for model in args.models:
            grid = [jobs(model, METHODS[method], [], METHODS[method]) for method in args.methods]
            for method, found in zip(args.methods, results(grid, threads), strict=True):
                rows.append(row(model, method, "split", args.seeds, found))
            if not args.no_bound:  # every labeled image, as many iterations as the semi-supervised runs
                bound = jobs(model, "suponly", ["split=all", f"trainer.iters={rows[-1]['iterations']}"], "all-labels")
                rows.append(row(model, BASELINE, "all", args.seeds, results([bound], threads)[0]))
            if args.recheck_threads:
                again = [m for m in args.methods if m in args.recheck_methods]
                folder = f"compare-threads{args.recheck_threads}"
                seeds = args.recheck_seeds or args.seeds
                grid = [jobs(model, METHODS[m], [], METHODS[m], folder, seeds) for m in again]
                for method, found in zip(again, results(grid, args.recheck_threads), strict=True):
                    rechecked.append((next(r for r in rows if (r["model"], r["method"], r["labels"]) == (
                        model, method, "split")), row(model, method, "split", seeds, found)))
    for r in rows:
        if d := difference(r, rows):
            r["difference"] = {"to": BASELINE, **rounded(d), "verdict": verdict(d)}
    if rechecked:
        moved.append(movement(rechecked, f"between {threads} and {args.recheck_threads} threads per run"))
    if args.against:
        earlier = json.loads(args.against.read_text())
        for e in earlier["rows"]:  # tables written before each row named its seeds
            e.setdefault("seeds", earlier["seeds"])
        moved.append(movement(same_rows(rows, earlier["rows"]), f"from the earlier table of {earlier['date']}"))

    table = markdown(rows, moved)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(table)
    record = {"date": date.today().isoformat(), "seeds": args.seeds, "threads": threads, "overrides": args.overrides,
              "rows": rows, "moved": moved, "wall_time_s": round(time.perf_counter() - started)}
    (args.out / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.reference:
        REFERENCE.write_text(json.dumps(record, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
