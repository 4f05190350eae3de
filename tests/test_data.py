"""Tests for gta.data: generated dataset, file validation, transforms, sampler, splits and loaders."""

from __future__ import annotations

from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.functional import max_pool2d
from torchvision import tv_tensors

from gta.data import (
    EpochSampler,
    RandomRescale,
    Sample,
    SegmentationFiles,
    SegmentationSource,
    SyntheticShapes,
    build_loaders,
    eval_transform,
    select_split,
    train_transform,
    write_split,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = {"labeled": 10, "unlabeled": 5, "val": 5}  # the tiny dataset with a few more images of each kind


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> SyntheticShapes:
    source = helpers.shapes(tmp_path_factory.mktemp("synthetic") / "shapes", **SIZES)
    source.pools()
    return source


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    image = Image.fromarray(array.astype(np.uint8))
    if palette:
        image.putpalette([0, 0, 0] * 256)
    image.save(path)
    return path


# --- synthetic dataset --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed(tmp_path):
    small = {"num_labeled_pool": 3, "num_unlabeled": 2, "num_val": 2, "image_size": 24}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        SyntheticShapes(tmp_path / name, seed=seed, **small).pools()
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 7 + 3 + 1
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.startswith("images/"))


def test_synthetic_is_cached_and_regenerated_on_new_params(tmp_path):
    small = {"num_labeled_pool": 3, "num_unlabeled": 0, "num_val": 2, "image_size": 16}
    root = tmp_path / "shapes"
    SyntheticShapes(root, **small).pools()
    first = (root.stat().st_ino, (root / "meta.json").stat().st_mtime_ns)

    pools = SyntheticShapes(root, **small).pools()
    assert (root.stat().st_ino, (root / "meta.json").stat().st_mtime_ns) == first
    assert [len(pools[k]) for k in ("labeled", "unlabeled", "val")] == [3, 0, 2]

    pools = SyntheticShapes(root, **{**small, "num_val": 4}).pools()
    assert root.stat().st_ino != first[0]
    assert len(pools["val"]) == 4 and all(s.image.is_file() for s in pools["val"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary leftovers


def test_synthetic_masks_are_valid_and_cover_all_classes(shapes):
    pools = shapes.pools()
    samples = pools["labeled"] + pools["unlabeled"] + pools["val"]
    assert len({s.id for s in samples}) == len(samples) == 20
    seen = set()
    for sample in samples:
        mask = Image.open(sample.mask)
        assert mask.mode == "P" and mask.size == (32, 32)
        assert Image.open(sample.image).size == (32, 32)
        seen |= set(np.unique(np.array(mask)).tolist())
    assert seen == set(range(SyntheticShapes.num_classes))


def test_synthetic_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a SyntheticShapes cache"):
        SyntheticShapes(tmp_path, num_labeled_pool=1, num_unlabeled=0, num_val=1, image_size=8).pools()
    assert (tmp_path / "keep.txt").read_text() == "precious"


# --- file validation ----------------------------------------------------------------------------------------


def _dataset(samples, **kwargs):
    return SegmentationFiles(samples, eval_transform(MEAN, STD), num_classes=3, ignore_index=255, **kwargs)


def test_corrupt_image_names_the_file(tmp_path):
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    mask = _save(tmp_path / "m.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="broken.png"):
        _dataset([Sample("x", image, mask)])[0]


def test_mask_values_are_validated(tmp_path):
    image = _save(tmp_path / "i.png", np.zeros((4, 5, 3)))
    values = np.array([[0, 1, 2, 255, 7]] * 4)
    mask = _save(tmp_path / "bad.png", values, palette=True)
    with pytest.raises(ValueError, match=r"bad\.png.*\[7\].*\[0, 3\)"):
        _dataset([Sample("x", image, mask)])[0]
    lut = np.arange(256, dtype=np.uint8)
    lut[7] = 1
    _, loaded = _dataset([Sample("x", image, mask)], label_lut=lut)[0]
    assert loaded.dtype == torch.int64 and loaded.tolist()[0] == [0, 1, 2, 255, 1]


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "img.png", np.zeros((4, 5, 3)))
    mask = _save(tmp_path / "msk.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"msk\.png.*img\.png"):
        _dataset([Sample("x", image, mask)])[0]


def test_unlabeled_use_never_reads_the_mask(tmp_path):
    image = _save(tmp_path / "i.png", np.full((4, 5, 3), 200))
    corrupt = tmp_path / "m.png"
    corrupt.write_bytes(b"garbage")
    x, mask = _dataset([Sample("x", image, corrupt)], with_mask=False)[0]
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    assert mask.shape == (4, 5) and not mask.any()


# --- transforms ---------------------------------------------------------------------------------------------


def _inputs(image: np.ndarray, mask: np.ndarray):
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))


def test_train_transform_output_crop_and_dtypes():
    tf = train_transform(32, (0.5, 2.0), MEAN, STD, ignore_index=255)
    for _ in range(5):
        image, mask = tf(*_inputs(np.zeros((40, 50, 3), np.uint8), np.ones((40, 50), np.uint8)))
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {1, 255}


def test_train_transform_pads_masks_with_ignore_index():
    tf = train_transform(32, (1.0, 1.0), MEAN, STD, ignore_index=255)
    image, mask = tf(*_inputs(np.full((10, 12, 3), 255, np.uint8), np.zeros((10, 12), np.uint8)))
    padding = mask == 255
    assert padding.sum() == 32 * 32 - 10 * 12
    black = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(image[:, padding], black[:, None].expand(3, int(padding.sum())))
    assert (image[:, ~padding] > 2).all()  # the white image pixels stay where the mask says


def test_train_transform_pad_label_labels_the_padding():
    tf = train_transform(32, (1.0, 1.0), MEAN, STD, ignore_index=255, pad_label=0)
    _, mask = tf(*_inputs(np.zeros((10, 12, 3), np.uint8), np.full((10, 12), 3, np.uint8)))
    assert (mask == 0).sum() == 32 * 32 - 10 * 12 and (mask == 3).sum() == 10 * 12 and not (mask == 255).any()


def test_rescale_pivot_draws_half_the_factors_on_each_side():
    torch.manual_seed(0)
    rescale = RandomRescale((0.5, 2.0), pivot=1.0)
    factors = np.array([rescale.make_params([tv_tensors.Image(torch.zeros(3, 100, 100))])["size"][0] / 100
                        for _ in range(2000)])
    assert 0.45 < (factors < 1.0).mean() < 0.55  # uniform over [0.5, 2] would give 1/3
    assert factors.min() >= 0.5 and factors.max() <= 2.0
    assert 0.7 < factors[factors < 1].mean() < 0.8 and 1.4 < factors[factors >= 1].mean() < 1.6
    with pytest.raises(ValueError, match="scale_pivot=3"):
        RandomRescale((0.5, 2.0), pivot=3.0)


def test_train_transform_keeps_image_and_mask_aligned():
    # Random 8x8 blocks of classes 0..4; each pixel's grey level encodes its class.
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 5, (6, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
    image = np.repeat((mask * 50)[..., None], 3, axis=2).astype(np.uint8)
    tf = train_transform(32, (0.5, 2.0), MEAN, STD, ignore_index=255)
    torch.manual_seed(0)
    for _ in range(10):
        x, y = tf(*_inputs(image, mask))
        grey = (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).mean(0) * 255
        # Interpolation blends colours across block edges (also those just outside the crop), so compare
        # block interiors: pixels whose 3x3 neighbourhood inside the crop has a single non-padding class.
        labels = y[None].float()
        interior = torch.zeros_like(y, dtype=torch.bool)
        interior[1:-1, 1:-1] = (max_pool2d(labels, 3, 1) == -max_pool2d(-labels, 3, 1))[0]
        interior &= y != 255
        assert interior.float().mean() > 0.1  # not a vacuous comparison
        assert torch.equal(torch.round(grey / 50)[interior], y[interior].float())


def test_eval_transform_keeps_geometry():
    x, y = eval_transform(MEAN, STD)(*_inputs(np.zeros((7, 9, 3), np.uint8), np.full((7, 9), 2, np.uint8)))
    assert x.shape == (3, 7, 9) and y.shape == (7, 9) and y.dtype == torch.int64 and (y == 2).all()


# --- sampler ------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_history_free():
    a, b = EpochSampler(10, 10, seed=3), EpochSampler(10, 10, seed=3)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == list(b) == first
    assert list(EpochSampler(10, 10, seed=4)) != first


def test_sampler_repeats_a_small_set():
    sampler = EpochSampler(3, 10, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 10
    for chunk in (order[0:3], order[3:6], order[6:9]):
        assert sorted(chunk) == [0, 1, 2]


def test_sampler_ranks_are_disjoint():
    shares = [list(EpochSampler(12, 6, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 6
    assert sorted(shares[0] + shares[1]) == list(range(12))


def test_sampler_start_skips_the_head_of_the_epoch():
    sampler = EpochSampler(7, 12, seed=2)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 8


# --- splits -------------------------------------------------------------------------------------------------


def _ids(samples):
    return [s.id for s in samples]


def test_select_split_counts_determinism_and_disjointness(shapes):
    split = select_split(shapes, 4, split_seed=0)
    assert len(split.labeled) == 4 and len(split.unlabeled) == 6 + 5 and len(split.val) == 5
    assert not set(_ids(split.labeled)) & set(_ids(split.unlabeled))
    pools = shapes.pools()
    assert set(_ids(split.labeled + split.unlabeled)) == set(_ids(pools["labeled"] + pools["unlabeled"]))
    assert _ids(select_split(shapes, "4", split_seed=0).labeled) == _ids(split.labeled)
    assert _ids(select_split(shapes, 4, split_seed=1).labeled) != _ids(split.labeled)

    everything = select_split(shapes, "all")
    assert len(everything.labeled) == 10 and _ids(everything.unlabeled) == _ids(pools["unlabeled"])


def test_select_split_rejects_impossible_sizes(shapes):
    for bad in (11, 0):
        with pytest.raises(ValueError, match=rf"split={bad}.*{shapes.root}.*has 10 samples"):
            select_split(shapes, bad)


def test_split_dir_round_trip_by_ids(shapes, tmp_path):
    split = select_split(shapes, 3, split_seed=7)
    paths = write_split(split, tmp_path / "split")
    assert [p.name for p in paths] == ["labeled.txt", "unlabeled.txt", "val.txt"]
    again = select_split(shapes, 3, split_dir=tmp_path / "split")
    assert _ids(again.labeled) == _ids(split.labeled) and _ids(again.unlabeled) == _ids(split.unlabeled)
    with pytest.raises(ValueError, match="lists 3 labeled"):
        select_split(shapes, 4, split_dir=tmp_path / "split")


def test_split_dir_by_relative_paths(shapes, tmp_path):
    (tmp_path / "labeled.txt").write_text(
        "images/lab_00001.png masks/lab_00001.png\n\nimages/lab_00004.png masks/lab_00004.png\n"
    )
    (tmp_path / "unlabeled.txt").write_text("images/unl_00000.png\nlab_00002\n")
    split = select_split(shapes, "all", split_dir=tmp_path)
    assert _ids(split.labeled) == ["lab_00001", "lab_00004"]
    assert _ids(split.unlabeled) == ["unl_00000", "lab_00002"]


def test_split_dir_unknown_entry_is_named(shapes, tmp_path):
    (tmp_path / "labeled.txt").write_text("lab_00001\nno_such_image\n")
    (tmp_path / "unlabeled.txt").write_text("")
    with pytest.raises(ValueError, match=r"'no_such_image'.*labeled\.txt"):
        select_split(shapes, "all", split_dir=tmp_path)


def test_split_sample_without_an_image_is_named(tmp_path):
    source = helpers.shapes(tmp_path / "shapes", **SIZES)
    source.pools()
    (tmp_path / "shapes" / "images" / "unl_00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files .*\n  unl_00003: .*unl_00003\.png"):
        select_split(source, 4)


# --- loaders ------------------------------------------------------------------------------------------------


def test_build_loaders_batches(shapes):
    split = select_split(shapes, 4)
    loaders = build_loaders(shapes, split, batch_size=2, num_workers=0, seed=0, need_unlabeled=True)
    assert loaders.iters_per_epoch == 6  # ceil(11 unlabeled / 2)
    assert len(loaders.labeled) == len(loaders.unlabeled) == 6
    for (x, y), (u, m) in zip(loaders.labeled, loaders.unlabeled, strict=True):
        assert x.shape == u.shape == (2, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == m.shape == (2, 32, 32) and y.dtype == m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 255}
        assert set(y.unique().tolist()) <= set(range(6)) | {255}
    x, y = next(iter(loaders.val))
    assert x.shape == (1, 3, 32, 32) and y.shape == (1, 32, 32)


def test_build_loaders_augmentation_depends_on_epoch_not_history(shapes):
    split = select_split(shapes, 4)
    loaders = build_loaders(shapes, split, batch_size=2, num_workers=1, seed=0, need_unlabeled=False)
    assert loaders.unlabeled is None
    runs = []
    for epoch in (0, 1, 0):
        loaders.labeled.sampler.set_epoch(epoch)
        runs.append(torch.cat([x for x, _ in loaders.labeled]))
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_build_loaders_resume_mid_epoch_draws_the_same_augmentations(shapes, num_workers):
    split = select_split(shapes, 4)
    loaders = build_loaders(shapes, split, batch_size=2, num_workers=num_workers, seed=0, need_unlabeled=True)
    loader = loaders.unlabeled
    loader.sampler.set_epoch(3)
    full = [u for u, _ in loader]
    loader.sampler.set_epoch(3, start=2 * 4)  # skip the first 4 batches, as a resumed run does
    rest = [u for u, _ in loader]
    assert len(rest) == len(full) - 4
    assert all(torch.equal(a, b) for a, b in zip(full[4:], rest, strict=True))
    before = torch.get_rng_state()
    loaders.labeled.sampler.set_epoch(0)
    next(iter(loaders.labeled))
    assert torch.equal(torch.get_rng_state(), before)  # loading leaves the training RNG alone


def test_build_loaders_prefetch_factor(shapes):
    split = select_split(shapes, 4)
    loaders = build_loaders(shapes, split, 2, num_workers=1, seed=0, need_unlabeled=True, prefetch_factor=4)
    assert loaders.labeled.prefetch_factor == loaders.unlabeled.prefetch_factor == loaders.val.prefetch_factor == 4
    assert all(loader.persistent_workers for loader in (loaders.labeled, loaders.unlabeled, loaders.val))
    with pytest.raises(ValueError, match=r"data.prefetch_factor=4 needs data.num_workers > 0 .*data.num_workers=0"):
        build_loaders(shapes, split, 2, num_workers=0, seed=0, need_unlabeled=True, prefetch_factor=4)


def test_build_loaders_val_shards_and_unlabeled_not_opened(shapes):
    split = select_split(shapes, 4)
    missing = [Sample(s.id, s.image.with_name("missing.png"), None) for s in split.unlabeled]
    split.unlabeled = missing  # never opened when the method does not need unlabeled data
    shards = [
        build_loaders(shapes, split, 2, 0, seed=0, need_unlabeled=False, rank=r, world_size=2) for r in (0, 1)
    ]
    for loaders in shards:
        assert loaders.unlabeled is None and loaders.iters_per_epoch == 3
        next(iter(loaders.labeled))
    val_ids = [[split.val[i].id for i in loaders.val.items.indices] for loaders in shards]
    assert sorted(val_ids[0] + val_ids[1]) == sorted(_ids(split.val)) and len(val_ids[0]) == 3


class _Folder(SegmentationSource):
    def __init__(self, root, samples):
        super().__init__(root, num_classes=2)
        self._samples = samples

    def pools(self):
        return {"labeled": self._samples, "unlabeled": [], "val": []}


def test_base_source_defaults_and_check_root(tmp_path):
    source = _Folder(tmp_path / "absent", [])
    assert source.class_names == ["class_0", "class_1"] and source.palette == [[0, 0, 0], [128, 0, 0]]
    with pytest.raises(FileNotFoundError, match=r"(?s)absent.*JPEGImages/"):
        source.check_root("JPEGImages/*.jpg")


@pytest.mark.parametrize(("options", "culprit"), [
    ({"pad_label": 7}, "pad_label=7"),
    ({"pad_label": 255}, "pad_label=255"),
    ({"scale_pivot": 0.3}, "scale_pivot=0.3"),
])
def test_released_code_data_switches_are_checked(tmp_path, options, culprit):
    with pytest.raises(ValueError, match=culprit):
        SegmentationSource(tmp_path, num_classes=6, scale_range=(0.5, 2.0), **options)
    source = SegmentationSource(tmp_path, num_classes=6, pad_label=0, scale_pivot=1.0)
    assert (source.pad_label, source.scale_pivot) == (0, 1.0)
