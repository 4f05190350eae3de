"""make compare (scripts/compare_methods.py) and the comparison line the demo prints from its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny
from hydra import compose

from gta import train

SCRIPT = ROOT / "scripts" / "compare_methods.py"


def reference(path: Path) -> Path:
    gain = {"to": "SupOnly", "mean": 0.94, "low": -0.5, "high": 2.38, "n": 5, "verdict": "tie"}
    rows = [
        {"network": "deeplabv3plus_small", "method": "SupOnly", "labels": "split", "labeled": 20, "mean": 58.54,
         "low": 57.66, "high": 59.42},
        {"network": "deeplabv3plus_small", "method": "GTA-Seg", "labels": "split", "labeled": 20, "mean": 59.48,
         "low": 58.18, "high": 60.78, "difference": gain},
        {"network": "deeplabv3plus_small", "method": "SupOnly", "labels": "all", "labeled": 200, "mean": 80.97,
         "low": 80.1, "high": 81.84},
    ]
    moved = [{"between": "between 1 and 2 threads per run", "n": 10, "mean_abs": 0.4, "max_abs": 1.23},
             {"between": "from the table of 2026-12-01", "n": 6, "mean_abs": 0.3, "max_abs": 0.5}]
    path.write_text(json.dumps({"date": "2026-12-04", "seeds": [0, 1, 2, 3, 4], "rows": rows, "moved": moved}))
    return path


def test_the_demo_compares_itself_with_the_measured_table_only_at_that_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "REFERENCE", reference(tmp_path / "compare.json"))
    line = train.comparison(["seed=1", "logger=none", "method=mean_teacher"], "deeplabv3plus_small")
    assert ("SupOnly 58.54 [57.66, 59.42], GTA-Seg 59.48 [58.18, 60.78] (tie +0.94 [-0.50, +2.38] to SupOnly); "
            "SupOnly on all 200 labels 80.97 [80.10, 81.84]") in line
    assert "seeds 0-4" in line and "2026-12-04" in line and "mean [95 % interval]" in line
    assert "may land 1.23 points from that seed's value in the table: the same seed moved that far between 1 and 2 " \
           "threads per run" in line  # the larger of the two movements measured
    assert train.comparison(["trainer.epochs=3"], "deeplabv3plus_small") is None  # another budget
    assert train.comparison(["split=50"], "deeplabv3plus_small") is None
    assert train.comparison([], "deeplabv3plus_lite0") is None  # a network the table has no rows for
    monkeypatch.setattr(train, "REFERENCE", tmp_path / "absent.json")
    assert train.comparison([], "deeplabv3plus_small") is None


def finished(run_dir: Path, value: float, labeled: int = 20) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / train.RESULT_FILE).write_text(json.dumps(
        {"value": value / 100, "network": "deeplabv3plus_small", "labeled": labeled, "iterations": 600, "wall_time_s": 100}))


def test_compare_states_intervals_ties_and_how_far_a_seed_moves(tmp_path):
    """Runs that finished before are read, not trained again: the table gives each row its interval and
    each method its difference to SupOnly paired by seed, and the rerun of two seeds at 2 threads how far they
    moved."""
    values = {"suponly": [58, 59, 60], "mean_teacher": [61, 62, 63], "gta": [60, 62, 61], "unimatch": [64, 66, 65],
              "cps": [62, 61, 63], "all-labels": [80, 81, 82]}
    for name, vs in values.items():
        for seed, v in enumerate(vs):
            finished(tmp_path / "compare" / f"own-{name}-seed{seed}", v, 200 if name == "all-labels" else 20)
    for name, shift in (("suponly", 0.5), ("gta", -1.25)):  # --recheck-seeds 0 1: seed 2 is not trained again
        for seed, v in enumerate(values[name][:2]):
            finished(tmp_path / "compare-threads2" / f"own-{name}-seed{seed}", v + shift)
    earlier = {"date": "2026-12-01", "seeds": [0, 1], "rows": [
        {"network": "deeplabv3plus_small", "method": "GTA-Seg", "labels": "split", "values": [59.5, 62.0]}]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "1", "2", "--models", "own", "--no-mlflow",
                           "--threads", "1", "--recheck-threads", "2", "--recheck-seeds", "0", "1",
                           "--against", str(tmp_path / "earlier.json"),
                           "--out", str(tmp_path)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "compare.md").read_text()
    assert "| deeplabv3plus_small | SupOnly | 20 | 59.00 ± 1.00 [56.52, 61.48] (n=3) | 58.00, 59.00, 60.00 |  |" in table
    assert "| Mean Teacher | 20 | 62.00 ± 1.00 [59.52, 64.48] (n=3) | 61.00, 62.00, 63.00 | gain +3.00 [+3.00, +3.00] " in (
        table)
    assert "| GTA-Seg | 20 | 61.00 ± 1.00 [58.52, 63.48] (n=3) | 60.00, 62.00, 61.00 | tie +2.00 [-0.48, +4.48]" in table
    assert "moved between 1 and 2 threads per run by 0.88 points on average and by 1.25 at most (4 runs: SupOnly, " \
           "GTA-Seg)" in table
    assert "moved from the earlier table of 2026-12-01 by 0.25 points on average and by 0.50 at most (2 runs: " \
           "GTA-Seg)" in table
    record = json.loads((tmp_path / "compare.json").read_text())
    gta = record["rows"][2]
    assert (gta["method"], gta["seeds"], gta["low"], gta["high"]) == ("GTA-Seg", [0, 1, 2], 58.52, 63.48)
    assert gta["difference"] == {"to": "SupOnly", "mean": 2.0, "std": 1.0, "n": 3, "low": -0.48, "high": 4.48,
                                 "verdict": "tie"}
    assert record["rows"][3]["method"] == "UniMatch" and record["rows"][3]["difference"]["mean"] == 6.0
    assert record["rows"][4]["method"] == "CPS" and record["rows"][4]["difference"]["mean"] == 3.0
    assert record["rows"][5]["labeled"] == 200 and "difference" not in record["rows"][5]
    assert [(m["n"], m["max_abs"]) for m in record["moved"]] == [(4, 1.25), (2, 0.5)]


@pytest.mark.slow
def test_compare_runs_the_grid_with_the_all_labels_bound(tmp_path):
    tiny = ["dataset.num_labeled_pool=8", "dataset.num_unlabeled=0", "dataset.num_val=4", "dataset.image_size=32",
            f"dataset.root={tmp_path / 'data'}", "split=4", "data.batch_size=2", "data.val_batch_size=4",
            "trainer.iters=3", "trainer.eval_every=0", "trainer.snapshot_images=0", "device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "1", "--models", "own", "--no-mlflow",
                           "--out", str(tmp_path / "out"), *tiny], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    assert [(r["method"], r["labeled"]) for r in rows] == [("SupOnly", 4), ("Mean Teacher", 4), ("GTA-Seg", 4),
                                                           ("UniMatch", 4), ("CPS", 4), ("SupOnly", 8)]
    assert all(len(r["values"]) == 2 and r["iterations"] == 3 for r in rows)  # the bound: as many iterations
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    assert table[0].startswith("| network | method | labels |") and len(table) == 2 + len(rows)


@pytest.mark.slow
def test_a_run_composed_in_a_script_does_not_claim_the_demos_budget(tmp_path, monkeypatch, capsys, hydra_conf):
    """A script that composes its own budget (``trainer.iters=60``, say) has no command line to check."""
    monkeypatch.setattr(train, "REFERENCE", reference(tmp_path / "compare.json"))
    cfg = compose("train", overrides=[*tiny(tmp_path / "data"), "method=suponly"])  # the small network: deeplabv3plus_small
    train.run(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "val mIoU student" in out and "make compare" not in out
