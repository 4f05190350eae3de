"""The report's arithmetic and layout, from hand-made runs (no MLflow store needed)."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import gta

from gta.report import Layout, cells, draw, figure, markdown, named_axes, results, varying_keys, write_csv


def run(row=None, column=None, seed=0, miou=0.5, status="FINISHED", start=0, overrides="", params=None,
        **metrics):
    tags = {"seed": str(seed), "overrides": overrides}
    tags |= {"row": row} if row is not None else {}
    tags |= {"column": column} if column is not None else {}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"r{row}{column}{seed}{start}", status=status, start_time=start),
        data=SimpleNamespace(tags=tags, metrics={"val/miou": miou, **metrics}, params=params or {}),
    )


def chart(layout, rows, columns, table):
    """What the chart says: legend title and entries, x-axis label and tick labels."""
    (ax,) = figure(layout, rows, columns, table).axes
    legend = ax.get_legend()
    return (legend.get_title().get_text(), [t.get_text() for t in legend.get_texts()], ax.get_xlabel(),
            [t.get_text() for t in ax.get_xticklabels()])


def split(family, name, sha1):
    return {"split/family": family, "split/list": name, "split/size": name, "split/labeled_sha1": sha1}


LAYOUT = Layout(
    title="Table 1", rows={"suponly": "SupOnly", "gta": "GTA-Seg"}, columns={"92": "92", "183": "183"},
    paper={"gta": {"92": 70.02, "183": 73.16}},
)


def test_mean_sample_std_and_interval_over_seeds_with_paper_values():
    """70, 72, 74: mean 72, std 2, the mean's 95 % interval 72 ± 4.3027 * 2 / sqrt(3) = [67.03, 76.97]."""
    runs = [run("gta", "92", s, v) for s, v in enumerate([0.70, 0.72, 0.74])]
    runs += [run("suponly", "92", 0, 0.40), run("gta", "183", 0, 0.73)]
    placed, notes = results(runs, LAYOUT)
    rows, columns, table = cells(placed, LAYOUT)
    assert not notes and rows == ["suponly", "gta"] and columns == ["92", "183"]
    cell = table[("gta", "92")]
    assert cell.mean == pytest.approx(72.0) and cell.std == pytest.approx(2.0) and cell.n == 3
    assert (cell.spread.low, cell.spread.high) == (pytest.approx(67.0317, abs=1e-4), pytest.approx(76.9683, abs=1e-4))
    assert cell.paper == 70.02 and math.isnan(table[("gta", "183")].std)
    text = markdown(LAYOUT, rows, columns, table)
    assert "mean ± sample std over seeds [95% interval of the mean, Student t] (n runs)" in text
    assert "|  | 92 | paper | 183 | paper |" in text
    assert "| GTA-Seg | 72.00 ± 2.00 [67.03, 76.97] (n=3) | 70.02 | 73.00 (n=1) | 73.16 |" in text
    assert "| SupOnly | 40.00 (n=1) |  |  |  |" in text
    # one seed in common with SupOnly: a difference, but no interval to call it a gain
    assert "| GTA-Seg | +30.00 (n=1, no interval) |  |" in text
    assert "; paper: the paper's value (the experiment file's `report.paper`)." in text
    # a table keeps its tags' layout: named_axes leaves it alone
    assert named_axes(LAYOUT, runs) is LAYOUT
    assert chart(LAYOUT, rows, columns, table) == ("", ["paper", "SupOnly", "GTA-Seg"], "", ["92", "183"])


THREE = Layout(title="Three", rows={"suponly": "SupOnly", "mt": "MT", "gta": "GTA-Seg"})


def test_each_row_against_the_baseline_paired_by_seed(tmp_path):
    """GTA-Seg ahead of SupOnly in every seed (2, 3, 1 points) is still a tie: [-0.48, +4.48] contains 0;
    MT 3 points ahead in every seed is a gain. The baseline is the first row, or report.baseline."""
    values = {"suponly": [58, 59, 60], "mt": [61, 62, 63], "gta": [60, 62, 61]}
    runs = [run(row, "20", s, v / 100) for row, vs in values.items() for s, v in enumerate(vs)]
    rows, columns, table = cells(results(runs, THREE)[0], THREE)
    assert table[("suponly", "20")].difference is None
    tie = table[("gta", "20")].difference
    assert (tie.low, tie.high) == (pytest.approx(-0.4841, abs=1e-4), pytest.approx(4.4841, abs=1e-4))
    text = markdown(THREE, rows, columns, table)
    diffs = text.split("Difference to SupOnly (points), paired by seed: mean [95% interval] (n pairs); "
                       "a tie when the interval contains 0.")[1]
    assert "| MT | gain +3.00 [+3.00, +3.00] (n=3) |" in diffs
    assert "| GTA-Seg | tie +2.00 [-0.48, +4.48] (n=3) |" in diffs and "SupOnly" not in diffs
    with write_csv(tmp_path / "table.csv", THREE, rows, columns, table).open() as f:
        records = {r["row"]: r for r in csv.DictReader(f)}
    assert (records["gta"]["difference"], records["gta"]["difference_low"], records["gta"]["difference_n"]) == (
        "2.0000", "-0.4841", "3")
    assert records["gta"]["low"] == "58.5159" and records["suponly"]["difference"] == ""
    against_gta = replace(THREE, baseline="gta")
    rows, columns, table = cells(results(runs, against_gta)[0], against_gta)
    text = markdown(against_gta, rows, columns, table)
    assert "Difference to GTA-Seg" in text and "| SupOnly | tie -2.00 [-4.48, +0.48] (n=3) |" in text


def test_unfinished_runs_are_left_out_and_the_latest_rerun_wins():
    runs = [run("gta", "92", 0, 0.1, start=1), run("gta", "92", 0, 0.3, start=2),
            run("gta", "92", 1, 0.9, status="FAILED", start=3)]
    placed, notes = results(runs, LAYOUT)
    assert [r.value for r in placed] == [pytest.approx(30.0)]
    assert len(notes) == 1 and "FAILED" in notes[0]


def test_one_row_per_metric():
    layout = Layout(metrics={"GTA": "val/assistant/miou", "teacher": "val/teacher/miou"},
                    paper={"teacher": {"183": 73.16}})
    runs = [run("model", "183", s, **{"val/assistant/miou": 0.6, "val/teacher/miou": 0.7}) for s in (0, 1)]
    rows, columns, table = cells(results(runs, layout)[0], layout)
    assert rows == ["GTA", "teacher"] and columns == ["183"]
    assert table[("teacher", "183")].mean == pytest.approx(70.0) and table[("teacher", "183")].n == 2


def test_without_row_tags_the_varying_overrides_are_the_axes():
    """The first varying key heads the rows, the others label the columns key=value."""
    runs = [run(seed=s, overrides=f"split=4 ema.alpha={a} method.warmup_epochs={w} seed={s}")
            for a in ("0.9", "0.99") for w in ("0", "1") for s in (0, 1)]
    assert varying_keys(runs) == ["ema.alpha", "method.warmup_epochs"]
    layout = named_axes(Layout(), runs)
    rows, columns, table = cells(results(runs, layout)[0], layout)
    assert rows == ["0.9", "0.99"]
    assert columns == ["method.warmup_epochs=0", "method.warmup_epochs=1"]
    assert all(cell.n == 2 for cell in table.values())
    text = markdown(layout, rows, columns, table)
    assert "| ema.alpha | method.warmup_epochs=0 | method.warmup_epochs=1 |" in text
    assert "| 0.99 | 50.00 ± 0.00 [50.00, 50.00] (n=2) | 50.00 ± 0.00 [50.00, 50.00] (n=2) |" in text
    assert chart(layout, rows, columns, table) == (
        "ema.alpha", ["0.9", "0.99"], "method.warmup_epochs", ["method.warmup_epochs=0", "method.warmup_epochs=1"])


def test_a_sweep_of_one_key_has_one_column_named_by_the_metric(tmp_path):
    """`--multirun method=suponly,gta seed=0,1` without an experiment file: a row per method under the
    header `method`, one column headed `val/miou`; no `-`, and no paper anywhere, since none is known."""
    runs = [run(seed=s, miou=v + s / 100, overrides=f"split=4 method={m} seed={s}")
            for m, v in (("suponly", 0.4), ("gta", 0.6)) for s in (0, 1)]
    layout = named_axes(Layout(title="12-00-00"), runs)
    rows, columns, table = cells(results(runs, layout)[0], layout)
    assert rows == ["gta", "suponly"]
    text = markdown(layout, rows, columns, table)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | val/miou |"
    assert lines[2:4] == ["| gta | 60.50 ± 0.71 [54.15, 66.85] (n=2) |", "| suponly | 40.50 ± 0.71 [34.15, 46.85] (n=2) |"]
    assert lines[6:] == ["| suponly | loss -20.00 [-20.00, -20.00] (n=2) |"]
    assert "-" not in lines[0] and "paper" not in text
    with write_csv(tmp_path / "table.csv", layout, rows, columns, table).open() as f:
        assert {r["column_label"] for r in csv.DictReader(f)} == {"val/miou"}
    assert chart(layout, rows, columns, table) == ("method", ["gta", "suponly"], "val/miou", [])
    png = draw(tmp_path / "table.png", layout, rows, columns, table)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_the_labeled_lists_of_the_runs_are_named(tmp_path):
    """Which published list (family, name, hash) each cell trained on: in the Markdown and the CSV, with
    cells whose runs differ marked."""
    paper_92, paper_183 = split("paper", "92", "a" * 40), split("paper", "183", "b" * 40)
    runs = [run("gta", "92", s, 0.7, params=paper_92) for s in (0, 1)]
    runs += [run("gta", "183", 0, 0.7, params=paper_183), run("gta", "183", 1, 0.7, params=split("cps", "183", "c" * 40))]
    rows, columns, table = cells(results(runs, LAYOUT)[0], LAYOUT)
    assert table[("gta", "92")].splits == (("paper", "92", "92", "a" * 40),) and len(table[("gta", "183")].splits) == 2
    text = markdown(LAYOUT, rows, columns, table)
    assert "| GTA-Seg | 70.00 ± 0.00 [70.00, 70.00] (n=2) | 70.02 | 70.00 ± 0.00 [70.00, 70.00] (n=2) † | 73.16 |" in text
    assert "paper 92 (92 images, `aaaaaaaa`), cps 183 (183 images, `cccccccc`), paper 183 (183 images" in text
    assert "† the runs of this cell trained on different labeled lists" in text
    with write_csv(tmp_path / "table.csv", LAYOUT, rows, columns, table).open() as f:
        records = {r["column"]: r for r in csv.DictReader(f)}
    assert (records["92"]["split_family"], records["92"]["split_list"], records["92"]["split_size"]) == (
        "paper", "92", "92")
    assert records["92"]["labeled_sha1"] == "a" * 40
    assert (records["183"]["split_family"], records["183"]["labeled_sha1"]) == ("cps;paper", f"{'c' * 40};{'b' * 40}")


@pytest.mark.slow
def test_a_source_without_runs_ends_with_its_message(tmp_path):
    """A directory that is no sweep, or a name no run is tagged with: the message alone, exit status 1."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    not_a_sweep = gta("report", str(tmp_path), "--tracking-uri", store, cwd=tmp_path, returncode=1)
    assert "holds no mlflow_parent.json: not a sweep logged to MLflow" in not_a_sweep.stderr
    unknown = gta("report", "table42", "--tracking-uri", store, cwd=tmp_path, returncode=1)
    assert "no runs tagged experiment=table42" in unknown.stderr
    assert "Traceback" not in not_a_sweep.stderr + unknown.stderr


def test_a_sweep_whose_server_was_away_says_to_sync_first(tmp_path):
    from gta.tracking.sweep import SweepParent

    SweepParent("http://127.0.0.1:1", None, None, ("seed",)).write(tmp_path / "sweep")  # its parent never created
    said = gta("report", str(tmp_path / "sweep"), cwd=tmp_path, returncode=1).stderr
    assert f"never reached its tracking server http://127.0.0.1:1: `python -m gta sync {tmp_path / 'sweep'}`" in said
