"""The published split lists: shipped whole, found by ``data.splits`` and ``split``, read in both formats,
trained on exactly, logged, and refused with the culprit named when they do not fit the data."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import ROOT, Recorder, tiny
from hydra import compose
from layouts import VOC_SBD_ONLY, write_cityscapes, write_voc

from gta.data import LISTS_DIR, Cityscapes, PascalVOC, PascalVOCAug, SyntheticShapes, published_list, select_split
from gta.train import REFERENCE
from gta.train import run as train

PAPER_92 = LISTS_DIR / "paper" / "pascal_voc" / "92.txt"
CPS_CITYSCAPES_1_16 = LISTS_DIR / "cps" / "cityscapes" / "1_16.txt"

#: the labeled images of each list not named by its size
CPS_SIZES = {
    "pascal_voc_aug": {"1_16": 662, "1_8": 1323, "1_4": 2646, "u2pl_1_16": 662, "u2pl_1_8": 1323, "u2pl_1_4": 2646},
    "cityscapes": {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488},
}


def first_column(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_ids(path: Path) -> list[str]:
    return [Path(entry).stem for entry in first_column(path)]


def cityscapes_cities(path: Path) -> dict[str, list[str]]:
    """``leftImg8bit/train/<city>/<name>_leftImg8bit.png`` entries as {city: [name, ...]}."""
    cities = defaultdict(list)
    for entry in first_column(path):
        city, image = entry.split("/")[-2:]
        cities[city].append(image.removesuffix("_leftImg8bit.png"))
    return dict(cities)


@pytest.fixture(scope="module")
def voc_92(tmp_path_factory) -> Path:
    """A VOC + SBD tree whose 1464 fine train images are the paper's 92 labeled ones (and a few more)."""
    train = voc_ids(PAPER_92) + ["2007_999990", "2007_999991"]
    return write_voc(tmp_path_factory.mktemp("voc92") / "VOCdevkit" / "VOC2012", size=(24, 30), train=train)


@pytest.fixture(scope="module")
def cityscapes_186(tmp_path_factory) -> Path:
    """A Cityscapes tree whose training images are the 186 of CPS's 1_16 list and two more."""
    root = tmp_path_factory.mktemp("cs186")
    train = cityscapes_cities(CPS_CITYSCAPES_1_16)
    train["zurich"] += ["zurich_999999_000019", "zurich_999998_000019"]
    write_cityscapes(root, train=train)
    return root


# --- what is shipped ----------------------------------------------------------------------------------------


def test_every_list_is_whole_and_of_its_size():
    lists = sorted(LISTS_DIR.glob("*/*/*.txt"))
    assert len(lists) == 30
    for path in lists:
        family, dataset, name = path.parts[-3], path.parent.name, path.stem
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert len(lines) == len(set(lines)), path
        assert len(lines) == (int(name) if name.isdigit() else CPS_SIZES[dataset][name]), path
        columns = {len(line.split()) for line in lines}
        assert columns == ({1} if family == "paper" else {2}), path


def test_the_lists_and_the_demos_comparison_table_are_package_data():
    """A non-editable install carries exactly the files pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = {p for pattern in config["package-data"]["gta.data"] for p in (ROOT / "gta/data").glob(pattern)}
    assert REFERENCE.is_file()
    assert declared == set(LISTS_DIR.rglob("*.txt")) | {REFERENCE}


# --- finding a list -----------------------------------------------------------------------------------------


def test_a_size_without_a_list_names_the_lists_there_are(tmp_path):
    absent = tmp_path / "no-dataset-here"  # the list is looked up before the dataset is read
    with pytest.raises(ValueError, match=r"split=100: .*paper list for dataset=pascal_voc; .*92, 183, 366, 732, 1464"):
        select_split(PascalVOC(absent), 100, family="paper")
    with pytest.raises(ValueError, match=r"split=183: .*cps list for dataset=pascal_voc_aug; .*1_4, 1_8, 1_16, u2pl_1_4"):
        select_split(PascalVOCAug(absent), 183, family="cps")
    with pytest.raises(ValueError, match=r"data.splits=paper: SyntheticShapes has no published .*data.splits=random"):
        select_split(SyntheticShapes(absent), 20, family="paper")
    with pytest.raises(ValueError, match=r"data.splits='u2pl' .*paper, cps, random"):
        select_split(PascalVOC(absent), 183, family="u2pl")
    with pytest.raises(ValueError, match=r"got 'u2pl_1_16' .*needs data.splits=paper or cps"):
        select_split(PascalVOCAug(absent), "u2pl_1_16", family="random")


def test_list_names_as_hydra_reads_them(hydra_conf):
    """Hydra reads ``split=1_16`` as the number 116 (digit grouping); the list of that name is found."""
    cfg = compose("train", overrides=["dataset=cityscapes", "data.splits=cps", "split=1_16"])
    assert cfg.split == 116
    assert published_list(Cityscapes("/nowhere"), cfg.data.splits, cfg.split) == CPS_CITYSCAPES_1_16
    assert published_list(PascalVOCAug("/nowhere"), "cps", "u2pl_1_16").name == "u2pl_1_16.txt"
    assert published_list(PascalVOC("/nowhere"), "paper", "183").name == "183.txt"


# --- reading a list -----------------------------------------------------------------------------------------


def test_paper_list_labels_exactly_its_ids_and_leaves_the_rest_of_the_pool_unlabeled(voc_92):
    split = select_split(PascalVOC(voc_92), 92, family="paper")
    assert [s.id for s in split.labeled] == voc_ids(PAPER_92)
    assert sorted(s.id for s in split.unlabeled) == sorted(["2007_999990", "2007_999991", *VOC_SBD_ONLY])
    assert (split.family, split.name) == ("paper", "92")
    # the CPS list of 92 holds the same images, as two paths per line
    cps = select_split(PascalVOC(voc_92), 92, family="cps")
    assert [s.id for s in cps.labeled] == [s.id for s in split.labeled] and cps.family == "cps"
    # split=all labels the whole pool, in every family
    assert len(select_split(PascalVOC(voc_92), "all", family="paper").labeled) == 94


def test_cps_list_in_its_two_column_format(cityscapes_186, hydra_conf):
    cfg = compose("train", overrides=["dataset=cityscapes", "data.splits=cps", "split=1_16"])
    split = select_split(Cityscapes(cityscapes_186), cfg.split, family=cfg.data.splits)
    expected = [Path(entry).name.removesuffix("_leftImg8bit.png") for entry in first_column(CPS_CITYSCAPES_1_16)]
    assert [s.id for s in split.labeled] == expected and len(expected) == 186
    assert [s.id for s in split.unlabeled] == ["zurich_999998_000019", "zurich_999999_000019"]
    assert (split.family, split.name) == ("cps", "1_16")


def test_list_ids_missing_from_the_dataset_are_counted_and_named(tmp_path):
    listed = voc_ids(PAPER_92)
    root = write_voc(tmp_path / "VOC2012", size=(8, 8), train=listed[3:])  # three of the 92 are absent
    with pytest.raises(FileNotFoundError) as err:
        select_split(PascalVOC(root), 92, family="paper")
    message = str(err.value)
    assert "3 of the 92 labeled images of the paper list 92" in message and str(PAPER_92) in message
    assert ", ".join(listed[:3]) in message and str(root) in message


# --- a run on a list ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_split_92_trains_on_the_papers_92_and_logs_which(voc_92, tmp_path, hydra_conf):
    overrides = ["dataset=pascal_voc", "split=92", f"dataset.root={voc_92}", *tiny(crop=64),
                 "logger._target_=helpers.Recorder"]  # fmt: skip
    train(compose("train", overrides=overrides), run_dir=tmp_path)  # the recipe's data.splits: the paper's lists
    written = tmp_path / "split" / "labeled.txt"
    assert written.read_text().split() == voc_ids(PAPER_92)
    params = Recorder.instances[-1].params
    assert (params["split/family"], params["split/list"], params["split/size"]) == ("paper", "92", "92")
    assert params["split/labeled_sha1"] == hashlib.sha1(written.read_bytes()).hexdigest()
