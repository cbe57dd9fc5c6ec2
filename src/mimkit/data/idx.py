"""IDX files: Fashion-MNIST and MNIST, found on disk (a folder, $MIMKIT_DATA, the Debian package, the
cache) or downloaded, and held in memory as uint8.

- Fashion-MNIST: Xiao et al., 2017, arXiv:1708.07747
- MNIST: LeCun et al., 1998, "Gradient-based learning applied to document recognition"
"""

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.source_info import SourceInfo, check_channels, check_split
from mimkit.errors import MimkitError

DEBIAN_DATASETS = Path("/usr/share/datasets")


@dataclass(frozen=True)
class _IdxDataset:
    mean: float
    std: float
    classes: tuple[str, ...]
    torchvision_name: str  # class in torchvision.datasets, also its download sub-folder
    debian_package: str | None


IDX_DATASETS = {
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

    dataset_class = getattr(datasets, IDX_DATASETS[name].torchvision_name)
    return Path(dataset_class(str(mimkit_cache_dir()), download=True).raw_folder)


def locate_idx(name: str, split: str, root: str | Path | None) -> tuple[Path, Path]:
    """Find (images, labels) files: root, $MIMKIT_DATA, the Debian package, then a download."""
    spec = IDX_DATASETS[name]
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
        if name not in IDX_DATASETS:
            raise MimkitError(f"unknown IDX dataset {name!r}; use one of {', '.join(IDX_DATASETS)}")
        check_split(split)
        check_channels(channels)
        spec = IDX_DATASETS[name]
        images_path, labels_path = locate_idx(name, split, root)
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

