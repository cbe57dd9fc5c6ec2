"""Sources of encoded images decoded with PIL: image folders (labeled by sub-folder, flat, or listed by a
run), and the shared body that tar shards and Hugging Face datasets reuse (`EncodedImageSource`), with
channels decided by the data and bad-image handling."""

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from mimkit.data.crop_decode import DrawBox, crop_decode
from mimkit.data.decode import GRAY_MODES, MAX_IMAGE_PIXELS, decode_image
from mimkit.data.image_files import IMAGE_EXTENSIONS, image_files, listing_bar, subfolders
from mimkit.data.source_info import GRAY_MEAN, GRAY_STD, SourceInfo, check_channels
from mimkit.errors import MimkitError


class EncodedImageSource(Dataset):
    """Encoded images decoded with PIL: files, tar shard members or dataset rows; the shared body of the
    folder, shard and Hugging Face sources.

    Channels follow the data unless asked: RGB unless every one of up to 32 files sampled across the
    folder is stored grey ("L"). A file above `max_image_pixels` is unreadable (never decoded); with
    `decode_min_side`, a large file is decoded at a reduced size whose shorter side stays at least that
    (JPEG's DCT scaling through PIL's ``draft``, else ``reduce``), so memory follows what the view needs.
    With `skip_bad_images`, an unreadable file is warned about and replaced by the next readable one
    (the same replacement in every process and epoch); more than `max_bad_images` distinct unreadable
    images raise. The count is per process: each DataLoader worker keeps its own, so across workers up
    to `num_workers * max_bad_images` images may be skipped before one gives up. `load_crop` decodes only
    what a view's crop needs (`mimkit.data.crop_decode`), with the same bad-image handling
    (`first_readable`).

    Args:
        root: the folder (or dataset) the images come from, for messages and the source's name.
        paths: one name per image, for messages: a file path, or `shard.tar:member` for a shard.
        reader: `reader(i) -> binary file object` of image i; None reads the file `paths[i]`.
    """

    def __init__(self, root: str, paths: Sequence[Path | str], labels: Sequence[int], classes: list[str],
                 channels: int | None, skip_bad_images: bool, max_bad_images: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, decode_min_side: int | None = None,
                 reader: Callable[[int], BinaryIO] | None = None):
        check_channels(channels)
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
                    gray.append(img.mode in GRAY_MODES)
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

    def load_crop(self, index: int, draw_box: DrawBox, out_size: int | None = None) -> torch.Tensor:
        """Decode only the crop that `draw_box` picks from image `index`'s size (`mimkit.data.crop_decode`),
        uint8 `(C, h, w)`; with `out_size` and `decode_min_side` set, a box at least twice `out_size` is
        decoded at a reduced DCT scale. Raises as `load` does."""
        file = self.image_file(index)
        if isinstance(file, str):
            with open(file, "rb") as f:
                data = f.read()
        else:
            data = file.read()
        scaled = out_size if self.decode_min_side else None
        return crop_decode(data, self._mode, draw_box, self.max_image_pixels, scaled, self.decode_min_side)

    def first_readable(self, index: int, load: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """`(load(i), label of i)` for `i = index`, or, with `skip_bad_images`, for the next image that
        `load` reads without an error (a bad file's stand-in, the same in every process and epoch)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self.bad_indices:
                continue
            try:
                return load(i), self.labels[i]
            except Exception as e:  # PIL and libjpeg raise many types on bad files
                self._skip(i, e)
        raise MimkitError(f"no readable image among the {len(self)} under '{self.root}'")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.first_readable(index, self.load)


class ImageFolderSource(EncodedImageSource):
    """A labeled folder: one sub-folder per class, images anywhere below it (recursively).

    Classes are the sorted sub-folder names, label = index. Channels follow a sample of the files
    (see `EncodedImageSource`) unless `channels` is given; mean/std are ImageNet's for 3 channels and
    (0.5,)/(0.5,) for 1.

    Args:
        root: the folder holding the class sub-folders.
        channels: 1 or 3 to convert every image; None to follow the data.
        classes: the class list to use (e.g. the train split's, so a val split missing a class keeps
            the same labels); every sub-folder must be in it.
        skip_bad_images: replace unreadable files instead of raising (see `EncodedImageSource`).
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
        found = subfolders(root)
        classes = list(classes) if classes is not None else found
        if unknown := sorted(set(found) - set(classes)):
            raise MimkitError(f"class folders {unknown} under '{root}' are not among the classes {classes}")
        paths, labels = [], []
        with listing_bar(root) as bar:  # one bar over all classes: each alone may be quick
            for label, name in enumerate(classes):
                files = image_files(root / name, bar) if (root / name).is_dir() else []
                paths += files
                labels += [label] * len(files)
        super().__init__(str(root), paths, labels, classes, channels, skip_bad_images, max_bad_images,
                         max_image_pixels, decode_min_side)


class FlatFolderSource(EncodedImageSource):
    """An unlabeled folder: every image below it, recursively, in sorted path order; label -1.

    Extensions: jpg, jpeg, png, webp, bmp, tif, tiff (any case); hidden files and folders are skipped.
    Channels and mean/std as in `ImageFolderSource`.

    Item:
        `(image uint8 (C, H, W), -1)`.
    """

    def __init__(self, root: str | Path, channels: int | None = None, skip_bad_images: bool = False,
                 max_bad_images: int = 100, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 decode_min_side: int | None = None):
        paths = image_files(Path(root))
        super().__init__(str(root), paths, [-1] * len(paths), [], channels, skip_bad_images, max_bad_images,
                         max_image_pixels, decode_min_side)


class ListedFolderSource(EncodedImageSource):
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

