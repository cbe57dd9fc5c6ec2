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

This module picks one from a name or a path (`build_source`); each kind lives in its own module:
`mimkit.data.idx`, `mimkit.data.folders`, `mimkit.data.shards`, `mimkit.data.hf`,
`mimkit.data.synthetic`. Holding out a validation part: `mimkit.data.splits`.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Dataset

from mimkit.data.decode import MAX_IMAGE_PIXELS
from mimkit.data.folders import EncodedImageSource, FlatFolderSource, ImageFolderSource, ListedFolderSource
from mimkit.data.hf import open_hf_images
from mimkit.data.idx import IDX_DATASETS, IdxSource
from mimkit.data.image_files import has_top_level_images, is_image_name, subfolders, walk_images
from mimkit.data.layouts import Layout, find_layout
from mimkit.data.shards import ShardMembers, ShardReader, member_labels, packed_with, shard_files
from mimkit.data.source_info import check_channels, check_split
from mimkit.data.synthetic import SyntheticSource
from mimkit.errors import MimkitError


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
    for _, names in walk_images(folder / "train" if (folder / "train").is_dir() else folder):
        count += len(names)
        if count > stop_after:
            break
    return count


def _parse_synthetic(spec: str) -> int:
    count = spec.partition(":")[2] or "256"
    if not count.isdigit() or int(count) < 1:
        raise MimkitError(f"data spec {spec!r}: the count after 'synthetic:' must be a positive integer")
    return int(count)


def _shard_source(folder: Path, channels: int | None, classes: Sequence[str] | None, skip: bool,
                  max_bad: int, max_pixels: int, min_side: int | None) -> EncodedImageSource:
    members = ShardMembers.from_folder(folder, is_image_name)
    labels, classes = member_labels(members.names, classes)
    names = [members.describe(i) for i in range(len(members))]
    return _noting_packing(EncodedImageSource(str(folder), names, labels, classes, channels, skip, max_bad,
                                              max_pixels, min_side, ShardReader(members)), folder)


def _noting_packing(source: EncodedImageSource, folder: str | Path) -> EncodedImageSource:
    """The shard source, its info saying the maximum side and quality the shards were packed with."""
    if (packed := packed_with(folder)) and "max_side" in packed:  # an MCU index alone keeps the pixels
        source.info = replace(source.info, storage_note=(
            f"shards packed at max side {packed['max_side']} px, JPEG quality {packed['quality']} "
            "(resized before the crop)"))
    return source


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
    found = ShardMembers.from_folder(root, is_image_name)
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
    source = EncodedImageSource(str(root), names, [label for label, _ in members], list(classes), channels,
                                skip_bad_images, max_bad_images, max_image_pixels, decode_min_side,
                                ShardReader(picked))
    source.info = replace(source.info, name=name)
    return _noting_packing(source, root)


def _hf_source(spec: str, split: str, channels: int | None, skip: bool, max_bad: int, max_pixels: int,
               min_side: int | None) -> EncodedImageSource:
    path, _, dataset_split = spec.removeprefix("hf:").rpartition(":")
    if not path or "/" in dataset_split:  # no split named: the colon was part of the path, or absent
        path, dataset_split = spec.removeprefix("hf:"), ""
    rows = open_hf_images(path, split, dataset_split or None)
    return EncodedImageSource(rows.root, rows.names, rows.labels, rows.classes, channels, skip, max_bad,
                              max_pixels, min_side, rows.reader)


def _folder_source(folder: Path, channels: int | None, classes: Sequence[str] | None, skip: bool,
                   max_bad: int, max_pixels: int, min_side: int | None) -> Dataset:
    if not has_top_level_images(folder) and shard_files(folder):
        return _shard_source(folder, channels, classes, skip, max_bad, max_pixels, min_side)
    if not has_top_level_images(folder) and subfolders(folder):
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
    check_split(split)
    check_channels(channels)
    if spec in IDX_DATASETS:
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
                          f"{', '.join(IDX_DATASETS)}, synthetic[:N])")
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
