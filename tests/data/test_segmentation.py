import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import seg_transforms, segmentation
from mimkit.data.layouts import detect_layout
from mimkit.data.loader import SeededViews
from mimkit.data.seg_transforms import PhotometricDistortion, SegEvalView, SegTrainView, rescaled_size
from mimkit.data.segmentation import (
    IGNORE_INDEX,
    SCENE_SIZE,
    SCENE_THRESHOLD,
    SegSource,
    build_seg_source,
    fmnist_scene_classes,
    fmnist_scenes_folder,
    make_scene,
    spread,
    write_fmnist_scenes,
)
from mimkit.errors import MimkitError
from tests.conftest import jpeg, needs_fashion, voc_palette, write_idx

pytestmark = pytest.mark.usefixtures("private_data_cache")


def save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:  # indices stay the pixel values; VOC's palette only colours them (as in its PNGs)
        img.putpalette(voc_palette())
    img.save(path)
    return path


def stored_mask(seed: int, values: list[int], size=(6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, size).astype(np.uint8)


def rgb(seed: int, size=(6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def make_ade(root: Path, masks: dict[str, list[np.ndarray]]) -> Path:
    for split, sub in (("train", "training"), ("val", "validation")):
        for i, mask in enumerate(masks[split]):
            save(root / "images" / sub / f"ADE_{i}.jpg", rgb(i, mask.shape))
            save(root / "annotations" / sub / f"ADE_{i}.png", mask)
    return root


def make_generic(root: Path, masks: list[np.ndarray], classes: list[str] | None = None,
                 split: str = "") -> Path:
    for i, mask in enumerate(masks):
        save(root / "images" / split / f"img{i}.png", (mask * 40).astype(np.uint8))
        save(root / "masks" / split / f"img{i}.png", mask)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------
# Layouts


def test_ade_layout_reduces_zero_label(tmp_path):
    train_mask = np.array([[0, 1, 2, 150], [255, 1, 0, 3]], np.uint8)
    root = make_ade(tmp_path / "ADEChallengeData2016", {"train": [train_mask, stored_mask(1, [1, 2], (2, 4))],
                                                        "val": [stored_mask(2, [0, 5], (2, 4))]})
    train = build_seg_source(str(tmp_path), "train")  # found in the ADEChallengeData2016 sub-folder
    assert train.num_classes == 150 and train.classes[0] == "wall" and train.classes[-1] == "flag"
    assert train.channels == 3 and train.ignore_index == 255 and len(train) == 2
    image, mask = train[0]
    assert image.shape == (3, 2, 4) and image.dtype == torch.uint8 and mask.dtype == torch.uint8
    assert mask.tolist() == [[255, 0, 1, 149], [255, 0, 255, 2]]  # 0 -> ignored, the rest down by one
    val = build_seg_source(str(root), "val")
    assert len(val) == 1 and set(val[0][1].unique().tolist()) <= {255, 4}
    assert "ADE_0.jpg" in train.describe(0) and "ADE_0.png" in train.describe(0)


def test_voc_layout_reads_palette_indices_and_keeps_255(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    masks = {"a": np.array([[0, 15, 255], [20, 0, 1]], np.uint8),
             "b": np.array([[7, 7, 7], [255, 0, 0]], np.uint8)}
    for stem, mask in masks.items():
        save(root / "JPEGImages" / f"{stem}.jpg", rgb(0, mask.shape))
        save(root / "SegmentationClass" / f"{stem}.png", mask, palette=True)
    stored = Image.open(root / "SegmentationClass" / "a.png")
    assert stored.mode == "P" and stored.convert("RGB").getpixel((1, 0)) == (192, 128, 128)  # person's colour
    assert stored.convert("L").getpixel((1, 0)) != 15  # read as a grey picture, the label would be lost
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    train, val = build_seg_source(str(tmp_path), "train"), build_seg_source(str(tmp_path), "val")
    assert train.num_classes == 21 and train.classes[0] == "background" and train.classes[15] == "person"
    assert [len(train), len(val)] == [2, 1]
    assert train[0][1].tolist() == masks["a"].tolist()  # indices, not colours; no zero reduction
    assert val[0][1].tolist() == masks["b"].tolist()


def test_generic_layout_with_classes_txt_and_splits(tmp_path):
    masks = [stored_mask(i, [0, 1, 2]) for i in range(3)]
    make_generic(tmp_path, masks, ["sky", "road", "car"], split="train")
    make_generic(tmp_path, masks[:1], split="val")
    train = build_seg_source(str(tmp_path), "train")
    assert train.classes == ["sky", "road", "car"] and train.num_classes == 3
    assert train.channels == 1 and train.info.image_size is None  # 6x8 images: no common square side
    assert [train[i][1].tolist() for i in range(3)] == [m.tolist() for m in masks]
    image, mask = train[1]
    assert torch.equal(image[0], mask * 40)  # image and mask paired by stem
    assert len(build_seg_source(str(tmp_path), "val")) == 1


@pytest.mark.parametrize("pairs, held_out", [(2, 1), (5, 1), (20, 2)])
def test_generic_layout_without_split_holds_out_a_seeded_part(tmp_path, pairs, held_out):
    """10% of the pairs go to val, at least one: a folder of 2 to 5 pairs still has a val split."""
    make_generic(tmp_path, [stored_mask(i, [0, 1]) for i in range(pairs)])
    train = build_seg_source(str(tmp_path), "train", num_classes=2)
    val = build_seg_source(str(tmp_path), "val", num_classes=2)
    assert train.classes == ["class_0", "class_1"]
    assert (len(train), len(val)) == (pairs - held_out, held_out)
    assert not set(train.images) & set(val.images)
    assert val.images == build_seg_source(str(tmp_path), "val", num_classes=2).images  # the same every time


def test_a_layout_lists_its_files_by_name_hidden_ones_left_out(tmp_path):
    """The pairs come in file-name order whatever order the folder lists them in (a run's order and its
    hold-out must not depend on the file system), and hidden files (`._img0.png` of macOS) are no images."""
    masks = {i: stored_mask(i, [0, 1]) for i in (5, 2, 7, 0, 3, 6, 1, 4)}  # written out of order
    for i, mask in masks.items():
        save(tmp_path / "images" / "train" / f"img{i}.png", (mask * 40).astype(np.uint8))
        save(tmp_path / "masks" / "train" / f"img{i}.png", mask)
    save(tmp_path / "images" / "train" / "._img0.png", np.zeros((2, 2)))
    source = build_seg_source(str(tmp_path), "train", num_classes=2)
    assert [Path(p).name for p in source.images] == [f"img{i}.png" for i in range(8)]
    assert [source[i][1].tolist() for i in range(8)] == [masks[i].tolist() for i in range(8)]


def test_an_image_or_mask_with_an_upper_case_extension_is_read(tmp_path):
    mask = stored_mask(0, [0, 1])
    save(tmp_path / "images" / "train" / "img0.PNG", mask * 40)
    save(tmp_path / "masks" / "train" / "img0.Png", mask)
    source = build_seg_source(str(tmp_path), "train", num_classes=2)
    assert [Path(p).name for p in source.masks] == ["img0.Png"]
    assert source[0][1].tolist() == mask.tolist()


def test_class_names_given_replace_a_folders_classes_txt(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1])], ["a", "b"])
    assert build_seg_source(str(tmp_path), "train", class_list=["sky", "road"]).classes == ["sky", "road"]
    one_line_error("num_classes=3", build_seg_source, str(tmp_path), "train", num_classes=3)


def test_a_source_is_a_sequence_of_its_pairs(tmp_path):
    """Indices from -len to len - 1 read pairs; the next one raises IndexError (as a sequence's does, which
    ends iterating it), not a message about a file."""
    masks = [stored_mask(i, [0, 1]) for i in range(3)]
    source = build_seg_source(str(make_generic(tmp_path, masks, ["a", "b"], split="train")), "train")
    assert [mask.tolist() for _, mask in source] == [m.tolist() for m in masks]
    assert source[-3][1].tolist() == masks[0].tolist()
    for index in (3, -4):
        with pytest.raises(IndexError, match=f"index {index} out of range for 3 pairs"):
            source[index]


def test_generic_single_pair_is_both_splits(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1])])
    train, val = (build_seg_source(str(tmp_path), s, num_classes=2) for s in ("train", "val"))
    assert train.images == val.images and len(train) == 1


def test_num_classes_overrides_a_layouts_own_names(tmp_path):
    make_ade(tmp_path, {"train": [stored_mask(0, [1, 2])], "val": []})
    assert build_seg_source(str(tmp_path), "train", num_classes=150).classes[0] == "wall"
    assert build_seg_source(str(tmp_path), "train", num_classes=4).classes == [f"class_{k}" for k in range(4)]


def test_channels_can_be_converted(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1])], ["a", "b"])
    source = build_seg_source(str(tmp_path), "train", channels=3)
    assert source.channels == 3 and source[0][0].shape == (3, 6, 8)
    assert (source.info.mean, source.info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    grey = build_seg_source(str(tmp_path), "train")  # as stored: grey, normalized by 0.5 and 0.5
    assert (grey.channels, grey[0][0].shape[0], grey.info.mean, grey.info.std) == (1, 1, (0.5,), (0.5,))
    one_line_error("channels=2 is not supported", build_seg_source, str(tmp_path), "train", channels=2)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(MimkitError, match=match) as caught:
        fn(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_mask_of_another_size_is_refused_at_once(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((24, 32)))
    save(tmp_path / "masks" / "a.png", np.zeros((12, 16)))
    message = one_line_error("size", build_seg_source, str(tmp_path), "train", num_classes=2)
    assert str(tmp_path / "masks" / "a.png") in message and "16x12" in message and "32x24" in message  # WxH


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_turned_by_its_exif_orientation_takes_a_mask_of_its_turned_size(tmp_path, orientation):
    """A photo stored 32x24 whose EXIF orientation is 5-8 shows (and decodes) 24x32: its mask, drawn on what
    the user sees, is of the turned size, checked against the header without decoding; 1-4 keep 32x24."""
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(jpeg(rgb(0, (24, 32)), orientation))
    shown = (32, 24) if orientation >= 5 else (24, 32)  # (height, width)
    save(tmp_path / "masks" / "train" / "a.png", np.ones(shown))
    source = build_seg_source(str(tmp_path), "train", num_classes=2)
    assert source.image_size(0) == shown[::-1]  # (width, height)
    image, mask = source[0]
    assert tuple(image.shape[1:]) == tuple(mask.shape) == shown


def test_label_at_or_above_num_classes_is_refused(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1]), np.array([[0, 7], [3, 255]], np.uint8)])
    message = one_line_error("label 7", build_seg_source, str(tmp_path), "train", num_classes=3)  # largest
    assert "img1.png" in message
    assert build_seg_source(str(tmp_path), "train", num_classes=8)  # 255 is ignore, not a label


def test_ade_label_above_150_names_the_stored_value(tmp_path):
    make_ade(tmp_path, {"train": [np.array([[0, 151]], np.uint8)], "val": []})
    message = one_line_error("label 151", build_seg_source, str(tmp_path), "train")
    assert "ADE_0.png" in message and "150 classes" in message


def test_bad_mask_outside_the_probe_fails_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(segmentation, "PROBE_SAMPLES", 2)  # the first and the last pair only
    make_generic(tmp_path, [stored_mask(i, [0, 1]) for i in range(4)], ["a", "b"], split="train")
    save(tmp_path / "masks" / "train" / "img1.png", np.full((6, 8), 9))
    source = build_seg_source(str(tmp_path), "train")
    source[2]
    one_line_error("img1.png", source.__getitem__, 1)


def test_the_probe_reads_pairs_spread_to_the_last(tmp_path):
    """A source is made after reading pairs up to the last: a bad last mask fails at once, and images
    of two sizes leave no common image size."""
    make_generic(tmp_path, [stored_mask(i, [0, 1]) for i in range(3)] + [stored_mask(3, [0, 1], (6, 6))],
                 ["a", "b"], split="train")
    assert build_seg_source(str(tmp_path), "train").info.image_size is None
    save(tmp_path / "masks" / "train" / "img3.png", np.full((6, 6), 9))
    one_line_error("img3.png", build_seg_source, str(tmp_path), "train")


def test_check_masks_reports_the_classes_found_without_the_ignore_index(tmp_path):
    make_generic(tmp_path, [np.array([[0, 2], [255, 2]], np.uint8), np.array([[255, 1]], np.uint8)],
                 split="train")
    found = build_seg_source(str(tmp_path), "train", num_classes=3).check_masks([0, 1])
    assert found.labels == {0, 1, 2} and found.sizes == [(2, 2), (2, 1)]


def test_a_source_holds_one_to_255_classes_and_at_least_one_pair(tmp_path):
    """A mask stores class ids 0-254 (255 is the ignore index): 255 classes are the most, one the fewest; a
    source of no pairs is refused by name."""
    image, mask = save(tmp_path / "a.png", np.zeros((2, 3))), save(tmp_path / "a_mask.png", np.zeros((2, 3)))
    for count in (1, 255):
        assert SegSource("mine", [image], [mask], [f"c{k}" for k in range(count)], False).num_classes == count
    for count in (0, 256):
        one_line_error(f"mine: {count} classes; a mask stores 1 to 255 classes", SegSource, "mine", [image],
                       [mask], [f"c{k}" for k in range(count)], False)
    one_line_error("mine: no image/mask pairs", SegSource, "mine", [], [], ["a", "b"], False)


@pytest.mark.parametrize("broken", ["images", "masks"])
def test_an_unreadable_file_is_named_when_checked_and_when_read(tmp_path, broken):
    make_generic(tmp_path, [stored_mask(i, [0, 1]) for i in range(2)], ["a", "b"], split="train")
    source = build_seg_source(str(tmp_path), "train")
    (tmp_path / broken / "train" / "img1.png").write_bytes(b"not a picture")
    what = {"images": "image", "masks": "mask"}[broken]
    one_line_error(f"cannot read {what} '.*img1.png'", source.check_masks, [0, 1])
    one_line_error(f"cannot read {what} '.*img1.png'", source.__getitem__, 1)
    one_line_error(f"cannot read {what} '.*img1.png'", build_seg_source, str(tmp_path), "train")


def test_image_without_a_mask(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1])], ["a", "b"])
    save(tmp_path / "images" / "lonely.png", np.zeros((6, 8)))
    message = one_line_error("no mask", build_seg_source, str(tmp_path), "train")
    assert "lonely.png" in message


def test_ade_and_voc_images_without_masks(tmp_path):
    make_ade(tmp_path / "ade", {"train": [stored_mask(0, [1])], "val": []})
    save(tmp_path / "ade" / "images" / "training" / "extra.jpg", rgb(0))
    one_line_error("extra.jpg.* no mask", build_seg_source, str(tmp_path / "ade"), "train")
    voc = tmp_path / "voc"
    save(voc / "JPEGImages" / "a.jpg", rgb(0))
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    one_line_error("a.jpg.* no mask", build_seg_source, str(voc), "train")


def test_empty_split(tmp_path):
    make_ade(tmp_path, {"train": [stored_mask(0, [1])], "val": []})
    (tmp_path / "images" / "validation").mkdir(parents=True)
    one_line_error("val split .* holds no images", build_seg_source, str(tmp_path), "val")


def test_folder_of_no_known_layout_and_other_bad_specs(tmp_path):
    (tmp_path / "pictures").mkdir()
    one_line_error("no known segmentation layout", build_seg_source, str(tmp_path), "train")
    one_line_error("does not exist", build_seg_source, str(tmp_path / "missing"), "train")
    one_line_error("split 'test'", build_seg_source, str(tmp_path), "test")
    (tmp_path / "scenes.zip").write_bytes(b"PK")
    one_line_error("'.*scenes.zip' is not a folder", build_seg_source, str(tmp_path / "scenes.zip"), "train")


def test_spread_picks_indices_evenly_first_and_last_included():
    assert spread(10, 2) == [0, 9] and spread(10, 4) == [0, 3, 6, 9] and spread(7, 3) == [0, 3, 6]
    assert spread(3, 16) == [0, 1, 2] and spread(1, 5) == [0]


def two_stems(root: Path) -> None:
    make_generic(root, [stored_mask(0, [0, 1])], ["a", "b"])
    save(root / "images" / "img0.jpg", rgb(0))


def ade_without_val(root: Path) -> None:
    make_ade(root, {"train": [stored_mask(0, [1])], "val": []})


def voc_listing(root: Path, split: str = "train", listed: str = "a") -> None:
    save(root / "JPEGImages" / "a.jpg", rgb(0))
    save(root / "SegmentationClass" / "a.png", stored_mask(0, [0, 1]))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(f"{listed}\n")


def empty_classes_txt(root: Path) -> None:
    make_generic(root, [stored_mask(0, [0, 1])])
    (root / "classes.txt").write_text("\n  \n")


@pytest.mark.parametrize("build, split, match", [
    (two_stems, "train", "'.*img0.(png|jpg)' and '.*img0.(png|jpg)' share a stem"),
    (ade_without_val, "val", "ADE20K-layout folder .* has no .*validation' for the val split"),
    (voc_listing, "val", "Pascal VOC folder .* has no .*val.txt' listing the val images"),
    (lambda root: voc_listing(root, listed="a b"), "train",
     "train.txt' lists 'b' but .*b.jpg' does not exist"),
    (lambda root: make_generic(root, [stored_mask(0, [0, 1])], ["a", "b"], split="train"), "val",
     "has images/train but no .*val' for the val split"),
    (empty_classes_txt, "train", "classes.txt' lists no class names"),
])
def test_each_layouts_missing_files_are_one_line_errors_naming_them(tmp_path, build, split, match):
    build(tmp_path)
    one_line_error(match, build_seg_source, str(tmp_path), split)
    one_line_error("split 'test' is not one of train, val", detect_layout(tmp_path).split, "test")


def test_generic_without_class_names(tmp_path):
    make_generic(tmp_path, [stored_mask(0, [0, 1])])
    one_line_error("classes.txt.*seg.num_classes", build_seg_source, str(tmp_path), "train")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    one_line_error("num_classes=3 but .* lists 2", build_seg_source, str(tmp_path), "train", num_classes=3)


def test_colour_mask_is_refused(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((6, 8)))
    save(tmp_path / "masks" / "a.png", rgb(0))
    one_line_error("a.png' is stored as RGB", build_seg_source, str(tmp_path), "train", num_classes=2)


# ---------------------------------------------------------------------------------------------------------
# Joint views


def checkerboard(height: int, width: int, block: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """An image of bright and dark blocks, and the mask that thresholds it (1 bright, 0 dark)."""
    rows, cols = torch.arange(height)[:, None] // block, torch.arange(width)[None] // (block + 3)
    bright = (rows * 7 + cols * 3) % 5 < 2  # [H, W] an irregular pattern: a misplaced crop would not match
    image = torch.where(bright, 220, 30).to(torch.uint8).expand(channels, height, width).clone()
    return image, bright.to(torch.uint8)


def test_rescaled_size_fits_long_and_short_sides():
    assert rescaled_size(480, 640, (2048, 512)) == (512, 683)
    assert rescaled_size(100, 4000, (2048, 512)) == (51, 2048)  # the long side binds
    assert rescaled_size(56, 56, (56, 56)) == (56, 56)
    assert rescaled_size(1, 8000, (2048, 512)) == (1, 2048)  # never below one pixel
    assert rescaled_size(8000, 1, (2048, 512)) == (2048, 1)


@pytest.mark.parametrize("height, width, scale", [(480, 640, (2048, 512)), (300, 40, (64, 32)),
                                                  (7, 90, (50, 20)), (33, 65, (16, 16))])
def test_rescaled_size_of_a_turned_image_is_the_turned_size(height, width, scale):
    """A portrait image gets the landscape image's size turned: a fit that read the sides in a fixed order
    (height as the long side, or its result as (width, height)) shows on non-square images only."""
    size = rescaled_size(height, width, scale)
    assert rescaled_size(width, height, scale) == size[::-1]
    assert max(size) <= max(scale) + 1 and min(size) <= min(scale) + 1
    assert (size[0] > size[1]) == (height > width)


@pytest.mark.parametrize("channels", [1, 3])
def test_train_view_keeps_mask_on_image(channels):
    image, mask = checkerboard(60, 90, 7, channels)
    mean, std = (0.5,) * channels, (0.25,) * channels
    view = SegTrainView(48, (90, 60), mean, std, photometric=False)
    agreement = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = view(image, mask)
        assert out["image"].shape == (channels, 48, 48) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (48, 48) and out["mask"].dtype == torch.int64
        labelled = out["mask"] != 255
        bright = out["image"][0] * std[0] + mean[0] > 0.5  # threshold the view, as the mask was made
        agreement.append((bright == out["mask"].bool())[labelled].float().mean().item())
        assert (out["image"][:, ~labelled] == 0).all()  # padding: the mean colour where the mask ignores
    # Only block edges blurred by the bilinear resize may disagree. A mask half a pixel off (plain
    # NEAREST instead of pixel-centre sampling) agrees about 0.94 on average; one pixel off, about 0.93.
    assert min(agreement) > 0.93 and sum(agreement) / len(agreement) > 0.98, agreement


def test_a_crop_of_height_and_width_is_cut_and_padded_to_that_shape():
    image, mask = checkerboard(60, 90, 7)
    wide = SegTrainView((24, 40), (90, 60), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), photometric=False)
    tall = SegTrainView((80, 20), (90, 60), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), photometric=False)
    torch.manual_seed(0)
    out = wide(image, mask)
    assert out["image"].shape == (3, 24, 40) and out["mask"].shape == (24, 40) and (out["mask"] != 255).all()
    out = tall(image, mask)  # 60 rows of image: 20 rows of padding below
    assert out["image"].shape == (3, 80, 20)
    assert (out["mask"][60:] == 255).all() and (out["mask"][:60] != 255).all()


def test_views_shrink_images_with_antialiasing():
    """A 4x smaller image averages each 4 pixels (a plain bilinear resize would read 2 of them): columns of
    255, 0, 0, 0 become about 64 everywhere, in the train view and the eval view."""
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[..., ::4] = 255
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    train = SegTrainView(16, (64, 64), (0.5,) * 3, (0.25,) * 3, ratio_range=(0.25, 0.25), photometric=False)
    evaluated = SegEvalView((16, 16), (0.5,) * 3, (0.25,) * 3)
    for view in (train, evaluated):
        pixels = unnormalized(view(image, mask)["image"])[:, 2:-2, 2:-2]  # (the borders average fewer)
        assert ((pixels - 64 / 255).abs() < 0.05).all(), type(view).__name__


def test_train_view_distorts_colours_unless_asked_not_to():
    assert isinstance(SegTrainView(8, (8, 8), [0.5], [0.5]).photometric, PhotometricDistortion)
    assert not isinstance(SegTrainView(8, (8, 8), [0.5], [0.5], photometric=False).photometric,
                          PhotometricDistortion)


def test_train_view_pads_small_images_with_ignore():
    image, mask = checkerboard(20, 30, 4)
    torch.manual_seed(0)
    view = SegTrainView(64, (30, 20), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), photometric=False)
    out = view(image, mask)
    assert out["mask"].shape == (64, 64)
    assert out["mask"][:20, :30].tolist() in (mask.long().tolist(), mask.long().flip(-1).tolist())
    assert (out["mask"][20:] == 255).all() and (out["mask"][:, 30:] == 255).all()


def test_crop_retries_while_one_class_dominates():
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[:40, :40] = 1  # an object in a corner: most crops would be one class only
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)

    def balanced_share(cat_max_ratio: float) -> float:
        view = SegTrainView(40, (100, 100), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0),
                            cat_max_ratio=cat_max_ratio, photometric=False)
        shares = []
        for seed in range(100):
            torch.manual_seed(seed)
            counts = view(image, mask)["mask"].flatten().bincount(minlength=2)
            shares.append(bool(counts.max() < 0.75 * counts.sum()))
        return sum(shares) / len(shares)

    assert balanced_share(0.75) > balanced_share(1.0) + 0.3


def test_a_cat_max_ratio_of_1_draws_each_crop_once():
    """1 turns the retries off: every crop is the first one drawn, as with a single try."""
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[:40, :40] = 1  # most crops hold one class: a view that retried would move them
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    off = SegTrainView(40, (100, 100), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                       photometric=False)
    once = SegTrainView(40, (100, 100), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), crop_tries=1,
                        photometric=False)
    for seed in range(20):
        crops = []
        for view in (off, once):
            torch.manual_seed(seed)
            crops.append(view(image, mask)["mask"])
        assert torch.equal(*crops), seed


def test_the_crop_balance_leaves_ignored_pixels_out():
    """Ignored pixels are no class: a crop of one class and ignored pixels is drawn again, however the two
    share it (counted as a class, 255 would make most such crops look balanced)."""
    mask = torch.full((100, 100), 255, dtype=torch.uint8)
    mask[:50, :50], mask[50:, 50:] = 1, 0  # two classes meet only at the centre; the rest is ignored
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    view = SegTrainView(40, (100, 100), (0.5,) * 3, (0.5,) * 3, ratio_range=(1.0, 1.0), photometric=False)
    two_classes = []
    for seed in range(50):
        torch.manual_seed(seed)
        labels = view(image, mask)["mask"]
        two_classes.append(len(labels[labels != 255].unique()) == 2)
    assert sum(two_classes) / len(two_classes) > 0.9


def test_photometric_distortion_changes_colours_only_within_range():
    image = torch.rand(3, 16, 16)
    distort = PhotometricDistortion()
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(distort(image))
    assert all(o.shape == image.shape and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert sum(not torch.equal(o, image) for o in outs) >= 6
    torch.manual_seed(0)
    grey = distort(image[:1])  # saturation and hue are skipped: no error on one channel
    assert grey.shape == (1, 16, 16)


def test_eval_view_resizes_image_and_keeps_mask():
    image, mask = checkerboard(30, 40, 5)
    out = SegEvalView((80, 60), (0.5,) * 3, (0.5,) * 3)(image, mask)
    assert out["image"].shape == (3, 60, 80) and torch.equal(out["mask"], mask.long())
    same = SegEvalView((40, 30), (0.5,) * 3, (0.5,) * 3)(image, mask)["image"]
    assert torch.allclose(same, (image.float() / 255 - 0.5) / 0.5)  # already at scale: not resampled
    assert SegEvalView(None, (0.5,) * 3, (0.5,) * 3).image(image).shape == (3, 30, 40)


def unnormalized(view_image: torch.Tensor) -> torch.Tensor:
    """A view's image (normalized with mean 0.5, std 0.25) back in [0, 1]."""
    return view_image * 0.25 + 0.5


def whole_image_view(side: int, **options) -> SegTrainView:
    """A train view whose crop is the whole (rescaled) `side` x `side` image: only the flip is random."""
    return SegTrainView(side, (side, side), (0.5,) * 3, (0.25,) * 3, **options)


def test_train_view_flips_left_right_and_keeps_pixels_without_photometric():
    """ratio 1 and a crop of the whole image: the view is the image itself or its mirror (left-right, never
    upside down), mask with it; `photometric=False` leaves every pixel as stored."""
    image, mask = checkerboard(24, 24, 3)
    view = whole_image_view(24, ratio_range=(1.0, 1.0), photometric=False)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = view(image, mask)
        pixels = (unnormalized(out["image"]) * 255).round().to(torch.uint8)
        flipped = not torch.equal(pixels, image)
        assert torch.equal(pixels, image.flip(-1) if flipped else image)
        assert torch.equal(out["mask"], (mask.flip(-1) if flipped else mask).long())
        flips.add(flipped)
    assert flips == {True, False}


def test_train_view_rescales_by_its_ratio():
    """ratio 2: a 12-pixel image with its own size as the scale is seen at 24 pixels, each mask pixel
    twice as wide (nearest at pixel centres), classes never mixed at their edges."""
    mask = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 0, 0, 2, 2], dtype=torch.uint8).expand(12, 12).clone()
    image = (mask * 100).expand(3, 12, 12).clone()
    view = SegTrainView(24, (12, 12), (0.5,) * 3, (0.25,) * 3, ratio_range=(2.0, 2.0), photometric=False)
    torch.manual_seed(0)
    out = view(image, mask)["mask"]
    expected = mask.long().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(out, expected) or torch.equal(out, expected.flip(-1))


def test_the_train_views_ratios_span_half_to_twice_the_scale_by_default():
    """mmseg's ratio_range (0.5, 2.0): a 10-pixel image at scale 10 is seen from 5 to 20 pixels wide (the
    mask's labelled square inside a 24-pixel crop padded with the ignore index)."""
    image, mask = checkerboard(10, 10, 2)
    view = SegTrainView(24, (10, 10), (0.5,) * 3, (0.25,) * 3, photometric=False)
    sides = set()
    for seed in range(100):
        torch.manual_seed(seed)
        sides.add(round(float((view(image, mask)["mask"] != IGNORE_INDEX).sum()) ** 0.5))
    assert min(sides) <= 6 and max(sides) >= 19


def test_photometric_distortion_acts_before_normalize():
    """The distortion works on [0, 1] pixels: a black and white image keeps most of its contrast (after
    normalize, its clamps would squeeze every pixel into [0.5, 0.75])."""
    image, mask = checkerboard(16, 16, 2)
    image = torch.where(mask.bool(), 255, 0).to(torch.uint8).expand(3, 16, 16).clone()
    view = whole_image_view(16, ratio_range=(1.0, 1.0))
    for seed in range(12):
        torch.manual_seed(seed)
        pixels = unnormalized(view(image, mask)["image"])
        assert pixels.max() - pixels.min() > 0.35, seed


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_distortion_changes_saturation_and_hue_of_colour_images_only(channels, monkeypatch):
    called = []

    def spy(name):
        return lambda image, factor: called.append(name) or image

    for name in ("adjust_saturation", "adjust_hue"):
        monkeypatch.setattr(seg_transforms.TF, name, spy(name))
    distort = PhotometricDistortion()
    for seed in range(12):
        torch.manual_seed(seed)
        distort(torch.rand(channels, 8, 8))
    assert set(called) == ({"adjust_saturation", "adjust_hue"} if channels == 3 else set())


def test_photometric_distortion_draws_each_change_over_its_whole_range(monkeypatch):
    """mmsegmentation's ranges, both ways: brightness +-32/255 (a grey image, which contrast, saturation and
    hue leave as it is but for rounding, shows it), contrast and saturation factors in [0.5, 1.5], hue
    +-0.1 of the circle; each change is drawn in about half of the images."""
    grey = PhotometricDistortion()
    shifts = []
    for seed in range(60):
        torch.manual_seed(seed)
        shifts.append((grey(torch.full((3, 4, 4), 0.5)) - 0.5).flatten().unique().item())
    assert max(abs(d) for d in shifts) <= 32 / 255 + 1e-6
    assert min(shifts) < -20 / 255 and max(shifts) > 20 / 255 and 15 < sum(abs(d) < 1e-4 for d in shifts) < 45
    for seed in range(60):  # brightened white and darkened black stay in [0, 1]
        torch.manual_seed(seed)
        assert grey(torch.ones(1, 2, 2)).max() <= 1 and grey(torch.zeros(1, 2, 2)).min() >= 0
    factors: dict[str, list[float]] = {"adjust_contrast": [], "adjust_saturation": [], "adjust_hue": []}
    order: list[str] = []
    for name, drawn in factors.items():
        monkeypatch.setattr(seg_transforms.TF, name, lambda image, factor, name=name, drawn=drawn:
                            drawn.append(factor) or order.append(name) or image)
    contrast_first = set()
    for seed in range(60):
        torch.manual_seed(seed)
        order.clear()
        grey(torch.rand(3, 4, 4))
        assert order.count("adjust_contrast") <= 1
        if "adjust_contrast" in order and len(order) > 1:
            contrast_first.add(order[0] == "adjust_contrast")
    assert contrast_first == {True, False}  # contrast before the colour changes in some images, after others
    for name, (low, high) in (("adjust_contrast", (0.5, 1.5)), ("adjust_saturation", (0.5, 1.5)),
                              ("adjust_hue", (-0.1, 0.1))):
        drawn = factors[name]
        assert 15 < len(drawn) < 45 and low <= min(drawn) and max(drawn) <= high, name
        middle = (low + high) / 2
        assert min(drawn) < middle - 0.3 * (high - low) and max(drawn) > middle + 0.3 * (high - low), name


class PairSource(torch.utils.data.Dataset):
    def __init__(self, n: int = 4):
        self.pairs = [checkerboard(40, 50, 3 + i) for i in range(n)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def test_seeded_joint_views_same_seed_same_view_different_seeds_differ():
    views = SeededViews(PairSource(), SegTrainView(32, (50, 40), (0.5,) * 3, (0.5,) * 3))
    first = views[(1, 123)]
    assert set(first) == {"image", "mask"}  # a mask is transformed, not attached as a label
    again = views[(1, 123)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    others = [views[(1, seed)] for seed in range(124, 130)]
    assert any(not torch.equal(first["image"], o["image"]) for o in others)
    assert any(not torch.equal(first["mask"], o["mask"]) for o in others)


def test_seeded_joint_views_leave_the_global_rng_alone():
    views = SeededViews(PairSource(), SegTrainView(32, (50, 40), (0.5,) * 3, (0.5,) * 3))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    views[(0, 5)]
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------------
# fmnist-scenes


def tiny_fashion(folder: Path, n: int = 30, split_classes: bool = False) -> Path:
    """IDX files of n 28x28 'items': a bright rectangle of random size on black, labels i % 10 (with
    ``split_classes``: classes 0-4 in the training files, 5-9 in the test files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        h, w = rng.integers(6, 20, 2)
        items[i, 3:3 + h, 5:5 + w] = rng.integers(SCENE_THRESHOLD, 256)
    for prefix, first in (("train", 0), ("t10k", 5 if split_classes else 0)):
        labels = first + np.arange(n) % (5 if split_classes else 10)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", items)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder


def test_make_scene_is_deterministic_and_labels_bright_pixels():
    rng = np.random.default_rng(1)
    items = np.where(rng.random((40, 28, 28)) < 0.4, rng.integers(0, 256, (40, 28, 28)), 0).astype(np.uint8)
    labels = np.arange(40) % 10
    counts = []
    for index in range(30):
        image, mask = make_scene(items, labels, 0, index)
        again = make_scene(items, labels, 0, index)
        assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
        assert image.shape == mask.shape == (SCENE_SIZE, SCENE_SIZE)
        assert ((mask > 0) == (image >= SCENE_THRESHOLD)).all()  # a labelled pixel is a bright one
        counts.append(len(np.unique(mask[mask > 0])))
    assert 1 <= min(counts) and max(counts) <= 3 and len(set(counts)) > 1
    assert not np.array_equal(make_scene(items, labels, 1, 0)[0], make_scene(items, labels, 0, 0)[0])


def test_scenes_hold_one_to_three_whole_items_reaching_every_edge():
    """Items that are solid rectangles, each of its own class: every class's pixels are whole copies of its
    item (no item overlaps another), scenes hold 1, 2 and 3 items, and items are placed up to the canvas's
    last row and column. An item without a pixel bright enough (the last) is left out."""
    sizes = [(4 + i % 5, 3 + (2 * i) % 7) for i in range(10)]
    items = np.zeros((10, 28, 28), np.uint8)
    for i, (h, w) in enumerate(sizes[:-1]):
        items[i, 2:2 + h, 5:5 + w] = 200
    items[-1, 2:20, 2:20] = SCENE_THRESHOLD - 1
    counts, edges, labels = set(), set(), set()
    for index in range(300):
        _, mask = make_scene(items, np.arange(10), 0, index)
        labels |= set(np.unique(mask).tolist())
        placed = 0
        for k in np.unique(mask[mask > 0]).tolist():
            copies, rest = divmod(int((mask == k).sum()), sizes[k - 1][0] * sizes[k - 1][1])
            assert rest == 0, (index, k)  # an item partly covered by another would leave a remainder
            placed += copies
        counts.add(placed)
        edges |= {name for name, line in (("top", mask[0]), ("bottom", mask[-1]), ("left", mask[:, 0]),
                                          ("right", mask[:, -1])) if line.any()}
    assert {1, 2, 3} <= counts <= {0, 1, 2, 3} and 10 not in labels  # (0: the dark item alone)
    assert edges == {"top", "bottom", "left", "right"}


def test_fmnist_scenes_read_roots_files_train_from_the_training_items_val_from_the_test_items(tmp_path,
                                                                                           monkeypatch):
    """``root`` holds the IDX files (found before the installed Fashion-MNIST); train scenes are made of the
    training items, val scenes of the test items (here of disjoint classes: 0-4 and 5-9, stored + 1)."""
    idx = tiny_fashion(tmp_path / "idx", split_classes=True)
    monkeypatch.setattr(segmentation, "SCENE_COUNTS", {"train": 6, "val": 6})
    found = {}
    for split in ("train", "val"):
        source = build_seg_source("fmnist-scenes", split, root=idx)
        found[split] = set().union(*(source[i][1].unique().tolist() for i in range(len(source)))) - {0}
    assert found["train"] and found["train"] <= {1, 2, 3, 4, 5}
    assert found["val"] and found["val"] <= {6, 7, 8, 9, 10}


def test_fmnist_scenes_cached_in_ade_layout(tmp_path, monkeypatch):
    idx = tiny_fashion(tmp_path / "idx")
    counts = {"train": 12, "val": 5}
    folder = fmnist_scenes_folder(tmp_path / "cache", idx_root=idx, counts=counts)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temporary folder left
    assert len(list((folder / "images" / "training").iterdir())) == 12
    assert len(list((folder / "annotations" / "validation").iterdir())) == 5
    first = [sorted((folder / "images" / sub).iterdir())[0].read_bytes() for sub in ("training",
                                                                                        "validation")]
    assert first[0] != first[1]  # val scenes placed by their own seed (here of the same items as train's)
    other = fmnist_scenes_folder(tmp_path / "cache", idx_root=idx, counts={"train": 12, "val": 3})
    assert other != folder and len(list((other / "images" / "validation").iterdir())) == 3
    source = build_seg_source(str(folder), "train")  # the folder alone reads the same way
    assert source.classes == fmnist_scene_classes() and source.num_classes == 11
    masks = [source[i][1] for i in range(len(source))]
    assert all((m != 255).all() and m.max() <= 10 for m in masks)  # background is class 0, not ignored
    assert sum((m == 0).sum() for m in masks) > 0 and sum((m > 0).sum() for m in masks) > 0

    again = tmp_path / "again"
    write_fmnist_scenes(again, counts, idx)
    for path in folder.rglob("*.png"):
        assert path.read_bytes() == (again / path.relative_to(folder)).read_bytes()  # deterministic

    def never(*args):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(segmentation, "write_fmnist_scenes", never)
    assert fmnist_scenes_folder(tmp_path / "cache", idx_root=idx, counts=counts) == folder


def test_fmnist_scenes_writer_keeps_a_folder_another_process_finished(tmp_path):
    idx = tiny_fashion(tmp_path / "idx")
    folder = tmp_path / "scenes"
    write_fmnist_scenes(folder, {"train": 3, "val": 2}, idx)
    marker = folder / "images" / "training" / "scene_000000.png"
    before = marker.stat().st_mtime_ns
    write_fmnist_scenes(folder, {"train": 3, "val": 2}, idx)  # as if it lost the race to rename
    assert marker.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fmnist_scenes_writer_removes_what_a_killed_one_left(tmp_path):
    idx = tiny_fashion(tmp_path / "idx")
    host = socket.gethostname()
    left = [f".scenes-999999999@{host}-k1ll3d00",  # its process is gone
            f".scenes-{os.getpid()}@{host}-runn1ng0",  # still running
            ".scenes-999999999@another-host-r3m0te00"]  # another machine's: not ours to judge
    for name in left:
        (tmp_path / name / "images").mkdir(parents=True)
    write_fmnist_scenes(tmp_path / "scenes", {"train": 3, "val": 2}, idx)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(left[1:])


@needs_fashion
def test_fmnist_scenes_from_the_debian_files(tmp_path, monkeypatch):
    assert segmentation.SCENE_COUNTS == {"train": 10_000, "val": 2_000}  # the benchmark's (the docstring's)
    monkeypatch.setattr(segmentation, "SCENE_COUNTS", {"train": 20, "val": 10})
    train = build_seg_source("fmnist-scenes", "train", root=tmp_path)
    val = build_seg_source("fmnist-scenes", "val", root=tmp_path)
    assert (len(train), len(val), train.num_classes, train.channels) == (20, 10, 11, 1)
    assert train.info.name == "fmnist-scenes" and train.info.image_size == SCENE_SIZE
    assert train.info.mean == (0.2860,)  # Fashion-MNIST's statistics: the encoders' own normalization
    image, mask = train[0]
    assert image.shape == (1, SCENE_SIZE, SCENE_SIZE) and mask.shape == (SCENE_SIZE, SCENE_SIZE)
    assert not torch.equal(train[0][0], val[0][0])  # train and test images make different scenes
    assert isinstance(train, SegSource)


def test_fmnist_scenes_take_the_settings_a_folder_takes(tmp_path, monkeypatch):
    """class names, channels and the pixel limit reach the fmnist-scenes source; its normalization is
    Fashion-MNIST's, one value per channel."""
    idx = tiny_fashion(tmp_path / "idx")
    monkeypatch.setattr(segmentation, "SCENE_COUNTS", {"train": 3, "val": 2})
    names = [f"thing {k}" for k in range(11)]
    source = build_seg_source("fmnist-scenes", "val", root=idx, channels=3, class_list=names)
    assert (len(source), source.classes, source.channels, source[0][0].shape[0]) == (2, names, 3, 3)
    assert source.info.mean == (0.2860,) * 3 and source.info.classes == names
    with pytest.raises(MimkitError, match="max_image_pixels"):
        build_seg_source("fmnist-scenes", "val", root=idx, max_image_pixels=SCENE_SIZE * SCENE_SIZE - 1)
