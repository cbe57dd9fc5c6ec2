"""`benchmarks/textured_scenes.py`: the small-budget segmentation set is deterministic, in the Pascal VOC
layout mimkit reads (palette masks, labels 0-5 and 255), and its shapes overlap."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mimkit.data.segmentation import folder_seg_source
from mimkit.viz import seg_palette

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import textured_scenes as scenes  # noqa: E402


def test_a_scene_is_a_function_of_its_split_and_index():
    first, again, other = scenes.make_scene(0, 7), scenes.make_scene(0, 7), scenes.make_scene(1, 7)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_the_folder_is_voc_layout_with_palette_masks(tmp_path):
    out = tmp_path / "set"
    scenes.write_scenes(out, {"train": 6, "val": 2})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left beside it
    assert (out / "ImageSets/Segmentation/val.txt").read_text().split() == ["val_000000", "val_000001"]
    with Image.open(out / "SegmentationClass/train_000003.png") as mask:
        assert mask.mode == "P"
        assert mask.getpalette()[:3 * 256] == seg_palette(256).flatten().tolist()  # VOC's colours
        assert np.array_equal(np.asarray(mask), scenes.make_scene(0, 3)[1])  # indices are the labels
    with Image.open(out / "JPEGImages/train_000003.jpg") as image:
        assert image.mode == "RGB" and image.size == (64, 64)

    train = folder_seg_source(out, "train")
    assert len(train) == 6 and train.classes == list(scenes.CLASSES) and train.channels == 3
    labels = np.unique(np.concatenate([train[i][1].numpy().ravel() for i in range(len(train))]))
    assert set(labels) <= {*range(len(scenes.CLASSES)), 255} and 255 in labels and len(labels) > 3


def test_later_shapes_cover_earlier_ones_behind_an_ignored_border():
    overlapping = 0
    for index in range(20):
        _, labels, shapes = scenes.make_scene(0, index)
        painted = np.zeros_like(labels)
        for label, covered in shapes:  # in drawing order: the last shape over a pixel labels it
            painted[covered] = label
        kept = labels != scenes.IGNORE
        assert np.array_equal(labels[kept], painted[kept])
        assert not (scenes.borders(painted) & kept).any()  # every border between two labels is ignored
        overlapping += any((a & b & kept).any() for k, (_, a) in enumerate(shapes) for _, b in shapes[k + 1:])
    assert overlapping >= 3  # of 20 scenes
