"""data.on_bad_sample: a file that cannot be used mid-run is skipped (full batches, exact resume, recorded)
or stops the run naming it; the same through ``python -m gta train``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import Recorder, gta, make_trainer, shapes, tiny

from gta.data import SyntheticShapes, build_loaders, select_split
from gta.errors import BadSampleError, ConfigError


def corrupt(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return path


@pytest.fixture
def broken(source, tmp_path) -> tuple[SyntheticShapes, Path, Path]:
    """A copy of the tiny dataset with one image of the labeled split and one validation image corrupt."""
    copy = shapes(Path(shutil.copytree(source.root, tmp_path / "shapes")))
    split = select_split(copy, 4)
    return copy, corrupt(split.labeled[1].image), corrupt(split.val[2].image)


def batches(loader, epoch: int, start: int = 0) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch, start)
    return [image for image, _ in loader]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skip_keeps_batches_full_and_resume_exact_and_reports_each_file_once(broken, num_workers):
    source, image, val_image = broken
    loaders = build_loaders(source, select_split(source, 4), batch_size=2, num_workers=num_workers, seed=0,
                            need_unlabeled=False)
    with pytest.warns(RuntimeWarning, match=rf"Cannot read image file .*{image.name}: .*; the sample is skipped") as caught:
        epochs = [batches(loaders.labeled, epoch) for epoch in range(3)]
    assert sum(image.name in str(w.message) for w in caught) == 1  # once per file, though read every epoch
    assert all(len(epoch) == 2 and all(b.shape == (2, 3, 32, 32) for b in epoch) for epoch in epochs)
    taken = loaders.bad_samples.take()
    assert [path for path, _ in taken] == [str(image)] and loaders.bad_samples.take() == []
    # a resumed epoch draws what the uninterrupted one drew, the replacement included
    for epoch in range(3):
        assert all(torch.equal(a, b) for a, b in zip(epochs[epoch][1:], batches(loaders.labeled, epoch, 2),
                                                     strict=True))
    # validation leaves the bad image out: 4 images, 3 evaluated
    with pytest.warns(RuntimeWarning, match=val_image.name):
        assert sum(len(images) for images, _ in loaders.val) == 3
    assert [path for path, _ in loaders.bad_samples.take()] == [str(val_image)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_stop_fails_naming_the_file_without_the_workers_traceback(broken, num_workers):
    source, image, _ = broken
    loaders = build_loaders(source, select_split(source, 4), batch_size=2, num_workers=num_workers, seed=0,
                            need_unlabeled=False, on_bad_sample="stop")
    with pytest.raises(BadSampleError, match=rf"Cannot read image file .*{image.name}.*on_bad_sample=stop") as err:
        for _ in range(3):
            batches(loaders.labeled, 0)
    assert "Traceback" not in str(err.value) and err.value.path == str(image)
    with pytest.raises(ConfigError, match="data.on_bad_sample must be one of"):
        build_loaders(source, select_split(source, 4), 2, 0, seed=0, need_unlabeled=False, on_bad_sample="ignore")


def test_a_set_without_one_usable_sample_fails_clearly(broken):
    source, _, _ = broken
    split = select_split(source, 4)
    for sample in split.labeled:
        corrupt(sample.image)
    loaders = build_loaders(source, split, batch_size=2, num_workers=1, seed=0, need_unlabeled=False)
    with pytest.raises(ValueError, match=r"none of the 4 samples of the set can be used, e.g. Cannot read image"):
        with pytest.warns(RuntimeWarning):
            batches(loaders.labeled, 0)


def test_the_trainer_records_skipped_files_in_the_run_directory_and_the_tracker(broken, tmp_path):
    source, image, val_image = broken
    logger = Recorder()
    trainer = make_trainer(source, tmp_path / "run", logger, eval_every=4)
    with pytest.warns(RuntimeWarning, match="the sample is skipped"):
        trainer.fit()
    record = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(entry["file"] for entry in record) == sorted([str(image), str(val_image)])
    assert all("Cannot read image file" in entry["error"] for entry in record)
    counts = [metrics["data/bad_samples"] for _, metrics in sorted(logger.metrics.items()) if "data/bad_samples" in metrics]
    assert counts[-1] == 2 and trainer.bad_samples.files == {str(image), str(val_image)}


@pytest.mark.slow
def test_train_command_skips_or_stops_on_a_corrupt_file(tmp_path):
    data = tmp_path / "data"
    image = corrupt(select_split(shapes(data, unlabeled=8), 4).labeled[0].image)  # the split the command draws too
    args = ["train", *tiny(data)]

    skipped = gta(*args, f"hydra.run.dir={tmp_path}/skip", cwd=tmp_path)
    assert f"Cannot read image file {image}" in skipped.stderr and "skipped    1 unusable sample files" in skipped.stdout
    record = (tmp_path / "skip" / "bad_samples.jsonl").read_text().splitlines()
    assert len(record) == 1 and json.loads(record[0])["file"] == str(image)

    # in a worker process, which ignores SIGTERM: the command must still end (not wait for it at exit)
    stopped = gta(*args, f"hydra.run.dir={tmp_path}/stop", "data.on_bad_sample=stop", "data.num_workers=1",
                  cwd=tmp_path, returncode=1, timeout=120)
    assert f"Cannot read image file {image}" in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
