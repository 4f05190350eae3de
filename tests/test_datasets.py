"""PASCAL VOC (both protocols), Cityscapes and folder datasets on tiny fixtures in the real layouts:
pools, mask reading and label mapping, splits by count and by file, and the errors bad input gets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import (
    CITYSCAPES_TRAIN,
    CITYSCAPES_VAL,
    VOC_SBD_ONLY,
    VOC_TRAIN,
    VOC_VAL,
    save_image,
    save_mask,
    write_cityscapes,
    write_folder,
    write_voc,
)
from PIL import Image

from gta.data import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    Cityscapes,
    PascalVOC,
    PascalVOCAug,
    SegmentationFiles,
    SegmentationFolder,
    build_val_loader,
    eval_transform,
    select_split,
    train_transform,
)
from gta.engine.evaluate import EvalProtocol, confusion_matrices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ids(samples) -> list[str]:
    return [s.id for s in samples]


def read_masks(source, samples) -> list[torch.Tensor]:
    files = SegmentationFiles(samples, eval_transform(MEAN, STD), source.num_classes, source.ignore_index,
                              source.label_lut)
    return [files[i][1] for i in range(len(files))]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc") / "VOCdevkit" / "VOC2012")


@pytest.fixture()
def voc_copy(voc_root, tmp_path) -> Path:
    """A private copy for tests that break the dataset."""
    return Path(shutil.copytree(voc_root, tmp_path / "VOC2012"))


# --- PASCAL VOC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_aug_list", [True, False], ids=["train_aug.txt", "from-SegmentationClassAug"])
def test_voc_original_protocol_pools(tmp_path, train_aug_list):
    root = write_voc(tmp_path / "VOC2012", train_aug_list=train_aug_list)
    voc = PascalVOC(root)
    pools = voc.pools()
    assert ids(pools["labeled"]) == VOC_TRAIN
    assert sorted(ids(pools["unlabeled"])) == VOC_SBD_ONLY  # the augmented set minus the fine train images
    assert ids(pools["val"]) == VOC_VAL  # val masks in SegmentationClassAug never leak into training
    assert all(s.mask.parent.name == "SegmentationClass" for s in pools["labeled"] + pools["val"])
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in pools["unlabeled"])
    assert (voc.num_classes, voc.class_names[15], len(voc.palette)) == (21, "person", 21)


def test_voc_reads_palette_masks_as_class_ids_with_borders_ignored(voc_root):
    voc = PascalVOC(voc_root)
    labeled = voc.pools()["labeled"]
    for sample, mask in zip(labeled, read_masks(voc, labeled), strict=True):
        raw = Image.open(sample.mask)
        assert raw.mode == "P"  # palette PNG: pixel values are class ids, colours are for viewers
        assert torch.equal(mask, torch.from_numpy(np.array(raw)).long())
        assert 255 in mask and set(mask.unique().tolist()) <= set(range(21)) | {255}


def test_voc_aug_protocol_pools(voc_root):
    pools = PascalVOCAug(voc_root).pools()
    assert sorted(ids(pools["labeled"])) == sorted(VOC_TRAIN + VOC_SBD_ONLY)
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in pools["labeled"])
    assert pools["unlabeled"] == [] and ids(pools["val"]) == VOC_VAL
    split = select_split(PascalVOCAug(voc_root), 4, split_seed=0)
    assert len(split.labeled) == 4 and len(split.unlabeled) == 7


def test_validation_batches_never_mix_image_sizes(voc_root):
    voc = PascalVOC(voc_root)
    val = voc.pools()["val"]  # three images of three heights
    batched = list(build_val_loader(voc, val, batch_size=3))
    assert len(batched) == 1 and [tuple(image.shape) for image, _ in batched[0]] == [
        (1, 3, 40, 50), (1, 3, 41, 50), (1, 3, 42, 50)]  # fmt: skip
    net = torch.nn.Conv2d(3, 21, 1).eval()
    cpu = torch.device("cpu")
    one_by_one = confusion_matrices({"m": net}, build_val_loader(voc, val), 21, 255, EvalProtocol(), cpu)
    together = confusion_matrices({"m": net}, batched, 21, 255, EvalProtocol(), cpu)
    assert torch.equal(one_by_one["m"], together["m"]) and one_by_one["m"].sum() > 0


def test_voc_split_by_count_is_deterministic_and_drawn_from_the_fine_images(voc_root):
    voc = PascalVOC(voc_root)
    split = select_split(voc, 2, split_seed=3)
    assert set(ids(split.labeled)) <= set(VOC_TRAIN) and len(split.labeled) == 2
    assert sorted(ids(split.labeled + split.unlabeled)) == sorted(VOC_TRAIN + VOC_SBD_ONLY)
    assert ids(select_split(PascalVOC(voc_root), 2, split_seed=3).labeled) == ids(split.labeled)
    assert len(select_split(voc, "all").labeled) == len(VOC_TRAIN)


def test_voc_split_files_in_both_community_formats(voc_root, tmp_path):
    by_id, by_path = tmp_path / "ids", tmp_path / "paths"
    for d in (by_id, by_path):
        d.mkdir()
    # ids, one per line
    (by_id / "labeled.txt").write_text(f"{VOC_TRAIN[3]}\n{VOC_SBD_ONLY[0]}\n")
    (by_id / "unlabeled.txt").write_text("\n".join(VOC_TRAIN[:2] + VOC_SBD_ONLY[1:]) + "\n")
    # "image mask" relative paths
    (by_path / "labeled.txt").write_text(
        f"JPEGImages/{VOC_TRAIN[3]}.jpg SegmentationClass/{VOC_TRAIN[3]}.png\n"
        f"JPEGImages/{VOC_SBD_ONLY[0]}.jpg SegmentationClassAug/{VOC_SBD_ONLY[0]}.png\n"
    )
    unlabeled = VOC_TRAIN[:2] + VOC_SBD_ONLY[1:]
    (by_path / "unlabeled.txt").write_text("".join(f"JPEGImages/{i}.jpg\n" for i in unlabeled))
    for d in (by_id, by_path):
        split = select_split(PascalVOC(voc_root), 2, split_dir=d)
        assert ids(split.labeled) == [VOC_TRAIN[3], VOC_SBD_ONLY[0]]
        assert len(split.unlabeled) == 6 and ids(split.val) == VOC_VAL
        # an augmented-set image named as labeled brings its SegmentationClassAug mask
        assert split.labeled[1].mask.parent.name == "SegmentationClassAug"


# --- Cityscapes ---------------------------------------------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    expected = write_cityscapes(tmp_path / "cs")
    cs = Cityscapes(tmp_path / "cs")
    pools = cs.pools()
    assert sorted(ids(pools["labeled"])) == sorted(n for names in CITYSCAPES_TRAIN.values() for n in names)
    assert sorted(ids(pools["val"])) == sorted(n for names in CITYSCAPES_VAL.values() for n in names)
    assert pools["unlabeled"] == []
    assert cs.label_lut is not None and all(s.mask.name.endswith("_labelIds.png") for s in pools["labeled"])
    samples = pools["labeled"] + pools["val"]
    for sample, mask in zip(samples, read_masks(cs, samples), strict=True):
        assert torch.equal(mask, torch.from_numpy(expected[sample.id]).long())
    assert (len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES[0], CITYSCAPES_CLASSES[18]) == (19, "road", "bicycle")
    assert cs.palette[0] == [128, 64, 128]


@pytest.mark.parametrize(
    ("label_ids", "train_ids", "label_files", "reads"),
    [
        (True, True, "auto", "labelTrainIds"),
        (False, True, "auto", "labelTrainIds"),
        (True, True, "labelIds", "labelIds"),
        (True, False, "auto", "labelIds"),
    ],
)
def test_cityscapes_prepared_train_id_files(tmp_path, label_ids, train_ids, label_files, reads):
    expected = write_cityscapes(tmp_path, label_ids=label_ids, train_ids=train_ids)
    cs = Cityscapes(tmp_path, label_files=label_files)
    samples = cs.pools()["labeled"]
    assert all(s.mask.name.endswith(f"_gtFine_{reads}.png") for s in samples)
    assert (cs.label_lut is None) == (reads == "labelTrainIds")
    for sample, mask in zip(samples, read_masks(cs, samples), strict=True):
        assert torch.equal(mask, torch.from_numpy(expected[sample.id]).long())


def test_cityscapes_partial_train_id_files_fall_back_to_label_ids(tmp_path):
    write_cityscapes(tmp_path, label_ids=True, train_ids=True)
    next(tmp_path.glob("gtFine/val/*/*_labelTrainIds.png")).unlink()
    cs = Cityscapes(tmp_path)
    assert cs.label_lut is not None and all(s.mask.name.endswith("_labelIds.png") for s in cs.pools()["val"])


def test_cityscapes_split_file_in_the_community_format(tmp_path):
    write_cityscapes(tmp_path)
    (tmp_path / "labeled.txt").write_text("leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png\n")
    (tmp_path / "unlabeled.txt").write_text(
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png\nbremen_000000_000019\n"
    )
    split = select_split(Cityscapes(tmp_path), 1, split_dir=tmp_path)
    assert ids(split.labeled) == ["aachen_000001_000019"]
    assert ids(split.unlabeled) == ["aachen_000000_000019", "bremen_000000_000019"]


# --- folder -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder") / "mine")


def test_folder_split_by_sub_folders(folder_root):
    data = SegmentationFolder(folder_root, num_classes=3, class_names=["bg", "a", "b"], unlabeled="unlabeled")
    pools = data.pools()
    assert ids(pools["labeled"]) == [f"train/img_{i}" for i in range(5)]
    assert ids(pools["val"]) == ["val/img_0", "val/img_1"]
    assert ids(pools["unlabeled"]) == [f"unlabeled/img_{i}" for i in range(3)]
    assert all(s.mask is None for s in pools["unlabeled"])
    assert SegmentationFolder(folder_root, num_classes=3).pools()["unlabeled"] == []
    masks = read_masks(data, pools["labeled"] + pools["val"])
    assert {tuple(m.shape) for m in masks} == {(37, 53), (41, 29), (33, 47)}  # odd sizes, read as they are
    assert all(set(m.unique().tolist()) == {0, 1, 2, 255} for m in masks)
    split = select_split(data, 2, split_seed=0)
    assert len(split.labeled) == 2 and len(split.unlabeled) == 3 + 3


def test_folder_split_by_list_files(folder_root):
    data = SegmentationFolder(folder_root, num_classes=3, train="lists/train.txt", val="lists/val.txt")
    pools = data.pools()
    assert ids(pools["labeled"]) == ["train/img_0", "train/img_1", "train/img_2"]  # three entry forms
    assert ids(pools["val"]) == ["val/img_0", "val/img_1"]


def test_folder_odd_sizes_crop_with_ignore_padding(folder_root):
    data = SegmentationFolder(folder_root, num_classes=3)
    tf = train_transform(64, (1.0, 1.0), MEAN, STD, ignore_index=255)
    files = SegmentationFiles(data.pools()["labeled"], tf, 3, 255)
    image, mask = files[0]  # a 37x53 image in a 64x64 crop
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert (mask == 255).sum() >= 64 * 64 - 37 * 53


def test_folder_flat_layout_with_other_suffixes(tmp_path):
    for i in range(3):
        save_image(tmp_path / "img" / f"a{i}.png", 9, 11, seed=i)
        save_mask(tmp_path / "lbl" / f"a{i}_mask.png", np.full((9, 11), i % 2))
    (tmp_path / "val.txt").write_text("a2\n")
    (tmp_path / "train.txt").write_text("a0\nimg/a1.png\n")
    data = SegmentationFolder(tmp_path, num_classes=2, image_dir="img", mask_dir="lbl", image_suffix=".png",
                              mask_suffix="_mask.png", train="train.txt", val="val.txt")
    pools = data.pools()
    assert ids(pools["labeled"]) == ["a0", "a1"] and pools["val"][0].mask == tmp_path / "lbl" / "a2_mask.png"
    everything = SegmentationFolder(tmp_path, num_classes=2, image_dir="img", mask_dir="lbl",
                                    image_suffix=".png", mask_suffix="_mask.png", train=".", val="val.txt")
    assert ids(everything.pools()["labeled"]) == ["a0", "a1", "a2"]


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "layout_hint"),
    [
        (lambda root: PascalVOC(root), "JPEGImages/<id>.jpg"),
        (lambda root: PascalVOCAug(root), "SegmentationClassAug"),
        (lambda root: Cityscapes(root), "leftImg8bit/{train,val}/<city>"),
        (lambda root: SegmentationFolder(root, num_classes=2), "images/<id>.jpg"),
    ],
    ids=["pascal_voc", "pascal_voc_aug", "cityscapes", "folder"],
)
def test_missing_root_names_the_path_and_the_layout(tmp_path, make, layout_hint):
    root = tmp_path / "not-there"
    with pytest.raises(FileNotFoundError) as err:
        make(root).pools()
    assert str(root) in str(err.value) and layout_hint in str(err.value)


def test_missing_parts_of_a_layout_are_named(voc_copy, tmp_path):
    shutil.rmtree(voc_copy / "SegmentationClassAug")
    (voc_copy / "ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)SBD.*train_aug\.txt.*SegmentationClassAug"):
        PascalVOC(voc_copy).pools()
    write_cityscapes(tmp_path / "cs")
    shutil.rmtree(tmp_path / "cs" / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match=r"gtFine/val is missing"):
        Cityscapes(tmp_path / "cs").pools()


def test_listed_id_without_image_names_the_id_and_the_list(voc_copy, folder_root, tmp_path):
    (voc_copy / "JPEGImages" / f"{VOC_VAL[1]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"'{VOC_VAL[1]}'.*val\.txt.*JPEGImages/{VOC_VAL[1]}\.jpg"):
        PascalVOC(voc_copy).pools()
    lists = tmp_path / "lists.txt"
    lists.write_text("train/img_0\ntrain/nope\n")
    with pytest.raises(FileNotFoundError, match=r"'train/nope'.*lists\.txt.*images/train/nope\.jpg"):
        SegmentationFolder(folder_root, num_classes=3, train=str(lists)).pools()


def test_split_file_entry_without_sample_names_the_entry_and_the_file(voc_root, tmp_path):
    (tmp_path / "labeled.txt").write_text(f"{VOC_TRAIN[0]}\n2012_999999\n")
    (tmp_path / "unlabeled.txt").write_text("")
    with pytest.raises(ValueError, match=r"'2012_999999'.*labeled\.txt"):
        select_split(PascalVOC(voc_root), "all", split_dir=tmp_path)


def test_train_image_without_mask_names_the_expected_mask(folder_root, tmp_path):
    root = Path(shutil.copytree(folder_root, tmp_path / "mine"))
    (root / "masks" / "train" / "img_3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'train/img_3'.*no mask file .*masks/train/img_3\.png"):
        SegmentationFolder(root, num_classes=3).pools()


def test_mask_values_outside_the_classes_name_the_file_and_value(voc_copy, tmp_path):
    bad = voc_copy / "SegmentationClass" / f"{VOC_TRAIN[2]}.png"
    values = np.array(Image.open(bad))
    values[5, 5] = 30
    save_mask(bad, values)
    voc = PascalVOC(voc_copy)
    with pytest.raises(ValueError, match=rf"{bad.name}.*\[30\]"):
        read_masks(voc, voc.pools()["labeled"])

    write_cityscapes(tmp_path / "cs")
    mask = next((tmp_path / "cs" / "gtFine" / "train").glob("*/*_labelIds.png"))
    values = np.array(Image.open(mask))
    values[0, 0] = 40  # not a Cityscapes label id
    save_mask(mask, values)
    cs = Cityscapes(tmp_path / "cs")
    with pytest.raises(ValueError, match=rf"{mask.name}.*\[40\]"):
        read_masks(cs, cs.pools()["labeled"])


def test_corrupt_image_names_the_file(voc_copy):
    broken = voc_copy / "JPEGImages" / f"{VOC_TRAIN[1]}.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated JPEG
    voc = PascalVOC(voc_copy)
    with pytest.raises(ValueError, match=rf"Cannot read image file .*{broken.name}"):
        read_masks(voc, voc.pools()["labeled"])


def test_split_larger_than_the_pool_is_refused(voc_root):
    with pytest.raises(ValueError, match=rf"split=7 is not possible.*has {len(VOC_TRAIN)} samples"):
        select_split(PascalVOC(voc_root), 7)


def test_fixed_label_sets_refuse_other_values(voc_root):
    with pytest.raises(ValueError, match="PascalVOC has fixed num_classes=21"):
        PascalVOC(voc_root, num_classes=20)
    with pytest.raises(ValueError, match="Cityscapes has fixed ignore_index=255"):
        Cityscapes(voc_root, ignore_index=0)
    assert PascalVOC(voc_root, num_classes=21, class_names=list(VOC_CLASSES)).num_classes == 21
    with pytest.raises(ValueError, match="label_files"):
        Cityscapes(voc_root, label_files="trainIds")
