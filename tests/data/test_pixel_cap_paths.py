"""The pixel cap (``data.max_image_pixels``) holds on every path that decodes a file: a folder's images
decoded whole and cropped while decoding, in class folders or flat, packed in shards or in a Hugging Face
dataset, and a segmentation set's images and masks.

A small file can hold a huge image; the cap refuses it from its header, before decoding. It was tested on
a folder's whole decode; a source that dropped it on its way (shards, a dataset, the crop decode of JPEGs) or
a decode that never asked (a segmentation mask, read whole to check its labels) would decode whatever it is
given. Each path is given images of 320 to 600 pixels under a cap of 100 (refused, naming the cap) and of
10^6 (read).
"""

import numpy as np
import pytest
import torch

from mimkit.data.segmentation import folder_seg_source
from mimkit.data.sources import build_source
from mimkit.errors import MimkitError
from tests.data.test_segmentation import make_generic
from tests.data.test_shards import image_folder, pack

REFUSED = "above data.max_image_pixels=100"
SOURCES = ("flat folder", "class folders", "shards", "hf dataset")


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, str]:
    """Each source kind's data spec, over three small images (JPEGs; a dataset's PNGs)."""
    from tests.data.test_hf import labeled
    root = tmp_path_factory.mktemp("stored")
    image_folder(root / "flat", 3, classes=())
    image_folder(root / "classes", 3)
    assert pack(root / "classes", root / "shards") == 0
    labeled(3).save_to_disk(str(root / "ds"))
    return {"flat folder": str(root / "flat"), "class folders": str(root / "classes"),
            "shards": str(root / "shards"), "hf dataset": f"hf:{root / 'ds'}"}


@pytest.mark.parametrize("decode", ["whole", "crop"])
@pytest.mark.parametrize("kind", SOURCES)
def test_every_sources_decode_refuses_an_image_above_the_pixel_cap(kind, decode, stored):
    def read(cap: int):
        source = build_source(stored[kind], max_image_pixels=cap)
        if decode == "whole":
            return source.load(0)
        return source.load_crop(0, lambda height, width: (0, 0, height // 2, width // 2))

    with pytest.raises(ValueError, match=REFUSED):
        read(100)
    assert read(10**6).dtype == torch.uint8


@pytest.mark.parametrize("part", ["image", "mask"])
def test_a_segmentation_sets_images_and_masks_are_refused_above_the_pixel_cap(part, tmp_path):
    """An image is refused when a pair is read; a mask when the masks are checked (their images' sizes
    are read from the headers alone), before either is decoded."""
    folder = make_generic(tmp_path / "seg", [np.arange(24 * 20).reshape(24, 20) % 3 for _ in range(2)])

    def read(cap: int):
        source = folder_seg_source(folder, "train", num_classes=3)
        source.max_image_pixels = cap  # (its first image, decoded to find its channels, read uncapped)
        return source[0] if part == "image" else source.check_masks([0])

    with pytest.raises(MimkitError, match=f"cannot read {part} .*{REFUSED}"):
        read(100)
    read(10**6)
