"""``python -m gta report SOURCE``: a sweep's runs as the paper's table.

SOURCE is a sweep directory (it holds ``mlflow_parent.json``), the id of a sweep's parent run, or an
experiment file's name (``table4``, ``instant/table4``: every finished run tagged with it, across
sweeps). Runs are placed by their ``row`` / ``column`` tags (set from ``report.row`` / ``report.column``
of the experiment file) and averaged over seeds; the experiment file's ``report`` node names and orders
rows and columns and holds the paper's numbers. Without row / column tags, the keys that differ between
the runs' overrides (seed aside) become the rows and columns: the first key heads the rows, each row one
of its values; the other keys label the columns ``key=value``; with one key (or none) there is a single
column, headed by the metric.

The table says which labeled images its cells trained on (the runs' ``split/*`` params: family, list, size,
SHA-1 of labeled.txt), since results on different published lists are not comparable. Each cell gives its
mean, sample std, n and the mean's 95 % Student-t interval; below the table, each row's difference to the
baseline row (``report.baseline``, else the first) in the same column, paired by seed, with its interval and
called a tie when that interval contains 0 (gta/stats.py). It is printed, written as Markdown and CSV, drawn
as a PNG and logged to the parent run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gta.errors import MissingPathError, NoRunsError
from gta.stats import CONFIDENCE, Estimate, estimate, format_difference, format_estimate, paired
from gta.tracking.sweep import PARENT_FILE, SweepParent

RUN_ID = re.compile(r"[0-9a-f]{32}")
PARENT_TAG = "mlflow.parentRunId"
NO_COLUMN = "-"


@dataclass
class Layout:
    """How the table looks: the ``report`` node of an experiment file."""

    title: str = "Sweep"
    rows: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    metric: str = "val/miou"
    metrics: dict[str, str] = field(default_factory=dict)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    #: what the rows are (the table's top-left cell, the chart legend's title) and the columns (the
    #: chart's x axis); named for sweeps without an experiment file (named_axes), empty for tables
    row_header: str = ""
    column_axis: str = ""
    #: the row every other row's difference is taken to (paired by seed); empty: the first row
    baseline: str = ""

    @property
    def measured(self) -> str:
        """The metric keys the cells average, as the caption names them."""
        return ", ".join(self.metrics.values()) or self.metric

    @classmethod
    def from_config(cls, report: DictConfig | Mapping | None, fallback_title: str = "Sweep") -> Layout:
        if report is None:
            return cls(title=fallback_title)
        node = OmegaConf.create(report) if not isinstance(report, DictConfig) else report
        # Only plain values are read: row / column are per-run interpolations that the runs resolved.
        plain = lambda key: OmegaConf.to_container(node[key]) if key in node else {}  # noqa: E731
        paper = {str(r): {str(c): float(v) for c, v in cols.items()} for r, cols in plain("paper").items()}
        return cls(
            title=str(node.get("title") or node.get("table") or fallback_title),
            rows={str(k): str(v) for k, v in plain("rows").items()},
            columns={str(k): str(v) for k, v in plain("columns").items()},
            metric=str(node.get("metric") or "val/miou"),
            metrics={str(k): str(v) for k, v in plain("metrics").items()},
            paper=paper,
            baseline=str(node.get("baseline") or ""),
        )


#: the run params that say which labeled images a run trained on (gta.data.split_params)
SPLIT_PARAMS = ("split/family", "split/list", "split/size", "split/labeled_sha1")
NO_SPLIT = ("", "", "", "")


@dataclass(frozen=True)
class Result:
    """One run's number for one cell, in percent, and its labeled list (the values of SPLIT_PARAMS)."""

    row: str
    column: str
    seed: str
    value: float
    split: tuple[str, ...] = NO_SPLIT


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    #: the mean over seeds, its sample std, n and interval
    spread: Estimate
    paper: float | None
    #: the labeled lists of the cell's runs (values of SPLIT_PARAMS); one unless the runs differ
    splits: tuple[tuple[str, ...], ...] = ()
    #: each seed's value
    seeds: Mapping[str, float] = field(default_factory=dict)
    #: to the baseline row's cell of the same column, paired by seed (None for the baseline itself)
    difference: Estimate | None = None

    @property
    def mean(self) -> float:
        return self.spread.mean

    @property
    def std(self) -> float:
        return self.spread.std

    @property
    def n(self) -> int:
        return self.spread.n


# --- from runs to results ----------------------------------------------------------------------------------
def parse_overrides(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs}


def varying_keys(runs: list[Any]) -> list[str]:
    """Override keys whose values differ between runs, seed aside, in the order they were given."""
    parsed = [parse_overrides(r.data.tags.get("overrides", "")) for r in runs]
    keys: list[str] = []
    for overrides in parsed:
        keys += [k for k in overrides if k not in keys and k != "seed"]
    return [k for k in keys if len({o.get(k) for o in parsed}) > 1]


def oldest_first(runs: list[Any]) -> list[Any]:
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def finished(runs: list[Any]) -> list[Any]:
    """The finished runs, oldest first."""
    return [r for r in oldest_first(runs) if r.info.status == "FINISHED"]


def named_axes(layout: Layout, runs: list[Any]) -> Layout:
    """The layout of a sweep whose runs carry no row / column tags, with rows and columns named after the
    keys that vary (results places the runs by them); a table's layout as it is."""
    done = finished(runs)
    if any(r.data.tags.get("row") or r.data.tags.get("column") for r in done):
        return layout
    axes = varying_keys(done)
    if len(axes) > 1:
        return replace(layout, row_header=axes[0], column_axis=", ".join(axes[1:]))
    return replace(layout, row_header=axes[0] if axes else "", column_axis=layout.measured,
                   columns={NO_COLUMN: layout.measured, **layout.columns})


def results(runs: list[Any], layout: Layout) -> tuple[list[Result], list[str]]:
    """Each finished run's numbers placed in the table, the latest run of a (row, column, seed) winning;
    and a note for each run left out."""
    notes = [f"run {r.info.run_id} is {r.info.status}: left out"
             for r in oldest_first(runs) if r.info.status != "FINISHED"]
    done = finished(runs)
    axes = varying_keys(done)
    placed: dict[tuple[str, str, str], Result] = {}
    for run in done:
        tags = run.data.tags
        overrides = parse_overrides(tags.get("overrides", ""))
        row = tags.get("row") or (str(overrides.get(axes[0])) if axes else "run")
        column = tags.get("column") or (
            " ".join(f"{k}={overrides.get(k)}" for k in axes[1:]) if len(axes) > 1 else NO_COLUMN
        )
        seed = tags.get("seed", "?")
        params = getattr(run.data, "params", {})
        split = tuple(params.get(key, "") for key in SPLIT_PARAMS)
        metrics = layout.metrics or {row: layout.metric}
        for label, key in metrics.items():
            if key not in run.data.metrics:
                notes.append(f"run {run.info.run_id} has no metric {key}: left out of row {label}")
                continue
            placed[(label, column, seed)] = Result(label, column, seed, 100.0 * run.data.metrics[key], split)
    return list(placed.values()), notes


def ordered(found: Iterable[str], declared: Mapping[str, str]) -> list[str]:
    """Declared keys first, in their order (those with results only), then the others sorted."""
    found = set(found)
    def natural(key: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))
    return [k for k in declared if k in found] + sorted(found - set(declared), key=natural)


def baseline_row(layout: Layout, rows: list[str]) -> str | None:
    return layout.baseline if layout.baseline in rows else (rows[0] if rows else None)


def cells(results: list[Result], layout: Layout) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """Mean, sample std and interval over seeds for every (row, column) with results, and its difference
    to the baseline row's cell of the same column, paired by seed."""
    groups: dict[tuple[str, str], dict[str, float]] = {}
    splits: dict[tuple[str, str], set[tuple[str, ...]]] = {}
    for r in results:
        groups.setdefault((r.row, r.column), {})[r.seed] = r.value
        splits.setdefault((r.row, r.column), set()).add(r.split)
    rows = ordered((r for r, _ in groups), layout.rows)
    columns = ordered((c for _, c in groups), layout.columns)
    base = baseline_row(layout, rows)
    table = {}
    for (row, column), seeds in groups.items():
        baseline = groups.get((base, column)) if row != base else None
        table[(row, column)] = Cell(row, column, estimate(list(seeds.values())), layout.paper.get(row, {}).get(column),
                                    tuple(sorted(splits[(row, column)])), seeds,
                                    paired(seeds, baseline) if baseline else None)
    return rows, columns, table


# --- rendering ---------------------------------------------------------------------------------------------
MIXED = "†"


def format_cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    return format_estimate(cell.spread) + (f" {MIXED}" if len(cell.splits) > 1 else "")


def format_split(split: tuple[str, ...]) -> str:
    family, name, size, sha1 = split
    return f"{family} {name} ({size} images, `{sha1[:8]}`)" if family else "not logged"


def markdown(layout: Layout, rows: list[str], columns: list[str], table: dict[tuple[str, str], Cell]) -> str:
    with_paper = [c for c in columns if any(layout.paper.get(r, {}).get(c) is not None for r in rows)]
    header = [layout.row_header, *(h for c in columns for h in
                                   ([layout.columns.get(c, c)] + (["paper"] if c in with_paper else [])))]
    paper = "; paper: the paper's value (the experiment file's `report.paper`)" if with_paper else ""
    lines = [
        f"## {layout.title}",
        "",
        f"mIoU (%) of `{layout.measured}`: mean ± sample std over seeds [{CONFIDENCE:.0%} interval of the mean, "
        f"Student t] (n runs){paper}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        values = [layout.rows.get(row, row)]
        for column in columns:
            values.append(format_cell(table.get((row, column))))
            if column in with_paper:
                paper = layout.paper.get(row, {}).get(column)
                values.append("" if paper is None else f"{paper:.2f}")
        lines.append("| " + " | ".join(values) + " |")
    lines += differences(layout, rows, columns, table)
    cells = [table[(r, c)] for c in columns for r in rows if (r, c) in table]
    lists = dict.fromkeys(split for cell in cells for split in cell.splits)
    lines += ["", "Labeled images (data.splits family and list, SHA-1 of the runs' split/labeled.txt): "
              + ", ".join(map(format_split, lists)) + "."]
    if any(len(cell.splits) > 1 for cell in cells):
        lines.append(f"{MIXED} the runs of this cell trained on different labeled lists.")
    return "\n".join(lines) + "\n"


def differences(layout: Layout, rows: list[str], columns: list[str], table: dict[tuple[str, str], Cell]) -> list[str]:
    """The table of differences to the baseline row, paired by seed; none when no row has one."""
    compared = [r for r in rows if any(table.get((r, c)) and table[(r, c)].difference for c in columns)]
    if not compared:
        return []
    base = baseline_row(layout, rows)
    label = lambda row: layout.rows.get(row, row)  # noqa: E731
    lines = ["", f"Difference to {label(base)} (points), paired by seed: mean [{CONFIDENCE:.0%} interval] (n pairs); "
             "a tie when the interval contains 0.", "",
             "| " + " | ".join([layout.row_header, *(layout.columns.get(c, c) for c in columns)]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for row in compared:
        found = [table.get((row, c)) for c in columns]
        lines.append("| " + " | ".join([label(row), *(format_difference(cell.difference)
                                                      if cell and cell.difference else "" for cell in found)]) + " |")
    return lines


def number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def write_csv(path: Path, layout: Layout, rows: list[str], columns: list[str],
              table: dict[tuple[str, str], Cell]) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row", "row_label", "column", "column_label", "mean", "std", "n", "low", "high", "paper",
                      "split_family", "split_list", "split_size", "labeled_sha1",
                      "difference", "difference_low", "difference_high", "difference_n"])
        for row in rows:
            for column in columns:
                cell = table.get((row, column))
                if cell is None:
                    continue
                # several values joined by ";" where the cell's runs differ
                split = [";".join(dict.fromkeys(part)) for part in zip(*cell.splits, strict=True)]
                d = cell.difference
                difference = ["", "", "", ""] if d is None else [number(d.mean), number(d.low), number(d.high), d.n]
                out.writerow([row, layout.rows.get(row, row), column, layout.columns.get(column, column),
                              number(cell.mean), number(cell.std), cell.n, number(cell.spread.low),
                              number(cell.spread.high), "" if cell.paper is None else cell.paper, *split, *difference])
    return path


def figure(layout: Layout, rows: list[str], columns: list[str], table: dict[tuple[str, str], Cell]) -> Any:
    """Grouped bars: one group per column, one bar per row, the mean's interval as error bars, the paper as marks
    (a matplotlib Figure, drawn without pyplot)."""
    from matplotlib.figure import Figure

    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(5.0, 0.6 * len(columns) * len(rows) + 2.0), 3.8))
    ax = fig.subplots()
    for i, row in enumerate(rows):
        xs, means, halves, paper_x, paper_y = [], [], [], [], []
        for j, column in enumerate(columns):
            cell = table.get((row, column))
            if cell is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            xs.append(x)
            means.append(cell.mean)
            halves.append(0.0 if not cell.spread.has_interval else cell.spread.high - cell.mean)
            if cell.paper is not None:
                paper_x.append(x)
                paper_y.append(cell.paper)
        ax.bar(xs, means, width, yerr=halves, capsize=2, label=layout.rows.get(row, row))
        ax.plot(paper_x, paper_y, "k_", markersize=12, markeredgewidth=2)
    if any(cell.paper is not None for cell in table.values()):
        ax.plot([], [], "k_", markersize=12, markeredgewidth=2, label="paper")
    if columns == [NO_COLUMN]:
        ax.set_xticks([])  # the one group needs no tick: the axis label says what it shows
    else:
        ax.set_xticks(range(len(columns)), [layout.columns.get(c, c) for c in columns])
    ax.set_xlabel(layout.column_axis)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(textwrap.fill(layout.title, 70), fontsize=9)
    ax.legend(fontsize=7, loc="lower right", title=layout.row_header or None, title_fontsize=7)
    fig.tight_layout()
    return fig


def draw(path: Path, layout: Layout, rows: list[str], columns: list[str],
         table: dict[tuple[str, str], Cell]) -> Path:
    figure(layout, rows, columns, table).savefig(path, dpi=120)
    return path


# --- finding the runs --------------------------------------------------------------------------------------
@dataclass
class Source:
    client: Any
    runs: list[Any]
    layout: Layout
    name: str
    parent_id: str | None = None
    sweep_dir: Path | None = None


def search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def children(client: Any, parent_id: str) -> list[Any]:
    parent = client.get_run(parent_id)
    return search_all(client, [parent.info.experiment_id], f"tags.{PARENT_TAG} = '{parent_id}'")


def layout_of_sweep(sweep_dir: Path | None) -> Layout | None:
    config = None if sweep_dir is None else sweep_dir / "multirun.yaml"
    if config is None or not config.is_file():
        return None
    return Layout.from_config(OmegaConf.load(config).get("report"), fallback_title=sweep_dir.name)


def layout_of_experiment(name: str) -> Layout:
    from hydra import compose, initialize_config_dir

    from gta.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}"])
    return Layout.from_config(cfg.report, fallback_title=name)


def locate(source: str, tracking_uri: str | None) -> Source:
    from mlflow import MlflowClient

    from gta.tracking.mlflow import resolve_tracking_uri

    path = Path(source)
    if path.is_dir():
        parent = SweepParent.read(path)
        if parent is None:
            raise MissingPathError(f"{path} holds no {PARENT_FILE}: not a sweep logged to MLflow")
        if parent.run_id is None:
            raise NoRunsError(f"the sweep in {path} never reached its tracking server {parent.tracking_uri}: "
                              f"`python -m gta sync {path}` sends its runs there, then report it")
        client = MlflowClient(parent.tracking_uri)
        layout = layout_of_sweep(path) or Layout(title=path.name)
        return Source(client, children(client, parent.run_id), layout, path.name, parent.run_id, path)

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    if RUN_ID.fullmatch(source):
        parent = client.get_run(source)
        sweep_dir = Path(parent.data.tags["sweep_dir"]) if "sweep_dir" in parent.data.tags else None
        experiment = parent.data.tags.get("experiment")
        layout = layout_of_sweep(sweep_dir) or (layout_of_experiment(experiment) if experiment else None)
        name = parent.info.run_name or source
        return Source(client, children(client, source), layout or Layout(title=name), name, source, sweep_dir)

    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = search_all(client, experiments, f"tags.experiment = '{source}'") if experiments else []
    jobs = [r for r in runs if PARENT_TAG in r.data.tags]
    if not jobs:
        raise NoRunsError(
            f"no runs tagged experiment={source} at {client.tracking_uri}; give a sweep directory, a parent "
            "run id or the name of an experiment file that was swept (python -m gta train --multirun "
            f"+experiment={source})"
        )
    latest = max(jobs, key=lambda r: r.info.start_time or 0)
    return Source(client, jobs, layout_of_experiment(source), source, latest.data.tags[PARENT_TAG])


# --- the command -------------------------------------------------------------------------------------------
@dataclass
class Report:
    markdown: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    files: list[Path]
    notes: list[str]


def report(source: str, out_dir: str | Path | None = None, tracking_uri: str | None = None) -> Report:
    found = locate(source, tracking_uri)
    layout = named_axes(found.layout, found.runs)
    placed, notes = results(found.runs, layout)
    if not placed:
        raise NoRunsError(f"no finished runs with results for {source}" + "".join(f"\n  {n}" for n in notes))
    rows, columns, table = cells(placed, layout)
    text = markdown(layout, rows, columns, table)
    if out_dir is None and found.sweep_dir is not None and found.sweep_dir.is_dir():
        out_dir = found.sweep_dir / "report"
    # a run's name ("table4: method × seed") as a directory name: letters, digits, . = - _
    out = Path(out_dir or Path("reports") / re.sub(r"[^\w.=-]+", "_", found.name))
    out.mkdir(parents=True, exist_ok=True)
    md = out / "table.md"
    md.write_text(text)
    files = [md, write_csv(out / "table.csv", layout, rows, columns, table),
             draw(out / "table.png", layout, rows, columns, table)]
    if found.parent_id is not None:
        for path in files:
            found.client.log_artifact(found.parent_id, str(path), "report")
    return Report(text, rows, columns, table, files, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sweep directory, a parent run id, or an experiment name (table4)")
    parser.add_argument("--out", help="where table.md, table.csv and table.png go "
                                      "(default: <sweep dir>/report, else reports/<name>)")
    parser.add_argument("--tracking-uri", help="the MLflow store of a run id or experiment name "
                                               "(default: GTA_TRACKING_URI, else mlflow.db in the current directory)")
    args = parser.parse_args(argv)
    result = report(args.source, args.out, args.tracking_uri or os.environ.get("GTA_TRACKING_URI"))
    print(result.markdown)
    for note in result.notes:
        print(f"note: {note}")
    print("written: " + ", ".join(str(p) for p in result.files))
