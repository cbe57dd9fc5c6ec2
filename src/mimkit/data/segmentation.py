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
    `mimkit.data.source_info.SourceInfo` (normalization statistics, common image side when there is one).

A *segmentation source* is a `SegSource`: a `torch.utils.data.Dataset` whose item is `(image, mask)`,
`image` a uint8 tensor `(C, H, W)`, `mask` a uint8 tensor `(H, W)` of class ids, every one either below
`num_classes` or `IGNORE_INDEX` (255). Images are decoded as pretraining decodes them
(`mimkit.data.decode.decode_image`: EXIF orientation applied, files above `MAX_IMAGE_PIXELS` refused
before decoding), so training, evaluation and `mimkit predict` see the same pixels. A mask may be a grey
(`L`) or palette (`P`) PNG, whose indices are the labels (Pascal VOC's colours are only a picture of them);
a JPEG mask is refused (its compression noise would become labels near every edge).

The folder layouts (ADE20K, Pascal VOC, images/ + masks/) and their class names are `mimkit.data.layouts`'.

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
a label at or above `num_classes` (other than 255), a mask stored in colour or as a JPEG, an image
without a mask, an empty split, a folder of no known layout. `SegSource.check_masks` checks masks without
decoding their images (`mimkit segment` checks every val mask and a sample of the train masks before
training), and every pair is checked again when it is read.

- ADE20K: Zhou et al., Scene Parsing through ADE20K Dataset, CVPR 2017
- Pascal VOC: Everingham et al., The PASCAL Visual Object Classes Challenge, IJCV 2010
- Fashion-MNIST: Xiao et al., 2017, arXiv:1708.07747
"""

import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from tqdm import tqdm

from mimkit.data.decode import GRAY_MODES, MAX_IMAGE_PIXELS, check_pixels, decode_image
from mimkit.data.idx import IDX_DATASETS, locate_idx, mimkit_cache_dir, read_idx
from mimkit.data.layouts import SEG_SPLITS, class_names, detect_layout
from mimkit.data.source_info import GRAY_MEAN, GRAY_STD, SourceInfo, check_channels
from mimkit.errors import MimkitError

IGNORE_INDEX = 255
PROBE_SAMPLES = 16  # pairs decoded when a source is made
MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


# ---------------------------------------------------------------------------------------------------------
# The source


def read_mask(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The stored labels of a mask file: `(H, W)` int64 (palette PNGs give their indices, not colours); a
    mask above ``max_pixels`` is refused before it is decoded (ValueError), as its image is."""
    with Image.open(path) as img:
        check_pixels(img, max_pixels)
        if img.format == "JPEG":
            raise MimkitError(f"mask '{path}' is a JPEG: its compression changes labels near every edge; "
                              "store masks losslessly (PNG label maps)")
        if img.mode not in MASK_MODES:
            raise MimkitError(f"mask '{path}' is stored as {img.mode}; store masks as 8-bit label maps "
                              "(grey L or palette P PNGs), one class id per pixel")
        return np.asarray(img).astype(np.int64)


@dataclass(frozen=True)
class MaskCheck:
    """What `SegSource.check_masks` read: the class ids found (255 left out) and each image's `(width,
    height)`, in the order checked."""

    labels: set[int]
    sizes: list[tuple[int, int]]


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
        max_image_pixels: an image with more pixels is refused before it is decoded.

    Attributes:
        classes, num_classes, channels, ignore_index (255), reduce_zero_label, info (`SourceInfo`).

    Item:
        `(image uint8 (C, H, W), mask uint8 (H, W))`, mask values in `[0, num_classes)` or 255.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, images: list[Path], masks: list[Path], classes: list[str],
                 reduce_zero_label: bool, channels: int | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        check_channels(channels)
        if not images:
            raise MimkitError(f"{name}: no image/mask pairs")
        if not 0 < len(classes) <= IGNORE_INDEX:
            raise MimkitError(f"{name}: {len(classes)} classes; a mask stores 1 to {IGNORE_INDEX} classes "
                              f"({IGNORE_INDEX} is the ignore index)")
        self.name = name
        self.images, self.masks = [str(p) for p in images], [str(p) for p in masks]
        self.classes, self.num_classes = list(classes), len(classes)
        self.reduce_zero_label = reduce_zero_label
        self.max_image_pixels = max_image_pixels
        with Image.open(self.images[0]) as first:
            stored_grey = first.mode in GRAY_MODES
        self.channels = channels or (1 if stored_grey else 3)
        self._mode = "L" if self.channels == 1 else "RGB"
        sizes = {tuple(self[i][1].shape) for i in spread(len(self), PROBE_SAMPLES)}  # fail now, not mid-run
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

    def _labels(self, index: int, image_size: tuple[int, int]) -> np.ndarray:
        """The checked class ids of mask `index`, whose image is `image_size` = (width, height)."""
        try:
            labels = read_mask(self.masks[index], self.max_image_pixels)
        except MimkitError:
            raise
        except Exception as e:  # PIL raises many types on bad files
            raise MimkitError(f"cannot read mask '{self.masks[index]}': {e}") from e
        if labels.shape[::-1] != tuple(image_size):
            raise MimkitError(f"mask '{self.masks[index]}' is {labels.shape[1]}x{labels.shape[0]} but its "
                              f"image '{self.images[index]}' is {image_size[0]}x{image_size[1]}; a mask "
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
        return labels

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index` as decoded (EXIF orientation applied), from its header."""
        try:
            with Image.open(self.images[index]) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)  # 5-8: turned by 90 degrees
        except Exception as e:  # PIL raises many types on bad files
            raise MimkitError(f"cannot read image '{self.images[index]}': {e}") from e
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    def check_masks(self, indices: Sequence[int], desc: str = "checking masks") -> MaskCheck:
        """Check the masks of `indices` against their images' headers (size, mode, labels) without decoding
        any image; raises the first problem as a one-line error naming the file.

        Returns:
            The class ids found in them and the images' sizes, read on the way (`MaskCheck`).
        """
        found: set[int] = set()
        sizes = []
        for index in tqdm(indices, desc=desc, unit="mask", delay=2.0, leave=False, dynamic_ncols=True):
            sizes.append(self.image_size(index))
            found.update(np.unique(self._labels(index, sizes[-1])).tolist())
        found.discard(IGNORE_INDEX)
        return MaskCheck(found, sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        try:
            image = decode_image(self.images[index], self._mode, self.max_image_pixels)
        except Exception as e:  # PIL raises many types on bad files; ValueError: too many pixels
            raise MimkitError(f"cannot read image '{self.images[index]}': {e}") from e
        labels = self._labels(index, (image.shape[2], image.shape[1]))
        return image, torch.from_numpy(labels.astype(np.uint8))


def spread(n: int, samples: int) -> list[int]:
    """Up to `samples` indices spread evenly over `range(n)`, first and last included."""
    return sorted({round(k * (n - 1) / max(samples - 1, 1)) for k in range(samples)})


def folder_seg_source(folder: str | Path, split: str, num_classes: int | None = None,
                      channels: int | None = None, class_list: list[str] | None = None,
                      max_image_pixels: int | None = None) -> SegSource:
    """A `SegSource` for one split of a folder in any known layout (`mimkit.data.layouts`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MimkitError(f"segmentation data '{folder}' is not a folder (or use fmnist-scenes)")
    layout = detect_layout(folder)
    classes = class_names(layout, num_classes, class_list)
    files = layout.split(split)
    return SegSource(folder.name, files.images, files.masks, classes, layout.reduce_zero_label, channels,
                     max_image_pixels=max_image_pixels or MAX_IMAGE_PIXELS)


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
    return ["background", *IDX_DATASETS["fashion-mnist"].classes]


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
            images_path, labels_path = locate_idx("fashion-mnist", split, idx_root)
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
                     channels: int | None = None, class_list: list[str] | None = None,
                     max_image_pixels: int | None = None) -> SegSource:
    """Make a segmentation source from `"fmnist-scenes"` or a folder path.

    Args:
        spec: `"fmnist-scenes"`, or a folder in the ADE20K, Pascal VOC or generic layout.
        split: `"train"` or `"val"`.
        root: fmnist-scenes only: a folder searched first for the Fashion-MNIST IDX files, and where the
            scenes are cached (default: mimkit's cache dir).
        num_classes: the number of classes; required for a generic folder without `classes.txt`,
            otherwise it must agree with the data's.
        channels: 1 or 3 to convert the images; None to follow the data.
        class_list: class names (``seg.class_names``); they replace the folder's own (`classes.txt`, the
            layout's).
        max_image_pixels: an image with more pixels is refused before it is decoded
            (``data.max_image_pixels``; None: `MAX_IMAGE_PIXELS`).

    Returns:
        A `SegSource` of `(image uint8 (C, H, W), mask uint8 (H, W))`.
    """
    if split not in SEG_SPLITS:
        raise MimkitError(f"segmentation split {split!r} is not one of {', '.join(SEG_SPLITS)}")
    if spec == "fmnist-scenes":
        folder = fmnist_scenes_folder(root, idx_root=root)
        source = folder_seg_source(folder, split, num_classes, channels, class_list, max_image_pixels)
        fmnist = IDX_DATASETS["fashion-mnist"]  # the items' pixels, normalized as the encoders saw them
        source.info = replace(source.info, name="fmnist-scenes", mean=(fmnist.mean,) * source.channels,
                              std=(fmnist.std,) * source.channels)
        return source
    path = Path(spec).expanduser()
    if not path.exists():
        raise MimkitError(f"segmentation data '{spec}' does not exist (named datasets: fmnist-scenes)")
    return folder_seg_source(path, split, num_classes, channels, class_list, max_image_pixels)
