"""Image sources: the datasets every method reads, as uint8 tensors.

A *source* is a `torch.utils.data.Dataset` whose item is `(image, label)`: `image` a uint8 tensor
`(C, H, W)`, `label` an int (-1 when unlabeled). Each source carries `.info` (a `SourceInfo`) and
`.labels` (one int per item, read without decoding any image, so splits and kNN evaluation are cheap).
Augmentation is not done here: a method's *view* (see `mimkit.data.transforms`) turns the uint8
image into model inputs.

Sources:
    - `IdxSource`: Fashion-MNIST / MNIST from IDX files, held in memory.
    - `ImageFolderSource`: one sub-folder per class (labeled).
    - `FlatFolderSource`: every image under a folder, recursively (unlabeled).
    - tar shards (`mimkit.data.shards`) and Hugging Face datasets (`mimkit.data.hf`): the same
      decoding and bad-image handling as folders, reading each image's bytes from a shard or a row.
    - `ListedFolderSource`: the files a run listed when it started (`mimkit.data.filelist`), for resuming.
    - `SyntheticSource`: generated images with class-dependent structure, for tests.

`build_source(spec, split)` picks one from a name or a path.

- Fashion-MNIST: Xiao et al., 2017, arXiv:1708.07747
- MNIST: LeCun et al., 1998, "Gradient-based learning applied to document recognition"
"""

import contextlib
import gzip
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from mimkit.data.hf import open_hf_images
from mimkit.data.image_files import IMAGE_EXTENSIONS
from mimkit.data.layouts import Layout, find_layout
from mimkit.data.shards import ShardMembers, ShardReader, member_labels, shard_files
from mimkit.errors import MimkitError

SPLITS = ("train", "val", "test")
# Folder images carry no statistics of their own: ImageNet's for colour (timm's IMAGENET_DEFAULT_*), a
# symmetric [-1, 1] map for grey.
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
DEBIAN_DATASETS = Path("/usr/share/datasets")
# PIL modes stored as one grey channel; the 16/32-bit ones are rescaled to 8 bits, not clipped.
_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# Above this many pixels a file is refused before it is decoded: 8192 x 8192 is already ~200 MB as RGB, and
# the decoder, the tensor and the view each hold a copy.
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class SourceInfo:
    """What a model needs to know about a source.

    Attributes:
        name: short name (`"fashion-mnist"`, a folder's name, `"synthetic"`).
        channels: C of every image (1 or 3).
        image_size: native side in pixels, or None when the images differ in size (folders).
        mean: per-channel mean of pixel values scaled to [0, 1], length C.
        std: per-channel std of pixel values scaled to [0, 1], length C.
        num_classes: number of classes, 0 when unlabeled.
        classes: class names, index = label; empty when unlabeled.
        channels_note: how the channels were decided, when the data decided them (folders).
        layout_note: which files of a segmentation folder were taken (pretraining reads one split's
            images and none of its masks).
    """

    name: str
    channels: int
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    classes: list[str]
    channels_note: str = ""
    layout_note: str = ""


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise MimkitError(f"channels={channels!r} is not supported; use 1, 3 or leave it unset")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise MimkitError(f"split {split!r} is not one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST, MNIST)


@dataclass(frozen=True)
class _IdxDataset:
    mean: float
    std: float
    classes: tuple[str, ...]
    torchvision_name: str  # class in torchvision.datasets, also its download sub-folder
    debian_package: str | None


_IDX_DATASETS = {
    "fashion-mnist": _IdxDataset(
        0.2860, 0.3530,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"),
        "FashionMNIST", "dataset-fashion-mnist",
    ),
    # Debian ships no MNIST package (`apt-cache search mnist` lists only dataset-fashion-mnist).
    "mnist": _IdxDataset(0.1307, 0.3081, tuple(str(d) for d in range(10)), "MNIST", None),
}
_IDX_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw), as in the MNIST distribution.

    Args:
        path: the file; compression is recognised by content, not by name.

    Returns:
        uint8 tensor with the file's shape, e.g. `(N, 28, 28)` for images, `(N,)` for labels.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    # header: two zero bytes, a type code (0x08 = unsigned byte), the number of dims, then big-endian dims
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise MimkitError(f"'{path}' is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, ">u4", count=ndim, offset=4).tolist())
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise MimkitError(f"IDX file '{path}' holds {data.size} bytes, its header says {shape}")
    return torch.from_numpy(data.reshape(shape).copy())  # copy: the buffer is read-only


def _idx_file(folder: Path, stem: str) -> Path | None:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX[split]
    images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def mimkit_cache_dir() -> Path:
    """Where downloads go: `$XDG_CACHE_HOME/mimkit`, by default `~/.cache/mimkit`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimkit"


def _download_idx(name: str) -> Path:
    """Fetch a dataset with torchvision's downloader; returns the folder holding its IDX files."""
    from torchvision import datasets

    dataset_class = getattr(datasets, _IDX_DATASETS[name].torchvision_name)
    return Path(dataset_class(str(mimkit_cache_dir()), download=True).raw_folder)


def _locate_idx(name: str, split: str, root: str | Path | None) -> tuple[Path, Path]:
    """Find (images, labels) files: root, $MIMKIT_DATA, the Debian package, then a download."""
    spec = _IDX_DATASETS[name]
    folders = []
    for base in (root, os.environ.get("MIMKIT_DATA")):
        if base:
            folders += [Path(base).expanduser() / name, Path(base).expanduser()]
    if spec.debian_package:
        folders.append(DEBIAN_DATASETS / name)
    folders.append(mimkit_cache_dir() / spec.torchvision_name / "raw")
    for folder in folders:
        if found := _idx_pair(folder, split):
            return found
    try:
        downloaded = _download_idx(name)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fixes = f"`apt-get install {spec.debian_package}`, or " if spec.debian_package else ""
        raise MimkitError(
            f"{name} ({split}) not found in {', '.join(str(f) for f in folders)} and the download failed "
            f"({reason}); fix: {fixes}set MIMKIT_DATA to a folder holding "
            f"{_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] and {_IDX_PREFIX[split]}-labels-idx1-ubyte[.gz]"
        ) from e
    found = _idx_pair(downloaded, split)
    if found is None:
        raise MimkitError(f"the {name} download in '{downloaded}' lacks the {split} IDX files")
    return found


class IdxSource(Dataset):
    """Fashion-MNIST or MNIST, read from IDX files into memory once (uint8, about 55 MB for train).

    The files are looked up, in order, in `root` (or `root/<name>`), `$MIMKIT_DATA` (or
    `$MIMKIT_DATA/<name>`), `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`),
    `~/.cache/mimkit/<FashionMNIST|MNIST>/raw`, and finally downloaded there by torchvision.

    Both datasets have only a train (60,000) and a test (10,000) split; `"val"` reads the test split,
    the usual held-out set for them.

    Args:
        name: `"fashion-mnist"` or `"mnist"`.
        split: `"train"`, `"val"` or `"test"`.
        root: a folder holding the IDX files, searched first.
        channels: 1 (native) or 3 (grey repeated, for colour models); None means 1.

    Item:
        `(image uint8 (C, 28, 28), label int in [0, 10))`.
    """

    def __init__(self, name: str, split: str = "train", root: str | Path | None = None,
                 channels: int | None = None):
        if name not in _IDX_DATASETS:
            raise MimkitError(f"unknown IDX dataset {name!r}; use one of {', '.join(_IDX_DATASETS)}")
        _check_split(split)
        _check_channels(channels)
        spec = _IDX_DATASETS[name]
        images_path, labels_path = _locate_idx(name, split, root)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise MimkitError(
                f"'{images_path}' {tuple(images.shape)} and '{labels_path}' {tuple(labels.shape)} do not "
                "pair up as (N, H, W) images and (N,) labels"
            )
        self.images = images.unsqueeze(1)  # [N, 1, H, W]
        self.labels = labels.long()
        self.channels = channels or 1
        self.info = SourceInfo(
            name=name, channels=self.channels, image_size=images.shape[-1],
            mean=(spec.mean,) * self.channels, std=(spec.std,) * self.channels,
            num_classes=len(spec.classes), classes=list(spec.classes),
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].repeat(self.channels, 1, 1), int(self.labels[index])


# ---------------------------------------------------------------------------------------------------------
# Image folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_images(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """`(directory, image file names)` for every directory under `folder`, hidden entries skipped.

    Symlinked directories are followed, but each real directory (device and inode) is read once, under the
    first path met in sorted order: a link back up the tree (a loop) or a second way into a folder already
    listed is skipped, and named in one warning at the end.
    """
    seen = {_directory_id(folder)}
    skipped = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not _is_hidden(d)):
            identity = _directory_id(Path(dirpath, name))
            if identity in seen:
                skipped.append(os.path.join(dirpath, name))
            else:
                seen.add(identity)
                kept.append(name)
        dirnames[:] = kept  # os.walk descends into these only
        yield dirpath, [f for f in filenames if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    if skipped:
        warnings.warn(f"listing '{folder}': skipped {len(skipped)} symlinked folder(s) leading to a folder "
                      f"already listed (a loop, or a second way in): {', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}", stacklevel=2)


def _directory_id(path: Path) -> tuple[int, int]:
    stat = os.stat(path)  # follows the link: the directory it leads to
    return stat.st_dev, stat.st_ino


def _listing_bar(folder: Path) -> tqdm:
    """A progress bar (on stderr) that shows once listing `folder` takes more than two seconds, as it does
    for folders of 100k+ files."""
    return tqdm(desc=f"listing {folder}", unit=" images", delay=2.0)


def _image_files(folder: Path, bar: tqdm | None = None) -> list[Path]:
    """Every image under `folder`, recursively, hidden entries skipped, sorted by path; counted on `bar`
    (a listing bar of its own when None)."""
    found = []
    with contextlib.nullcontext(bar) if bar is not None else _listing_bar(folder) as counter:
        for dirpath, names in _walk_images(folder):
            found += [Path(dirpath, f) for f in names]
            counter.update(len(names))
    return sorted(found)


def count_images(spec: str, stop_after: int) -> int:
    """Images in a data folder's train split (`spec/train` when it has one), counting stopped early.

    Args:
        spec: a folder path.
        stop_after: stop once more than this many are found (a cheap "is it large?" on huge folders).

    Returns:
        The count, or a number above `stop_after` when the folder holds more.
    """
    folder = Path(spec).expanduser()
    if (layout := find_layout(folder)) is not None:
        return len(layout.split("train").images)
    count = 0
    for _, names in _walk_images(folder / "train" if (folder / "train").is_dir() else folder):
        count += len(names)
        if count > stop_after:
            break
    return count


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _is_image_name(name: str) -> bool:
    return not any(_is_hidden(part) for part in name.split("/")) and name.lower().endswith(IMAGE_EXTENSIONS)


def _has_top_level_images(folder: Path) -> bool:
    return any(p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) for p in folder.iterdir())


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in _WIDE_GRAY_MODES:  # 16-bit grey: keep the top 8 bits (PIL's convert would clip)
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return img.convert(mode)


def decode_image(file: str | Path | BinaryIO, mode: str, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int | None = None) -> torch.Tensor:
    """Decode one encoded image (a path or a binary file object) to uint8 `(C, H, W)` in `mode`.

    EXIF orientation is applied. An image above `max_pixels` is refused before decoding (ValueError); with
    `min_side`, a large image is decoded at a reduced size whose shorter side stays at least that (JPEG's
    DCT scaling through PIL's ``draft``, else ``reduce``). Raises whatever PIL raises on a bad file.
    """
    with Image.open(file) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(f"{width}x{height} pixels is above data.max_image_pixels={max_pixels}; "
                             "shrink the file or raise that limit")
        if min_side and (factor := min(img.size) // min_side) > 1:
            img.draft(None, (width // factor, height // factor))  # JPEG: decode at 1/2, 1/4 or 1/8
        if min_side and (factor := min(img.size) // min_side) > 1:  # before exif_transpose, which copies
            img = img.reduce(factor)
        return pil_to_tensor(_to_mode(ImageOps.exif_transpose(img), mode))


class _FolderSource(Dataset):
    """Encoded images decoded with PIL: files, tar shard members or dataset rows; the shared body of the
    folder, shard and Hugging Face sources.

    Channels follow the data unless asked: RGB unless every one of up to 32 files sampled across the
    folder is stored grey ("L"). A file above `max_image_pixels` is unreadable (never decoded); with
    `decode_min_side`, a large file is decoded at a reduced size whose shorter side stays at least that
    (JPEG's DCT scaling through PIL's ``draft``, else ``reduce``), so memory follows what the view needs.
    With `skip_bad_images`, an unreadable file is warned about and replaced by the next readable one
    (the same replacement in every process and epoch); more than `max_bad_images` distinct unreadable
    images raise. The count is per process: each DataLoader worker keeps its own, so across workers up
    to `num_workers * max_bad_images` images may be skipped before one gives up.

    Args:
        root: the folder (or dataset) the images come from, for messages and the source's name.
        paths: one name per image, for messages: a file path, or `shard.tar:member` for a shard.
        reader: `reader(i) -> binary file object` of image i; None reads the file `paths[i]`.
    """

    def __init__(self, root: str, paths: Sequence[Path | str], labels: Sequence[int], classes: list[str],
                 channels: int | None, skip_bad_images: bool, max_bad_images: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, decode_min_side: int | None = None,
                 reader: Callable[[int], BinaryIO] | None = None):
        _check_channels(channels)
        if not paths:
            raise MimkitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
        self.root = root
        self.paths = [str(p) for p in paths]
        self.reader = reader
        self.labels = list(labels)
        self.skip_bad_images = skip_bad_images
        self.max_bad_images = max_bad_images
        self.max_image_pixels, self.decode_min_side = max_image_pixels, decode_min_side
        self.bad_indices: set[int] = set()  # unreadable files met in this process
        mode, image_size, note = self._probe()
        self._mode = {1: "L", 3: "RGB", None: mode}[channels]
        nc = 1 if self._mode == "L" else 3
        self.info = SourceInfo(
            name=Path(root).name, channels=nc, image_size=image_size,
            mean=GRAY_MEAN if nc == 1 else IMAGENET_DEFAULT_MEAN,
            std=GRAY_STD if nc == 1 else IMAGENET_DEFAULT_STD,
            num_classes=len(classes), classes=list(classes),
            channels_note=note if channels is None else f"{self._mode}: data.channels={channels}",
        )

    @property
    def num_bad_images(self) -> int:
        """Unreadable files skipped so far in this process."""
        return len(self.bad_indices)

    def _probe(self, samples: int = 32) -> tuple[str, int | None, str]:
        """Mode (grey only when every sampled file is grey), the common square side of a few spread-out
        files, and a note saying how the mode was decided."""
        picks = sorted({round(k * (len(self) - 1) / max(samples - 1, 1)) for k in range(samples)})
        gray, sizes = [], set()
        for i in picks:
            try:
                with Image.open(self.image_file(i)) as img:
                    gray.append(img.mode in _GRAY_MODES)
                    sizes.add(img.size)
            except Exception as e:  # PIL raises many types on bad files
                self._skip(i, e)
        if not gray:
            raise MimkitError(f"none of the sampled images under '{self.root}' could be read")
        (width, height), *others = sizes
        colour = len(gray) - sum(gray)
        note = (f"RGB: {colour} of {len(gray)} sampled files are in colour" if colour else
                f"L: all {len(gray)} sampled files are grey")
        return "RGB" if colour else "L", width if not others and width == height else None, note

    def _skip(self, index: int, error: Exception) -> None:
        path = self.paths[index]
        if not self.skip_bad_images:
            raise MimkitError(f"cannot read image '{path}': {error}") from error
        self.bad_indices.add(index)
        if self.num_bad_images > self.max_bad_images:
            raise MimkitError(
                f"more than max_bad_images={self.max_bad_images} unreadable images (latest '{path}'); "
                "remove or fix them, or raise max_bad_images"
            ) from error
        warnings.warn(f"skipping unreadable image '{path}' ({error}); "
                      f"{self.num_bad_images} skipped in this process", stacklevel=3)

    def image_file(self, index: int) -> str | BinaryIO:
        """Image `index` encoded: its file's path, or a binary file object (a shard member, a dataset row)."""
        return self.paths[index] if self.reader is None else self.reader(index)

    def load(self, index: int) -> torch.Tensor:
        """Decode one image to uint8 `(C, H, W)`; raises whatever PIL raises (ValueError: too many pixels)."""
        return decode_image(self.image_file(index), self._mode, self.max_image_pixels, self.decode_min_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            i = (index + offset) % len(self)  # a bad file's stand-in: the next readable one
            if i in self.bad_indices:
                continue
            try:
                return self.load(i), self.labels[i]
            except Exception as e:  # PIL raises many types on bad files
                self._skip(i, e)
        raise MimkitError(f"no readable image among the {len(self)} under '{self.root}'")


class ImageFolderSource(_FolderSource):
    """A labeled folder: one sub-folder per class, images anywhere below it (recursively).

    Classes are the sorted sub-folder names, label = index. Channels follow a sample of the files
    (see `_FolderSource`) unless `channels` is given; mean/std are ImageNet's for 3 channels and
    (0.5,)/(0.5,) for 1.

    Args:
        root: the folder holding the class sub-folders.
        channels: 1 or 3 to convert every image; None to follow the data.
        classes: the class list to use (e.g. the train split's, so a val split missing a class keeps
            the same labels); every sub-folder must be in it.
        skip_bad_images: replace unreadable files instead of raising (see `_FolderSource`).
        max_bad_images: give up after more than this many unreadable files.
        max_image_pixels: a file with more pixels is unreadable (refused before decoding).
        decode_min_side: decode large files at a reduced size whose shorter side stays at least this.

    Item:
        `(image uint8 (C, H, W), label int)`.
    """

    def __init__(self, root: str | Path, channels: int | None = None, classes: Sequence[str] | None = None,
                 skip_bad_images: bool = False, max_bad_images: int = 100,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, decode_min_side: int | None = None):
        root = Path(root)
        found = _subfolders(root)
        classes = list(classes) if classes is not None else found
        if unknown := sorted(set(found) - set(classes)):
            raise MimkitError(f"class folders {unknown} under '{root}' are not among the classes {classes}")
        paths, labels = [], []
        with _listing_bar(root) as bar:  # one bar over all classes: each alone may be quick
            for label, name in enumerate(classes):
                files = _image_files(root / name, bar) if (root / name).is_dir() else []
                paths += files
                labels += [label] * len(files)
        super().__init__(str(root), paths, labels, classes, channels, skip_bad_images, max_bad_images,
                         max_image_pixels, decode_min_side)


class FlatFolderSource(_FolderSource):
    """An unlabeled folder: every image below it, recursively, in sorted path order; label -1.

    Extensions: jpg, jpeg, png, webp, bmp, tif, tiff (any case); hidden files and folders are skipped.
    Channels and mean/std as in `ImageFolderSource`.

    Item:
        `(image uint8 (C, H, W), -1)`.
    """

    def __init__(self, root: str | Path, channels: int | None = None, skip_bad_images: bool = False,
                 max_bad_images: int = 100, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 decode_min_side: int | None = None):
        paths = _image_files(Path(root))
        super().__init__(str(root), paths, [-1] * len(paths), [], channels, skip_bad_images, max_bad_images,
                         max_image_pixels, decode_min_side)


class ListedFolderSource(_FolderSource):
    """A folder's images exactly as a run listed them when it started (see `mimkit.data.filelist`), so a
    resumed run reads the same files in the same order however the folder changed since.

    Args:
        root: the folder the paths are relative to.
        name: the source's name (`SourceInfo.name`).
        files: `(label, path relative to root)` per image, in the order listed.
        classes: class names, index = label; empty when unlabeled.
        channels, skip_bad_images, max_bad_images, max_image_pixels, decode_min_side: as in
            `ImageFolderSource`.

    Item:
        `(image uint8 (C, H, W), label int)`.
    """

    def __init__(self, root: str | Path, name: str, files: Sequence[tuple[int, str]], classes: Sequence[str],
                 channels: int | None = None, skip_bad_images: bool = False, max_bad_images: int = 100,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, decode_min_side: int | None = None):
        paths = [os.path.join(root, path) for _, path in files]
        super().__init__(str(root), paths, [label for label, _ in files], list(classes), channels,
                         skip_bad_images, max_bad_images, max_image_pixels, decode_min_side)
        self.info = replace(self.info, name=name)


# ---------------------------------------------------------------------------------------------------------
# Synthetic


class SyntheticSource(Dataset):
    """Deterministic generated images that a classifier can learn, for tests and smoke runs.

    Image i is a sinusoidal grating plus noise, drawn from a generator seeded by `(seed, i)`, so any
    item can be made alone, in any process. Its class (`i % num_classes`) sets the grating's
    orientation (spread over 0-90 degrees, so a horizontal flip keeps classes apart) and its mean
    brightness; frequency, phase, contrast and noise are random.

    Args:
        n: number of images.
        channels: 1 or 3 (channels differ in contrast).
        image_size: side in pixels.
        num_classes: at least 1.
        seed: different seeds give different images (use one per split).

    Item:
        `(image uint8 (channels, image_size, image_size), label int in [0, num_classes))`.
    """

    def __init__(self, n: int = 256, channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 seed: int = 0):
        _check_channels(channels)
        if n < 1 or num_classes < 1 or image_size < 1:
            raise MimkitError(f"synthetic source needs n, num_classes, image_size >= 1, got "
                              f"{n}, {num_classes}, {image_size}")
        self.n, self.channels, self.image_size, self.num_classes, self.seed = (
            n, channels, image_size, num_classes, seed)
        self.labels = [i % num_classes for i in range(n)]
        self.info = SourceInfo(
            name="synthetic", channels=channels, image_size=image_size, mean=(0.5,) * channels,
            std=(0.2,) * channels, num_classes=num_classes,
            classes=[f"class_{k}" for k in range(num_classes)],
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = self.labels[index]
        rand = lambda *shape: torch.rand(shape, generator=g)
        angle = (math.pi / 2) * (label + 0.25 + 0.5 * rand(1)) / self.num_classes
        cycles = 2.0 + 3.0 * rand(1)  # periods across the image
        coords = torch.arange(self.image_size, dtype=torch.float32) / self.image_size
        y, x = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
        along = x * torch.cos(angle) + y * torch.sin(angle)  # [S, S] position across the stripes
        wave = torch.sin(2 * math.pi * (cycles * along + rand(1)))
        brightness = 0.35 + 0.3 * label / max(self.num_classes - 1, 1)
        contrast = 0.15 + 0.15 * rand(self.channels, 1, 1)
        noise = 0.05 * torch.randn((self.channels, self.image_size, self.image_size), generator=g)
        img = brightness + contrast * wave + noise  # [C, S, S] in about [0, 1]
        return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8), label  # +0.5 then truncate: rounding


# ---------------------------------------------------------------------------------------------------------
# Building and splitting


def _parse_synthetic(spec: str) -> int:
    count = spec.partition(":")[2] or "256"
    if not count.isdigit() or int(count) < 1:
        raise MimkitError(f"data spec {spec!r}: the count after 'synthetic:' must be a positive integer")
    return int(count)


def _shard_source(folder: Path, channels: int | None, classes: Sequence[str] | None, skip: bool,
                  max_bad: int, max_pixels: int, min_side: int | None) -> _FolderSource:
    members = ShardMembers.from_folder(folder, _is_image_name)
    labels, classes = member_labels(members.names, classes)
    names = [members.describe(i) for i in range(len(members))]
    return _FolderSource(str(folder), names, labels, classes, channels, skip, max_bad, max_pixels, min_side,
                         ShardReader(members))


def listed_shard_source(root: str | Path, name: str, members: Sequence[tuple[int, str]],
                        classes: Sequence[str], channels: int | None = None, skip_bad_images: bool = False,
                        max_bad_images: int = 100, max_image_pixels: int = MAX_IMAGE_PIXELS,
                        decode_min_side: int | None = None) -> Dataset:
    """The shard members a run listed when it started (see `mimkit.data.filelist`), in that order, so a
    resumed run reads the same images however the shards changed since.

    Args:
        root: the shards' folder.
        name: the source's name (`SourceInfo.name`).
        members: `(label, "shard.tar:member/name")` per image (`ShardMembers.key`), in the order listed.
        classes, channels, skip_bad_images, max_bad_images, max_image_pixels, decode_min_side: as in
            `ListedFolderSource`.

    Raises:
        MimkitError: naming the shards of the members that are gone (a shard deleted, cut short or
            rewritten).
    """
    found = ShardMembers.from_folder(root, _is_image_name)
    position = {found.key(i): i for i in range(len(found))}
    missing = Counter(key.partition(":")[0] for _, key in members if key not in position)
    if missing:
        gone = ", ".join(f"{shard}: {count}" for shard, count in sorted(missing.items())[:5])
        raise MimkitError(
            f"the shards in '{root}' lack {missing.total()} of the {len(members)} images this run started "
            f"with ({gone}{', ...' if len(missing) > 5 else ''}); a resumed run reads the images it started "
            "with: restore those shards, or go on with the shards as they are now: --rescan")
    picked = found.select([position[key] for _, key in members])
    names = [picked.describe(i) for i in range(len(picked))]
    source = _FolderSource(str(root), names, [label for label, _ in members], list(classes), channels,
                           skip_bad_images, max_bad_images, max_image_pixels, decode_min_side,
                           ShardReader(picked))
    source.info = replace(source.info, name=name)
    return source


def _hf_source(spec: str, split: str, channels: int | None, skip: bool, max_bad: int, max_pixels: int,
               min_side: int | None) -> _FolderSource:
    path, _, dataset_split = spec.removeprefix("hf:").rpartition(":")
    if not path or "/" in dataset_split:  # no split named: the colon was part of the path, or absent
        path, dataset_split = spec.removeprefix("hf:"), ""
    rows = open_hf_images(path, split, dataset_split or None)
    return _FolderSource(rows.root, rows.names, rows.labels, rows.classes, channels, skip, max_bad,
                         max_pixels, min_side, rows.reader)


def _folder_source(folder: Path, channels: int | None, classes: Sequence[str] | None, skip: bool,
                   max_bad: int, max_pixels: int, min_side: int | None) -> Dataset:
    if not _has_top_level_images(folder) and shard_files(folder):
        return _shard_source(folder, channels, classes, skip, max_bad, max_pixels, min_side)
    if not _has_top_level_images(folder) and _subfolders(folder):
        return ImageFolderSource(folder, channels, classes, skip, max_bad, max_pixels, min_side)
    return FlatFolderSource(folder, channels, skip, max_bad, max_pixels, min_side)


def _layout_source(layout: Layout, split: str, name: str, channels: int | None, skip: bool, max_bad: int,
                   max_pixels: int, min_side: int | None) -> ListedFolderSource:
    """The images of one split of a segmentation folder, without their masks (a test split is its val)."""
    files = layout.split("train" if split == "train" else "val")
    relative = [(-1, str(path.relative_to(layout.root))) for path in files.images]
    source = ListedFolderSource(layout.root, name, relative, [], channels, skip, max_bad, max_pixels,
                                min_side)
    source.info = replace(source.info, layout_note=f"a {layout.name} segmentation folder: its {split} split "
                          f"({files.listed_by}), masks not read")
    return source


def build_source(spec: str, split: str = "train", root: str | Path | None = None, channels: int | None = None,
                 skip_bad_images: bool = False, max_bad_images: int = 100,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, decode_min_side: int | None = None) -> Dataset:
    """Make a source from a dataset name or a folder path.

    Specs:
        - `"fashion-mnist"`, `"mnist"`: `IdxSource` (`root` is searched first for the IDX files).
        - `"synthetic"` or `"synthetic:N"`: `SyntheticSource` of N (default 256) images; the train
          split uses seed 0, val/test seed 1.
        - a folder path. If it holds `train/` plus `val/` or `test/`, those are the splits (a missing
          `val` falls back to `test` and back). Otherwise the whole folder is the train split. A folder
          whose top level holds only sub-folders is read as labeled (`ImageFolderSource`, one class per
          sub-folder); one with images at its top level as unlabeled (`FlatFolderSource`); one with
          `.tar` files at its top level as tar shards (`mimkit.data.shards`: labeled by the members'
          folders, unlabeled when members lie at the top level). A segmentation folder (ADE20K, Pascal
          VOC, images/ + masks/: `mimkit.data.layouts`) gives its split's images, unlabeled, and never
          its masks. The val split reuses the train split's
          channels and classes, so labels and shapes agree.
        - `"shards:DIR"`: the same, insisting on tar shards.
        - `"hf:PATH"` or `"hf:PATH:SPLIT"`: a Hugging Face dataset on disk (`mimkit.data.hf`); SPLIT is
          the dataset's split read as the train split (default `train`).

    Args:
        spec: see above.
        split: `"train"`, `"val"` or `"test"`.
        root: folder to search first for named IDX datasets.
        channels: 1 or 3 to convert images; None to follow the data.
        skip_bad_images: folders, shards, hf: replace unreadable images instead of raising.
        max_bad_images: folders, shards, hf: give up after more than this many unreadable images.
        max_image_pixels: folders, shards, hf: an image with more pixels is unreadable (refused before
            decoding).
        decode_min_side: folders, shards, hf: decode large images at a reduced size whose shorter side stays
            at least this (e.g. 3x the model's input side: every crop of the view still has full detail).

    Returns:
        A Dataset of `(image uint8 (C, H, W), label int)` with `.info` and `.labels`.
    """
    _check_split(split)
    _check_channels(channels)
    if spec in _IDX_DATASETS:
        return IdxSource(spec, split, root, channels)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return SyntheticSource(_parse_synthetic(spec), channels or 3, seed=0 if split == "train" else 1)
    folder_options = (skip_bad_images, max_bad_images, max_image_pixels, decode_min_side)
    if spec.startswith("hf:"):
        return _hf_source(spec, split, channels, *folder_options)
    path = Path(spec.removeprefix("shards:")).expanduser()
    if spec.startswith("shards:") and path.is_dir() and not shard_files(path / "train" if (
            path / "train").is_dir() else path):
        raise MimkitError(f"--data {spec}: no .tar shards in '{path}' (make them with: mimkit data pack "
                          f"FOLDER --out {path})")
    if not path.exists():
        raise MimkitError(f"data path '{spec}' does not exist (named datasets: "
                          f"{', '.join(_IDX_DATASETS)}, synthetic[:N])")
    if not path.is_dir():
        raise MimkitError(f"data path '{spec}' is not a folder")
    if (layout := find_layout(path)) is not None:
        return _layout_source(layout, split, path.name, channels, *folder_options)
    if not (path / "train").is_dir():
        if split != "train":
            raise MimkitError(
                f"data folder '{spec}' has no {split} split: create '{path / 'train'}' and '{path / 'val'}' "
                "sub-folders, or hold out part of train with split_train_val (a validation fraction)"
            )
        return _folder_source(path, channels, None, *folder_options)
    train = _folder_source(path / "train", channels, None, *folder_options)
    train.info = replace(train.info, name=path.name)  # the dataset's name, not "train"
    if split == "train":
        return train
    held_out = [path / name for name in ((split, "test") if split == "val" else (split, "val"))]
    folder = next((f for f in held_out if f.is_dir()), None)
    if folder is None:
        raise MimkitError(f"data folder '{spec}' has train/ but no val/ or test/ sub-folder for {split!r}")
    classes = train.info.classes if train.info.num_classes else None
    source = _folder_source(folder, train.info.channels, classes, *folder_options)
    if source.info.num_classes != train.info.num_classes:
        raise MimkitError(f"'{folder}' is {'un' if not source.info.num_classes else ''}labeled but "
                          f"'{path / 'train'}' is not; lay both out the same way")
    source.info = replace(source.info, name=path.name)
    return source


def shuffled_by_class(labels: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    """Each class's positions in ``labels``, shuffled with one generator seeded by ``seed`` (classes in
    sorted order): the stratified shuffle of every split and label subset."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        out[label] = members[torch.randperm(len(members), generator=g)]
    return out


def split_train_val(source: Dataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Hold out a fraction of a source, stratified by label when it is labeled.

    Each class (or the whole source, when unlabeled) is shuffled with `seed` and `round(fraction * n)`
    of it goes to val; indices stay in source order within each part.

    Args:
        source: a source with `.info` and `.labels`.
        val_fraction: in (0, 1).
        seed: the shuffle's seed; the same seed gives the same split.

    Returns:
        `(train, val)` `Subset`s, each with the source's `.info` and its own `.labels`.
    """
    if not 0 < val_fraction < 1:
        raise MimkitError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    labels = torch.as_tensor(list(source.labels))
    val = []
    for members in shuffled_by_class(labels, seed).values():
        val += members[: round(val_fraction * len(members))].tolist()
    val_set = set(val)
    train = [i for i in range(len(labels)) if i not in val_set]
    if not train or not val:
        raise MimkitError(f"val_fraction={val_fraction} of {len(labels)} images leaves an empty "
                          f"{'val' if not val else 'train'} part")
    parts = []
    for indices in (train, sorted(val)):
        part = Subset(source, indices)
        part.info, part.labels = source.info, labels[indices].tolist()
        parts.append(part)
    return parts[0], parts[1]
