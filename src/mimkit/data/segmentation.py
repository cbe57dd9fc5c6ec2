"""Segmentation sources: `(image, mask)` pairs from ADE20K, Pascal VOC, image + mask folders, fmnist-scenes.

Use:
    ```
    from mimkit.data.segmentation import build_seg_source
    from mimkit.data.seg_transforms import SegTrainView, SegEvalView
    from mimkit.data.loader import SeededViews

    train = build_seg_source("fmnist-scenes", "train")  # or a folder: ADE20K, VOC 2012, images/ + masks/
    val = build_seg_source("fmnist-scenes", "val", channels=train.channels)
    image, mask = train[0]  # uint8 (C, H, W), uint8 (H, W): class ids < train.num_classes, 255 ignored
    view = SegTrainView(crop_size=56, scale=(56, 56), mean=train.info.mean, std=train.info.std)
    item = SeededViews(train, view)[(0, seed)]  # {"image": float (C, 56, 56), "mask": int64 (56, 56)}
    ```
    `SeededViews` hands a source's mask to the view with its image (a joint view) and keeps the view's
    dict as the item: no `"label"` key. A label-fraction subset is `mimkit.eval.subsets.label_subset(
    [0] * len(train), fraction, seed)` (seeded and nested; the masks carry no per-image class).
    Beyond the interface the model side codes against: `build_seg_source(..., channels=1|3)` converts the
    images (None follows the data, as image folders do), and `SegSource.info` is a
    `mimkit.data.sources.SourceInfo` (normalization statistics, common image side when there is one).

A *segmentation source* is a `SegSource`: a `torch.utils.data.Dataset` whose item is `(image, mask)`,
`image` a uint8 tensor `(C, H, W)`, `mask` a uint8 tensor `(H, W)` of class ids, every one either below
`num_classes` or `IGNORE_INDEX` (255). Pixels are read as stored: no EXIF rotation (masks are aligned with
the stored pixels). A mask may be a grey (`L`) PNG or a palette (`P`) PNG, whose indices are the labels
(Pascal VOC's colours are only a picture of them).

Layouts, recognised from a folder (or from its `ADEChallengeData2016` or `VOCdevkit/VOC2012` sub-folder):
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
      report a score the model has not earned); a folder of one pair uses it for both. Class names
      come from `classes.txt`, or `num_classes` names them `class_0` ... (`--set seg.num_classes=N`).
Any layout may hold a `classes.txt` at its root (one name per line, index = class id after
`reduce_zero_label`): it replaces the layout's own names and number of classes.

`fmnist-scenes`: 56x56 canvases holding 1 to 3 Fashion-MNIST items whose bounding boxes do not
overlap, each pixel labelled with its item's class + 1 where the item's intensity reaches
`SCENE_THRESHOLD`, 0 (background) elsewhere: 11 classes, background first. Train scenes are made
from the training images, val scenes from the test images, `SCENE_COUNTS` of each (10,000 and 2,000:
enough to separate encoders, small enough that the benchmark's runs fit about an hour on 2 CPU cores).
They are generated once, deterministically (scene i from a generator seeded by (split, i)), into an
ADE20K-layout folder with a `classes.txt` (`fmnist_scenes_folder`), and read back by the ADE20K reader,
so the folder reader is what runs. As in ADE20K the stored masks reserve 0 for "unlabeled" and store
class k as k + 1; `reduce_zero_label` brings background back to 0, so no scene pixel is ignored.

Bad input raises a one-line `MimkitError` naming the file: a mask whose size differs from its image,
a label at or above `num_classes` (other than 255), an image without a mask, an empty split, a folder of
no known layout. A few spread-out pairs are checked when a source is made (so a command fails at once)
and every pair is checked again when it is read.

- ADE20K: Zhou et al., Scene Parsing through ADE20K Dataset, CVPR 2017
- Pascal VOC: Everingham et al., The PASCAL Visual Object Classes Challenge, IJCV 2010
- Fashion-MNIST: Xiao et al., 2017, arXiv:1708.07747
"""

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from mimkit.data.sources import (
    _GRAY_MODES,
    _IDX_DATASETS,
    GRAY_MEAN,
    GRAY_STD,
    IMAGE_EXTENSIONS,
    SourceInfo,
    _check_channels,
    _locate_idx,
    _to_mode,
    mimkit_cache_dir,
    read_idx,
)
from mimkit.errors import MimkitError

IGNORE_INDEX = 255
SEG_SPLITS = ("train", "val")
GENERIC_VAL_FRACTION = 0.1
GENERIC_SPLIT_SEED = 0
PROBE_SAMPLES = 16

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


# ---------------------------------------------------------------------------------------------------------
# The source


def read_mask(path: str | Path) -> np.ndarray:
    """The stored labels of a mask file: `(H, W)` int64 (palette PNGs give their indices, not colours)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
            raise MimkitError(f"mask '{path}' is stored as {img.mode}; store masks as 8-bit label maps "
                              "(grey L or palette P PNGs), one class id per pixel")
        return np.asarray(img).astype(np.int64)


class SegSource(Dataset):
    """Image and mask files read as `(image, mask)` pairs, checked as they are read.

    Channels follow the data unless asked: grey when the first image is stored grey, else RGB; mean/std
    are ImageNet's for 3 channels and (0.5,)/(0.5,) for 1 unless given.

    Args:
        name: the dataset's name, for messages and `info`.
        images: image files.
        masks: the mask file of each image, same length.
        classes: class names, index = class id (after `reduce_zero_label`).
        reduce_zero_label: stored 0 becomes 255 (ignored) and every other stored value moves down by one.
        channels: 1 or 3 to convert every image; None to follow the data.
        mean, std: normalization statistics for `info`; None for the defaults above.

    Attributes:
        classes, num_classes, channels, ignore_index (255), reduce_zero_label, info (`SourceInfo`).

    Item:
        `(image uint8 (C, H, W), mask uint8 (H, W))`, mask values in `[0, num_classes)` or 255.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, images: list[Path], masks: list[Path], classes: list[str],
                 reduce_zero_label: bool, channels: int | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        _check_channels(channels)
        if not images:
            raise MimkitError(f"{name}: no image/mask pairs")
        if not 0 < len(classes) <= IGNORE_INDEX:
            raise MimkitError(f"{name}: {len(classes)} classes; a mask stores 1 to {IGNORE_INDEX} classes "
                              f"({IGNORE_INDEX} is the ignore index)")
        self.name = name
        self.images, self.masks = [str(p) for p in images], [str(p) for p in masks]
        self.classes, self.num_classes = list(classes), len(classes)
        self.reduce_zero_label = reduce_zero_label
        with Image.open(self.images[0]) as first:
            stored_grey = first.mode in _GRAY_MODES
        self.channels = channels or (1 if stored_grey else 3)
        self._mode = "L" if self.channels == 1 else "RGB"
        sizes = {tuple(self[i][1].shape) for i in _spread(len(self), PROBE_SAMPLES)}  # fail now, not mid-run
        (height, width), *others = sizes
        self.info = SourceInfo(
            name=name, channels=self.channels, image_size=width if not others and width == height else None,
            mean=mean or (GRAY_MEAN if self.channels == 1 else IMAGENET_DEFAULT_MEAN),
            std=std or (GRAY_STD if self.channels == 1 else IMAGENET_DEFAULT_STD),
            num_classes=self.num_classes, classes=self.classes,
        )

    def describe(self, index: int) -> str:
        """The files of item `index`, for messages."""
        return f"'{self.images[index]}' (mask '{self.masks[index]}')"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        try:
            with Image.open(self.images[index]) as img:
                image = pil_to_tensor(_to_mode(img, self._mode))
        except MimkitError:
            raise
        except Exception as e:  # PIL raises many types on bad files
            raise MimkitError(f"cannot read image '{self.images[index]}': {e}") from e
        try:
            labels = read_mask(self.masks[index])
        except MimkitError:
            raise
        except Exception as e:
            raise MimkitError(f"cannot read mask '{self.masks[index]}': {e}") from e
        if labels.shape != tuple(image.shape[1:]):
            raise MimkitError(f"mask '{self.masks[index]}' is {labels.shape[1]}x{labels.shape[0]} but its "
                              f"image '{self.images[index]}' is {image.shape[2]}x{image.shape[1]}; a mask "
                              "must have its image's size")
        if self.reduce_zero_label:
            labels = np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)
        bad = labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)]
        if bad.size:
            stored = int(bad.max()) + self.reduce_zero_label
            raise MimkitError(
                f"mask '{self.masks[index]}' holds label {stored}, but the dataset has {self.num_classes} "
                f"classes{' (stored from 1: 0 is ignored)' if self.reduce_zero_label else ''}; fix the mask, "
                f"or give the class count (classes.txt or seg.num_classes); {IGNORE_INDEX} means ignore"
            )
        return image, torch.from_numpy(labels.astype(np.uint8))


def _spread(n: int, samples: int) -> list[int]:
    """Up to `samples` indices spread evenly over `range(n)`, first and last included."""
    return sorted({round(k * (n - 1) / max(samples - 1, 1)) for k in range(samples)})


# ---------------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class _Layout:
    name: str
    root: Path
    classes: tuple[str, ...]  # the layout's own names; empty when the folder must name them
    reduce_zero_label: bool


def _read_classes(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise MimkitError(f"'{path}' lists no class names; write one name per line")
    return names


def _classes(layout: _Layout, num_classes: int | None) -> list[str]:
    """`classes.txt` if present, else the layout's names, else `class_0 ...`; `num_classes` must agree."""
    listed = layout.root / "classes.txt"
    if listed.is_file():
        names = _read_classes(listed)
        if num_classes is not None and num_classes != len(names):
            raise MimkitError(f"num_classes={num_classes} but '{listed}' lists {len(names)} classes; "
                              "drop one of them or make them agree")
        return names
    if num_classes is not None:
        if num_classes < 1:
            raise MimkitError(f"num_classes={num_classes} must be at least 1")
        return list(layout.classes) if num_classes == len(layout.classes) else [
            f"class_{k}" for k in range(num_classes)]
    if not layout.classes:
        raise MimkitError(f"'{layout.root}' does not name its classes: write '{listed}' (one name per line) "
                          "or give the count (--set seg.num_classes=N)")
    return list(layout.classes)


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


def _ade_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    sub = {"train": "training", "val": "validation"}[split]
    image_folder = root / "images" / sub
    if not image_folder.is_dir():
        raise MimkitError(f"ADE20K-layout folder '{root}' has no '{image_folder}' for the {split} split")
    images = list(_by_stem(image_folder).values())
    return images, _pair_by_stem(images, root / "annotations" / sub, image_folder)


def _voc_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
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
    return images, masks


def _generic_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    if (root / "images" / "train").is_dir():
        image_folder = root / "images" / split
        if not image_folder.is_dir():
            raise MimkitError(f"'{root}' has images/train but no '{image_folder}' for the {split} split")
        images = list(_by_stem(image_folder).values())
        return images, _pair_by_stem(images, root / "masks" / split, image_folder)
    images = list(_by_stem(root / "images").values())
    masks = _pair_by_stem(images, root / "masks", root / "images")
    if len(images) < 2:  # nothing to hold out: both splits are the one pair, which the probe still checks
        return images, masks
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(GENERIC_SPLIT_SEED)).tolist()
    held_out = set(order[: max(1, round(GENERIC_VAL_FRACTION * len(images)))])
    keep = [i for i in range(len(images)) if (i in held_out) == (split == "val")]
    return [images[i] for i in keep], [masks[i] for i in keep]


_READERS = {"ADE20K": _ade_pairs, "Pascal VOC": _voc_pairs, "generic": _generic_pairs}


def detect_layout(folder: Path) -> _Layout:
    """Which layout `folder` (or its `ADEChallengeData2016` / `VOCdevkit/VOC2012` sub-folder) is in."""
    for root in (folder, folder / "ADEChallengeData2016", folder / "VOCdevkit" / "VOC2012"):
        if (root / "images" / "training").is_dir() and (root / "annotations").is_dir():
            return _Layout("ADE20K", root, ADE20K_CLASSES, reduce_zero_label=True)
        if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
            return _Layout("Pascal VOC", root, VOC_CLASSES, reduce_zero_label=False)
        if (root / "images").is_dir() and (root / "masks").is_dir():
            return _Layout("generic", root, (), reduce_zero_label=False)
    raise MimkitError(
        f"'{folder}' is in no known segmentation layout: use ADE20K's (images/training + "
        "annotations/training), Pascal VOC's (JPEGImages + SegmentationClass + ImageSets/Segmentation), "
        "or images/ + masks/ matched by file stem"
    )


def folder_seg_source(folder: str | Path, split: str, num_classes: int | None = None,
                      channels: int | None = None) -> SegSource:
    """A `SegSource` for one split of a folder in any known layout (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MimkitError(f"segmentation data '{folder}' is not a folder (or use fmnist-scenes)")
    layout = detect_layout(folder)
    classes = _classes(layout, num_classes)
    images, masks = _READERS[layout.name](layout.root, split)
    if not images:
        raise MimkitError(f"the {split} split of {layout.name}-layout folder '{layout.root}' holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)})")
    return SegSource(folder.name, images, masks, classes, layout.reduce_zero_label, channels)


# ---------------------------------------------------------------------------------------------------------
# fmnist-scenes


SCENE_SIZE = 56
SCENE_MAX_ITEMS = 3
SCENE_THRESHOLD = 32  # of 255: an item's pixel at least this bright is labelled with its class
SCENE_COUNTS = {"train": 10_000, "val": 2_000}
SCENE_PLACEMENT_TRIES = 20
SCENES_VERSION = 1  # part of the cache folder's name: bump it when the generator changes
_SCENE_SPLIT_SEED = {"train": 0, "val": 1}
_ADE_SPLIT = {"train": "training", "val": "validation"}


def fmnist_scene_classes() -> list[str]:
    """`["background", "T-shirt/top", ..., "Ankle boot"]`: 11 names, background is class 0."""
    return ["background", *_IDX_DATASETS["fashion-mnist"].classes]


def make_scene(items: np.ndarray, labels: np.ndarray, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One fmnist scene, a pure function of `(seed, index)` and the item pool.

    1 to `SCENE_MAX_ITEMS` items are drawn from the pool and placed where their bounding boxes (of the
    pixels at least `SCENE_THRESHOLD` bright) overlap no earlier one; an item that finds no free place in
    `SCENE_PLACEMENT_TRIES` tries is left out, so a scene holds at least one.

    Args:
        items: the pool, uint8 `(N, 28, 28)`.
        labels: their classes, `(N,)` in [0, 10).
        seed: the split's seed.
        index: the scene's number.

    Returns:
        `(image, mask)`: uint8 `(SCENE_SIZE, SCENE_SIZE)` each; mask 0 = background, k + 1 = class k.
    """
    rng = np.random.default_rng([seed, index])
    image = np.zeros((SCENE_SIZE, SCENE_SIZE), np.uint8)
    mask = np.zeros((SCENE_SIZE, SCENE_SIZE), np.uint8)
    taken = np.zeros((SCENE_SIZE, SCENE_SIZE), bool)
    for _ in range(rng.integers(1, SCENE_MAX_ITEMS + 1)):
        pick = int(rng.integers(len(items)))
        on = items[pick] >= SCENE_THRESHOLD  # [28, 28]
        rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        if not rows.size:
            continue
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
        for _ in range(SCENE_PLACEMENT_TRIES):
            top, left = int(rng.integers(SCENE_SIZE - h + 1)), int(rng.integers(SCENE_SIZE - w + 1))
            place = (slice(top, top + h), slice(left, left + w))
            if not taken[place].any():
                taken[place] = True
                image[place] = items[pick][box]
                mask[place] = np.where(on[box], labels[pick] + 1, 0)
                break
    return image, mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove_abandoned(folder: Path) -> None:
    """Remove the temporary folders that generators killed midway left beside `folder`: each is named for its
    process (`.<name>-<pid>@<host>-XXXXXXXX`), and removed when that process is gone from this host."""
    host = socket.gethostname()
    for path in folder.parent.glob(f".{folder.name}-*@*"):
        pid, _, rest = path.name.removeprefix(f".{folder.name}-").partition("@")
        if rest.rpartition("-")[0] == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def write_fmnist_scenes(folder: Path, counts: dict[str, int], idx_root: str | Path | None = None) -> None:
    """Generate fmnist-scenes into `folder` (which must not exist), atomically, in ADE20K layout.

    The scenes are written to a temporary folder beside `folder` and renamed into place, so a folder that
    exists is complete; when another process renamed its own first, that one is kept. What a generator
    killed midway left there (`_remove_abandoned`) is removed first.

    Args:
        folder: the dataset folder to create.
        counts: scenes per split, e.g. `{"train": 10000, "val": 2000}`.
        idx_root: a folder searched first for the Fashion-MNIST IDX files (see `IdxSource`).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{os.getpid()}@{socket.gethostname()}-",
                                dir=folder.parent))
    try:
        (tmp / "classes.txt").write_text("\n".join(fmnist_scene_classes()) + "\n")
        for split, count in counts.items():
            images_path, labels_path = _locate_idx("fashion-mnist", split, idx_root)
            items, labels = read_idx(images_path).numpy(), read_idx(labels_path).numpy()
            image_dir, mask_dir = tmp / "images" / _ADE_SPLIT[split], tmp / "annotations" / _ADE_SPLIT[split]
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for i in tqdm(range(count), desc=f"fmnist-scenes {split}", unit="scene", leave=False,
                          dynamic_ncols=True):
                image, mask = make_scene(items, labels, _SCENE_SPLIT_SEED[split], i)
                Image.fromarray(image).save(image_dir / f"scene_{i:06d}.png")
                Image.fromarray(mask + 1).save(mask_dir / f"scene_{i:06d}.png")  # ADE's: 0 is "unlabeled"
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fmnist_scenes_folder(cache_root: str | Path | None = None, idx_root: str | Path | None = None,
                         counts: dict[str, int] | None = None) -> Path:
    """The fmnist-scenes folder, generated on first use.

    Args:
        cache_root: where the scenes are kept; None for mimkit's cache dir (`~/.cache/mimkit`).
        idx_root: a folder searched first for the Fashion-MNIST IDX files.
        counts: scenes per split; None for `SCENE_COUNTS`.

    Returns:
        `<cache_root>/fmnist-scenes-v<version>-<train>-<val>`, in ADE20K layout with a `classes.txt`.
    """
    counts = counts or SCENE_COUNTS
    base = Path(cache_root).expanduser() if cache_root else mimkit_cache_dir()
    folder = base / f"fmnist-scenes-v{SCENES_VERSION}-{counts['train']}-{counts['val']}"
    if not folder.is_dir():
        write_fmnist_scenes(folder, counts, idx_root)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Building


def build_seg_source(spec: str, split: str, *, root: str | Path | None = None, num_classes: int | None = None,
                     channels: int | None = None) -> SegSource:
    """Make a segmentation source from `"fmnist-scenes"` or a folder path.

    Args:
        spec: `"fmnist-scenes"`, or a folder in the ADE20K, Pascal VOC or generic layout.
        split: `"train"` or `"val"`.
        root: fmnist-scenes only: a folder searched first for the Fashion-MNIST IDX files, and where the
            scenes are cached (default: mimkit's cache dir).
        num_classes: the number of classes; required for a generic folder without `classes.txt`,
            otherwise it must agree with the data's.
        channels: 1 or 3 to convert the images; None to follow the data.

    Returns:
        A `SegSource` of `(image uint8 (C, H, W), mask uint8 (H, W))`.
    """
    if split not in SEG_SPLITS:
        raise MimkitError(f"segmentation split {split!r} is not one of {', '.join(SEG_SPLITS)}")
    if spec == "fmnist-scenes":
        folder = fmnist_scenes_folder(root, idx_root=root)
        source = folder_seg_source(folder, split, num_classes, channels)
        fmnist = _IDX_DATASETS["fashion-mnist"]  # the items' pixels, normalized as the encoders saw them
        source.info = replace(source.info, name="fmnist-scenes", mean=(fmnist.mean,) * source.channels,
                              std=(fmnist.std,) * source.channels)
        return source
    path = Path(spec).expanduser()
    if not path.exists():
        raise MimkitError(f"segmentation data '{spec}' does not exist (named datasets: fmnist-scenes)")
    return folder_seg_source(path, split, num_classes, channels)
