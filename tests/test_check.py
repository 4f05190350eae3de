"""``python -m gta check``: every file of a run's split read before training, problems in a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import gta, shapes, tiny
from layouts import save_image, save_mask, write_folder
from PIL import Image

from gta.data import SegmentationFolder, select_split

pytestmark = pytest.mark.slow  # every test runs the command in a subprocess

FOLDER = ["dataset=folder", "dataset.num_classes=3", "dataset.unlabeled=unlabeled"]


def check(root: Path, *overrides: str, cwd: Path, returncode: int):
    return gta("check", *FOLDER, f"dataset.root={root}", *overrides, cwd=cwd, returncode=returncode, timeout=300)


def test_check_reports_a_corrupt_image_a_missized_mask_and_a_label_out_of_range(tmp_path):
    root = write_folder(tmp_path / "mine")
    corrupt = root / "images" / "train" / "img_1.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated JPEG
    missized = save_mask(root / "masks" / "train" / "img_2.png", np.zeros((5, 5)))
    out_of_range = root / "masks" / "val" / "img_0.png"
    values = np.array(Image.open(out_of_range))
    values[3, 3] = 7
    save_mask(out_of_range, values)
    save_image(root / "images" / "unlabeled" / "img_9.jpg", 20, 20, seed=1).write_bytes(b"not a jpeg")

    result = check(root, "split=all", cwd=tmp_path, returncode=1)
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("  ") and "/img_" in line}
    assert set(rows) == {"train/img_1", "train/img_2", "val/img_0", "unlabeled/img_9"}, result.stdout
    assert "labeled" in rows["train/img_1"] and "unreadable image" in rows["train/img_1"]
    assert f"Mask {missized} is 5x5 but image" in rows["train/img_2"] and "mask size differs" in rows["train/img_2"]
    assert "labels outside the classes" in rows["val/img_0"] and "[7]" in rows["val/img_0"]
    assert rows["unlabeled/img_9"].split()[:3] == ["unlabeled", "unlabeled/img_9", "unreadable"]
    assert "4 of the 11 samples of the dataset" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # checking writes nothing


def test_check_passes_a_clean_tree_and_prints_the_class_shares(tmp_path):
    root = write_folder(tmp_path / "mine")
    # a sample the split leaves unlabeled: its mask is never read in training, so it is not checked
    unlabeled = select_split(SegmentationFolder(root, num_classes=3), 4).unlabeled
    (root / "masks" / "train" / f"{Path(unlabeled[0].id).name}.png").write_bytes(b"garbage")
    labeled = select_split(SegmentationFolder(root, num_classes=3), 4).labeled

    result = check(root, "split=4", cwd=tmp_path, returncode=0)
    assert "read 4 labeled, 4 unlabeled (images only) and 2 validation samples" in result.stdout
    assert "no problems found" in result.stdout
    values = np.concatenate([np.array(Image.open(s.mask)).ravel() for s in labeled])
    counts = np.bincount(values[values != 255], minlength=3)
    rows = [line.split() for line in result.stdout.splitlines()]
    for c in range(3):
        assert [f"class_{c}", str(counts[c]), f"{counts[c] / counts.sum():.2%}"] in rows, result.stdout


@pytest.mark.parametrize("where", ["dataset", "split"])
def test_check_lists_entries_without_files(where, tmp_path):
    if where == "dataset":  # a labeled image without its mask: the dataset's own listing finds it
        root = write_folder(tmp_path / "mine")
        (root / "masks" / "train" / "img_3.png").unlink()
        overrides, gone = [*FOLDER, f"dataset.root={root}", "split=all"], "train/img_3"
    else:  # a sample of the split whose image has gone since the dataset's lists were written
        data = tmp_path / "shapes"
        shapes(data, unlabeled=8).pools()
        (data / "images" / "unl_00003.png").unlink()
        overrides, gone = [f for f in tiny(data) if f.startswith(("dataset.", "split="))], "unl_00003"
    result = gta("check", *overrides, cwd=tmp_path, returncode=1, timeout=300)
    missing = [line.split() for line in result.stdout.splitlines() if "file missing" in line]
    assert len(missing) == 1 and missing[0][:2] == ["listed", gone], result.stdout
    assert "listed files of the dataset" in result.stderr and "Traceback" not in result.stderr
    if where == "split":  # train runs the same cheap check at start-up, before any model or checkpoint
        trained = gta("train", *tiny(data), f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, returncode=1)
        assert "Traceback" not in trained.stderr
        assert "1 files listed for this split do not exist, e.g.\n  unl_00003: " in trained.stderr, trained.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
