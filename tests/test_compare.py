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


def reference(path: Path) -> Path:
    small = {"network": "deeplabv3plus_small"}
    rows = [
        small | {"method": "SupOnly", "labels": "split", "labeled": 20, "mean": 58.54, "std": 0.71},
        small | {"method": "GTA-Seg", "labels": "split", "labeled": 20, "mean": 59.48, "std": 1.05},
        small | {"method": "SupOnly", "labels": "all", "labeled": 200, "mean": 80.97, "std": 0.0},
    ]
    path.write_text(json.dumps({"date": "2026-12-04", "seeds": [0, 1, 2], "overrides": [], "rows": rows}))
    return path


def test_the_demo_compares_itself_with_the_measured_table_only_at_that_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "REFERENCE", reference(tmp_path / "compare.json"))
    line = train.comparison(["seed=1", "logger=none", "method=mean_teacher"], "deeplabv3plus_small")
    assert "SupOnly 58.54 ± 0.71, GTA-Seg 59.48 ± 1.05; SupOnly on all 200 labels 80.97" in line
    assert "seeds 0-2" in line and "2026-12-04" in line
    assert train.comparison(["trainer.epochs=3"], "deeplabv3plus_small") is None  # another budget
    assert train.comparison(["split=50"], "deeplabv3plus_small") is None
    assert train.comparison([], "deeplabv3plus_lite0") is None  # a network the table has no rows for
    monkeypatch.setattr(train, "REFERENCE", tmp_path / "absent.json")
    assert train.comparison([], "deeplabv3plus_small") is None


@pytest.mark.slow
def test_compare_runs_the_grid_with_the_all_labels_bound(tmp_path):
    tiny = ["dataset.num_labeled_pool=8", "dataset.num_unlabeled=0", "dataset.num_val=4", "dataset.image_size=32",
            f"dataset.root={tmp_path / 'data'}", "split=4", "data.batch_size=2", "data.val_batch_size=4",
            "trainer.iters=3", "trainer.eval_every=0", "trainer.snapshot_images=0", "device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = ROOT / "scripts" / "compare_methods.py"
    done = subprocess.run([sys.executable, str(script), "--seeds", "0", "1", "--models", "own", "--no-mlflow",
                           "--out", str(tmp_path / "out"), *tiny], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    assert [(r["method"], r["labeled"]) for r in rows] == [("SupOnly", 4), ("Mean Teacher", 4), ("GTA-Seg", 4),
                                                           ("SupOnly", 8)]
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
