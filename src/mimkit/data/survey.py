"""What a data source holds, told before training starts: image counts, sizes, channels, labels, and the
image and patch size that fit images much smaller than a recipe's."""

import statistics
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset

from mimkit.data.sources import build_source
from mimkit.errors import MimkitError

SIZE_SAMPLES = 1000  # image headers read to tell the sizes of a large folder
MIN_PATCH_GRID = 7  # patches per side a suggested size keeps at least (Fashion-MNIST's 28 px in 4-px patches)


@dataclass(frozen=True)
class DataFacts:
    """What a pretraining run reads.

    Attributes:
        name: the source's name.
        train_images: images in the train split.
        held_out_images: images in its val (or test) split; 0 when it has none.
        sizes_read: images whose size was read (all of them, or an evenly spread sample).
        smallest, largest, median: `(width, height)`; smallest and largest by area, the median per side.
        channels: channels the model sees (1 or 3).
        classes: number of classes; 0 when unlabeled.
        channels_note: how the channels were decided, when the data decided them (folders).
        layout_note: which files of a segmentation folder were taken.
        storage_note: how the images were stored (shards packed with a maximum side).
    """

    name: str
    train_images: int
    held_out_images: int
    sizes_read: int
    smallest: tuple[int, int]
    largest: tuple[int, int]
    median: tuple[int, int]
    channels: int
    classes: int
    channels_note: str = ""
    layout_note: str = ""
    storage_note: str = ""

    def describe(self) -> str:
        held_out = f"{self.held_out_images} held out" if self.held_out_images else "none held out"
        size = "x".join(map(str, self.median))
        if self.smallest != self.largest:
            size = (f"{'x'.join(map(str, self.smallest))} to {'x'.join(map(str, self.largest))}, "
                    f"median {size}")
        read = "all read" if self.sizes_read == self.train_images else f"{self.sizes_read} sampled"
        labels = f"{self.classes} classes (labels unused by pretraining)" if self.classes else "no labels"
        how = f" ({self.channels_note})" if self.channels_note else ""
        layout = f" ({self.layout_note})" if self.layout_note else ""
        stored = f"; {self.storage_note}" if self.storage_note else ""
        return (f"{self.name}: {self.train_images} images for training{layout}, {held_out}; {size} px "
                f"({read}), {self.channels} channel{'s' if self.channels > 1 else ''}{how}, {labels}{stored}")


def _image_sizes(source: Dataset, samples: int) -> list[tuple[int, int]]:
    """`(width, height)` of all of a folder, shard or dataset source's images, or of `samples` evenly spread
    ones; unreadable ones left out."""
    n = len(source)
    picks = range(n) if n <= samples else [i * n // samples for i in range(samples)]
    sizes = []
    for index in picks:
        try:
            with Image.open(source.image_file(index)) as img:  # reads the header only
                sizes.append(img.size)
        except Exception:  # PIL raises many types on bad files; the loader reports them when it meets them
            continue
    return sizes


def held_out_count(spec: str, root: str | None = None) -> int:
    """Images in a data spec's val (or test) split; 0 when it has none."""
    try:
        return len(build_source(spec, split="val", root=root))
    except MimkitError:
        return 0


def survey(source: Dataset, held_out_images: int, samples: int = SIZE_SAMPLES) -> DataFacts:
    """The facts of a train source.

    Args:
        source: a source (`mimkit.data.sources`); folders have their image headers read.
        held_out_images: the size of its held-out split (`held_out_count`).
        samples: at most this many headers are read, evenly spread over the folder.
    """
    info = source.info
    if hasattr(source, "image_file"):
        sizes = _image_sizes(source, samples) or [(0, 0)]
    else:  # in-memory and generated sources: one size for all
        sizes = [(info.image_size, info.image_size)] * min(len(source), samples)
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    median = (statistics.median_low(w for w, _ in sizes), statistics.median_low(h for _, h in sizes))
    return DataFacts(info.name, len(source), held_out_images, len(sizes), by_area[0], by_area[-1], median,
                     info.channels, info.num_classes, info.channels_note, info.layout_note, info.storage_note)


def fitting_size(side: int) -> tuple[int, int]:
    """`(img_size, patch_size)` for images of `side` pixels: the largest patch of 16, 8, 4 or 2 px that keeps
    a grid of at least `MIN_PATCH_GRID` patches per side, and the image size cut to a whole number of
    patches."""
    patch = next((p for p in (16, 8, 4) if side // p >= MIN_PATCH_GRID), 2)
    return max(side // patch, 1) * patch, patch


def size_hint(img_size: int | None, facts: DataFacts) -> dict | None:
    """The `--set` values that fit images at most half the configured size, or None when they fit already.

    Returns:
        `{"data.img_size": int, "model.patch_size": int}` or None.
    """
    side = min(facts.median)
    if img_size is None or side == 0 or side > img_size / 2:
        return None
    fit_size, patch = fitting_size(side)
    return {"data.img_size": fit_size, "model.patch_size": patch}
