"""Every variant of the data formats mimkit reads is either read right or refused in one line.

A fresh planted set found an IDX file of int32 or float elements read as bytes: the tests wrote only unsigned
bytes. Here every element type the IDX format defines (and 1, 3 and 4 dimensions), and every mode Pillow
gives (through a folder of images and as a segmentation mask), each with pixels that differ, so a swapped
axis, a clipped range or a dropped channel shows.
"""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data.idx import read_idx
from mimkit.data.segmentation import read_mask
from mimkit.data.sources import build_source
from mimkit.errors import MimkitError

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("compress", [True, False])
def test_an_idx_file_of_bytes_is_read_in_its_shape(tmp_path, shape, compress):
    array = (np.arange(np.prod(shape)) * 7 % 256).astype(np.uint8).reshape(shape)
    payload = idx_bytes(array, 0x08)
    (tmp_path / "x.idx").write_bytes(gzip.compress(payload) if compress else payload)
    assert torch.equal(read_idx(tmp_path / "x.idx"), torch.from_numpy(array))


@pytest.mark.parametrize("code", [c for c in IDX_TYPES if c != 0x08], ids=lambda c: IDX_TYPES[c])
def test_an_idx_file_of_other_elements_is_refused_in_one_line(tmp_path, code):
    """Signed bytes, shorts, ints, floats and doubles: mimkit reads images of unsigned bytes only, and says
    so, rather than reading each element's bytes as pixels."""
    (tmp_path / "x.idx").write_bytes(idx_bytes(np.arange(6).astype(IDX_TYPES[code]).reshape(2, 3), code))
    with pytest.raises(MimkitError, match=r"^'.*x.idx' is not an IDX file of unsigned bytes$"):
        read_idx(tmp_path / "x.idx")


@pytest.mark.parametrize("extra", [-1, 1])
def test_an_idx_file_whose_size_is_not_its_headers_is_refused(tmp_path, extra):
    payload = idx_bytes(np.zeros((2, 3), np.uint8), 0x08)
    (tmp_path / "x.idx").write_bytes(payload[:extra] if extra < 0 else payload + b"\0")
    with pytest.raises(MimkitError, match=r"holds \d+ bytes, its header says \(2, 3\)"):
        read_idx(tmp_path / "x.idx")


GREY = np.array([[0, 60, 120], [180, 240, 255]], np.uint8)  # 2 x 3: rows and columns differ
RGB = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)
PALETTE = [v for i in range(256) for v in (i, 255 - i, i // 3)]


def paletted(mode: str) -> Image.Image:
    image = Image.fromarray(GREY, "L").convert("P") if mode == "P" else Image.new("PA", (3, 2))
    image.putpalette(PALETTE)
    if mode == "PA":
        image.putdata([(int(v), 200) for v in GREY.flatten()])
    return image


CMYK = np.stack([GREY, np.zeros_like(GREY), 255 - GREY, np.zeros_like(GREY)], axis=-1)
# mode -> (file name, the image, the channels read, the pixels read: (H, W) grey or (H, W, 3) RGB)
MODES = {
    "1": ("a.png", lambda: Image.fromarray(GREY > 100), np.where(GREY > 100, 255, 0)),
    "L": ("a.png", lambda: Image.fromarray(GREY, "L"), GREY),
    "LA": ("a.png", lambda: Image.fromarray(np.stack([GREY, 255 - GREY], -1), "LA"), GREY),
    "P": ("a.png", lambda: paletted("P"), np.array(PALETTE).reshape(256, 3)[GREY]),
    "PA": ("a.tif", lambda: paletted("PA"), np.array(PALETTE).reshape(256, 3)[GREY]),
    "RGB": ("a.png", lambda: Image.fromarray(RGB, "RGB"), RGB),
    "RGBA": ("a.png", lambda: Image.fromarray(np.dstack([RGB, 255 - GREY]), "RGBA"), RGB),
    "I;16": ("a.png", lambda: Image.fromarray(GREY.astype("<u2") * 256 + 7), GREY),
    "I": ("a.tif", lambda: Image.fromarray(GREY.astype(np.int32) * 256 + 7), GREY),
    "F": ("a.tif", lambda: Image.fromarray(GREY.astype(np.float32)), GREY),
    "CMYK": ("a.tif", lambda: Image.fromarray(CMYK, "CMYK"),
             np.stack([255 - GREY, np.full_like(GREY, 255), GREY], axis=-1)),
}


@pytest.mark.parametrize("mode", MODES)
def test_a_folder_reads_each_pillow_mode_as_its_grey_or_rgb_pixels(tmp_path, mode):
    name, make, expected = MODES[mode]
    image = make()
    image.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode  # the file holds the mode the case names
    read, _ = build_source(str(tmp_path))[0]
    pixels = torch.from_numpy(np.asarray(expected, np.uint8))
    assert torch.equal(read, pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1))


MASK_READ = {"L": GREY, "P": GREY, "1": (GREY > 100).astype(np.int64),
             "I;16": GREY.astype(np.int64) * 256 + 7,
             "I": GREY.astype(np.int64) * 256 + 7}


@pytest.mark.parametrize("mode", MODES)
def test_a_mask_of_each_pillow_mode_is_read_as_its_labels_or_refused_in_one_line(tmp_path, mode):
    name, make, _ = MODES[mode]
    make().save(tmp_path / name)
    if mode in MASK_READ:
        assert np.array_equal(read_mask(tmp_path / name), MASK_READ[mode])
    else:
        with pytest.raises(MimkitError, match=rf"^mask '.*' is stored as {mode}; store masks as 8-bit label"):
            read_mask(tmp_path / name)
