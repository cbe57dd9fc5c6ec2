"""What every source carries: `SourceInfo`, the split names, and the checks of the arguments every source
takes (channels, split)."""

from dataclasses import dataclass

from mimkit.errors import MimkitError

SPLITS = ("train", "val", "test")
# Folder images carry no statistics of their own: ImageNet's for colour (timm's IMAGENET_DEFAULT_*), a
# symmetric [-1, 1] map for grey.
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)


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
        storage_note: how the images were stored, where it changes what the model sees (tar shards packed
            with a maximum side).
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
    storage_note: str = ""


def check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise MimkitError(f"channels={channels!r} is not supported; use 1, 3 or leave it unset")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise MimkitError(f"split {split!r} is not one of {', '.join(SPLITS)}")


