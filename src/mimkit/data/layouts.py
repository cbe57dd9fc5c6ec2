"""Segmentation folder layouts: which one a folder is in, and the image and mask files of each split.

Recognised from a folder (or from its `ADEChallengeData2016` or `VOCdevkit/VOC2012` sub-folder):
    - ADE20K: `images/{training,validation}/*.jpg` and `annotations/{training,validation}/*.png`, matched
      by stem; 150 classes. Its masks store 0 for "other" and the classes from 1, so the layout has
      `reduce_zero_label`: 0 becomes 255 (ignored) and every other value moves down by one, as the
      benchmark reads them (`reduce_zero_label` is a property of the layout, never an option).
    - Pascal VOC 2012: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNGs),
      `ImageSets/Segmentation/{train,val}.txt` listing the ids; 21 classes (background is class 0),
      255 (the object borders) ignored.
    - generic: `images/` and `masks/` matched by file stem (any image extension), stored labels used as
      they are. With `images/{train,val}` and `masks/{train,val}` those are the splits; without them the
      folder is split by a seeded hold-out: `GENERIC_VAL_FRACTION` of the pairs (at least one), the same
      ones on every call, go to val and the rest to train (evaluating on the training images would
      report a score the model has not earned); a folder of one pair uses it for both.
Any layout may hold a `classes.txt` at its root (one name per line, index = class id after
`reduce_zero_label`).

This module reads names only, never pixels: pretraining uses it to take a segmentation folder's train
images without their masks (`mimkit.data.sources.build_source`), and `mimkit.data.segmentation` to pair
them.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.data.image_files import IMAGE_EXTENSIONS
from mimkit.errors import MimkitError

SEG_SPLITS = ("train", "val")
GENERIC_VAL_FRACTION = 0.1
GENERIC_SPLIT_SEED = 0

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
_ADE_SPLIT = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class SplitFiles:
    """One split of a layout: its images, their masks (same order), and what lists them (for messages)."""

    images: list[Path]
    masks: list[Path]
    listed_by: str


def _by_stem(folder: Path) -> dict[str, Path]:
    """The images directly in `folder` by file stem; two files with one stem are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in found:
                raise MimkitError(f"'{found[path.stem]}' and '{path}' share a stem; keep one file per stem")
            found[path.stem] = path
    return found


def _pair_by_stem(images: list[Path], mask_folder: Path, image_folder: Path) -> list[Path]:
    masks = _by_stem(mask_folder)
    for image in images:
        if image.stem not in masks:
            raise MimkitError(f"image '{image}' has no mask in '{mask_folder}' (masks are matched to "
                              f"'{image_folder}' by file stem)")
    return [masks[image.stem] for image in images]


def _ade_files(root: Path, split: str) -> SplitFiles:
    image_folder = root / "images" / _ADE_SPLIT[split]
    if not image_folder.is_dir():
        raise MimkitError(f"ADE20K-layout folder '{root}' has no '{image_folder}' for the {split} split")
    images = list(_by_stem(image_folder).values())
    return SplitFiles(images, _pair_by_stem(images, root / "annotations" / _ADE_SPLIT[split], image_folder),
                      f"the images in '{image_folder}'")


def _voc_files(root: Path, split: str) -> SplitFiles:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise MimkitError(f"Pascal VOC folder '{root}' has no '{listing}' listing the {split} images")
    images, masks = [], []
    for stem in listing.read_text().split():
        image, mask = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
        if not image.is_file():
            raise MimkitError(f"'{listing}' lists '{stem}' but '{image}' does not exist")
        if not mask.is_file():
            raise MimkitError(f"image '{image}' has no mask '{mask}'")
        images.append(image)
        masks.append(mask)
    return SplitFiles(images, masks, f"'{listing}'")


def _generic_files(root: Path, split: str) -> SplitFiles:
    if (root / "images" / "train").is_dir():
        image_folder = root / "images" / split
        if not image_folder.is_dir():
            raise MimkitError(f"'{root}' has images/train but no '{image_folder}' for the {split} split")
        images = list(_by_stem(image_folder).values())
        return SplitFiles(images, _pair_by_stem(images, root / "masks" / split, image_folder),
                          f"the images in '{image_folder}'")
    images = list(_by_stem(root / "images").values())
    masks = _pair_by_stem(images, root / "masks", root / "images")
    listed_by = f"a seeded {GENERIC_VAL_FRACTION:.0%} hold-out of '{root / 'images'}'"
    if len(images) < 2:  # nothing to hold out: both splits are the one pair
        return SplitFiles(images, masks, listed_by)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(GENERIC_SPLIT_SEED)).tolist()
    held_out = set(order[: max(1, round(GENERIC_VAL_FRACTION * len(images)))])
    keep = [i for i in range(len(images)) if (i in held_out) == (split == "val")]
    return SplitFiles([images[i] for i in keep], [masks[i] for i in keep], listed_by)


_READERS = {"ADE20K": _ade_files, "Pascal VOC": _voc_files, "generic": _generic_files}


@dataclass(frozen=True)
class Layout:
    """A segmentation folder's layout.

    Attributes:
        name: ``ADE20K``, ``Pascal VOC`` or ``generic``.
        root: the folder the layout's sub-folders are in.
        classes: the layout's own class names; empty when the folder must name them.
        reduce_zero_label: stored 0 is ignored and every other stored value moves down by one.
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    reduce_zero_label: bool

    def split(self, split: str) -> SplitFiles:
        """The image and mask files of ``split`` (``train`` or ``val``); an empty split is an error naming
        what lists it."""
        if split not in SEG_SPLITS:
            raise MimkitError(f"segmentation split {split!r} is not one of {', '.join(SEG_SPLITS)}")
        files = _READERS[self.name](self.root, split)
        if not files.images:
            raise MimkitError(f"the {split} split of {self.name}-layout folder '{self.root}' holds no images: "
                              f"{files.listed_by} is empty")
        return files


def find_layout(folder: Path) -> Layout | None:
    """The layout `folder` (or its `ADEChallengeData2016` / `VOCdevkit/VOC2012` sub-folder) is in, or None."""
    for root in (folder, folder / "ADEChallengeData2016", folder / "VOCdevkit" / "VOC2012"):
        if (root / "images" / "training").is_dir() and (root / "annotations").is_dir():
            return Layout("ADE20K", root, ADE20K_CLASSES, reduce_zero_label=True)
        if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
            return Layout("Pascal VOC", root, VOC_CLASSES, reduce_zero_label=False)
        if (root / "images").is_dir() and (root / "masks").is_dir():
            return Layout("generic", root, (), reduce_zero_label=False)
    return None


def detect_layout(folder: Path) -> Layout:
    """`find_layout`, or a one-line error naming the layouts it knows."""
    layout = find_layout(folder)
    if layout is None:
        raise MimkitError(
            f"'{folder}' is in no known segmentation layout: use ADE20K's (images/training + "
            "annotations/training), Pascal VOC's (JPEGImages + SegmentationClass + ImageSets/Segmentation), "
            "or images/ + masks/ matched by file stem"
        )
    return layout


def read_class_names(path: Path) -> list[str]:
    """The names of a `classes.txt`, one per line (blank lines skipped)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise MimkitError(f"'{path}' lists no class names; write one name per line")
    return names


def class_names(layout: Layout, num_classes: int | None = None, names: list[str] | None = None) -> list[str]:
    """The classes of a layout, from the first of: ``names`` (``seg.class_names``), the folder's
    `classes.txt`, ``num_classes`` (the layout's own names when it has as many, else ``class_0`` ...), the
    layout's own names. ``num_classes`` must agree with whichever names are used."""
    listed = layout.root / "classes.txt"
    given = list(names) if names else read_class_names(listed) if listed.is_file() else None
    if given is not None:
        source = "seg.class_names" if names else f"'{listed}'"
        if num_classes is not None and num_classes != len(given):
            raise MimkitError(f"num_classes={num_classes} but {source} lists {len(given)} classes; "
                              "drop one of them or make them agree")
        return given
    if num_classes is not None:
        return list(layout.classes) if num_classes == len(layout.classes) else [
            f"class_{k}" for k in range(num_classes)]
    if not layout.classes:
        raise MimkitError(f"'{layout.root}' does not name its classes: write '{listed}' (one name per line), "
                          "give them (--set 'seg.class_names=[a,b]') or give the count (--set "
                          "seg.num_classes=N)")
    return list(layout.classes)
