"""SupOnly vs Mean Teacher vs GTA-Seg on the embedded dataset at the default budget, over three seeds.

Writes bench-results/compare.json and compare.md (teacher mIoU, mean ± std) and prints the table.
Every run is also logged to MLflow (experiment "compare") unless --no-mlflow is given.
Usage: python scripts/compare_methods.py [--seeds 0 1 2] [--no-mlflow] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from gta.config import CONF_DIR, PROJECT_ROOT, register_configs
from gta.train import run

#: the baselines as the paper's tables define them (conf/variant/)
METHODS = {"SupOnly": "suponly", "Mean Teacher": "mean_teacher", "GTA-Seg": "gta"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench-results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logger = ["logger=none"] if args.no_mlflow else ["logger.experiment_name=compare"]

    register_configs()
    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, variant in METHODS.items():
            for seed in args.seeds:
                cfg = compose("train", overrides=[f"variant={variant}", f"seed={seed}", *logger, *args.overrides])
                run_dir = args.out / "compare" / f"{variant}-seed{seed}"
                results.setdefault(name, []).append(run(cfg, run_dir))

    rows = []
    for name, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append((name, 100 * statistics.mean(values), 100 * std, [round(100 * v, 2) for v in values]))
    table = ["| method | teacher mIoU (%) | per seed |", "|---|---|---|"]
    table += [f"| {n} | {m:.2f} ± {s:.2f} | {', '.join(map(str, v))} |" for n, m, s, v in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text("\n".join(table) + "\n")
    (args.out / "compare.json").write_text(json.dumps(
        {"seeds": args.seeds, "overrides": args.overrides, "miou": results,
         "wall_time_s": time.perf_counter() - started}, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
