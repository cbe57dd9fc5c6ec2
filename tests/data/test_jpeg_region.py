"""Region decoding (`mimkit.data._jpeg_region`, the optional C extension): only the box's rows and iMCU
columns decoded, with the same pixels as decoding the whole image and cutting the box, bit for bit, at full
size and at every DCT scale; bad files raise ValueError; crop decoding takes this path where it is built."""

import io
import math

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from mimkit.data import crop_decode
from mimkit.data.decode import MAX_IMAGE_PIXELS
from tests.conftest import jpeg, photo

region = pytest.importorskip("mimkit.data._jpeg_region", reason="the C extension was not built (setup.py)")


def whole(data: bytes, channels: int) -> np.ndarray:
    """Pillow's decode of the whole image, `[H, W, C]` (what today's loader decodes)."""
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    return pixels[..., None] if channels == 1 else pixels


def decode_box(data: bytes, box, channels: int = 3, factor: int = 1) -> np.ndarray:
    top, left, height, width = box
    pixels = region.decode_region(data, top, left, height, width, factor, channels)
    return np.frombuffer(pixels, np.uint8).reshape(height, width, channels)


def edge_boxes(height: int, width: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Random boxes, and boxes whose sides fall on, just before and just after iMCU boundaries (8 and 16
    px), where a column crop's chroma upsampling would differ from the whole image's."""
    rng = np.random.default_rng(seed)
    out = [(0, 0, height, width), (height - 1, width - 1, 1, 1)]
    for left in (7, 8, 9, 15, 16, 17, 31, 32, 33):
        for right in (left + 1, left + 14, left + 15, left + 16, left + 17, width):
            if left < right <= width:
                top = int(rng.integers(0, height))
                out.append((top, left, int(rng.integers(1, height - top + 1)), right - left))
    for _ in range(n):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        out.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return out


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["4:4:4", "4:2:2", "4:2:0"])
@pytest.mark.parametrize("size", [(400, 350), (61, 37), (123, 90)])
def test_region_decode_is_the_whole_decode_cut_to_the_box_bit_for_bit(subsampling, size):
    data = jpeg(photo(*size, seed=subsampling), subsampling=subsampling)
    expected = whole(data, 3)
    for box in edge_boxes(size[1], size[0], n=40, seed=sum(size)):
        top, left, height, width = box
        assert np.array_equal(decode_box(data, box), expected[top:top + height, left:left + width]), box


@pytest.mark.parametrize("subsampling", [1, 2], ids=["4:2:2", "4:2:0"])
def test_a_box_one_or_two_pixels_wide_at_an_image_edge_is_upsampled_as_in_the_whole_image(subsampling):
    """A column crop whose subsampled chroma is two samples wide or less is upsampled by libjpeg without
    smoothing: the region decoder keeps at least five columns. Width 34: the last two columns start an
    iMCU column of their own."""
    data = jpeg(photo(34, 20, seed=3), subsampling=subsampling)
    expected = whole(data, 3)
    for left, width in ((0, 1), (0, 2), (33, 1), (32, 2), (16, 1)):
        box = (3, left, 12, width)
        assert np.array_equal(decode_box(data, box), expected[3:15, left:left + width]), box


@pytest.mark.parametrize("kind", ["grey", "restart markers"])
def test_region_decode_of_grey_and_restart_marker_jpegs(kind):
    channels = 1 if kind == "grey" else 3
    data = (jpeg(photo(133, 71, channels=1)) if kind == "grey"
            else jpeg(photo(200, 150), subsampling=2, restart_marker_blocks=3))
    expected = whole(data, channels)
    for box in edge_boxes(*expected.shape[:2], n=30, seed=1):
        top, left, height, width = box
        assert np.array_equal(decode_box(data, box, channels), expected[top:top + height, left:left + width])


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_region_decode_at_a_dct_scale_is_the_scaled_whole_decode_cut(factor):
    data = jpeg(photo(517, 389), subsampling=2)
    scaled = simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(389 / factor),
                                    min_width=math.ceil(517 / factor))  # today's scaled path
    assert scaled.shape[:2] == (math.ceil(389 / factor), math.ceil(517 / factor))
    for box in edge_boxes(*scaled.shape[:2], n=20, seed=factor):
        top, left, height, width = box
        cut = scaled[top:top + height, left:left + width]
        assert np.array_equal(decode_box(data, box, factor=factor), cut), box


def _cut_short(data: bytes) -> bytes:
    """The first third of the file, its end marker kept (so nothing outside libjpeg sees the cut)."""
    return data[:len(data) // 3] + b"\xff\xd9"


@pytest.mark.parametrize("bad", ["cut short", "not a JPEG", "box outside", "too many components",
                                 "MCU-indexed, cut short", "MCU-indexed, a restart marker lost"])
def test_a_bad_file_or_box_raises_value_error(bad):
    good = jpeg(photo(64, 48))
    indexed = region.transcode_restart_every_mcu(good)
    lost = indexed.index(b"\xff\xd3")  # the fourth MCU's marker
    data, box, channels = {
        "MCU-indexed, cut short": (_cut_short(indexed), (0, 0, 8, 8), 3),  # its first MCUs are there
        "MCU-indexed, a restart marker lost": (indexed[:lost] + indexed[lost + 2:], (0, 0, 8, 8), 3),
        "cut short": (_cut_short(good), (40, 0, 8, 64), 3),  # the box's rows are past the cut
        "not a JPEG": (b"\xff\xd8 nothing to decode \xff\xd9", (0, 0, 1, 1), 3),
        "box outside": (good, (40, 60, 9, 4), 3),
        "too many components": (good, (0, 0, 4, 4), 1),
    }[bad]
    with pytest.raises(ValueError, match="JPEG region decode"):
        decode_box(data, box, channels)


def test_crop_decoding_takes_the_region_path_for_a_whole_jpeg_only(monkeypatch):
    calls = []

    def spy(data, *box):
        calls.append(box)
        return region.decode_region(data, *box)

    monkeypatch.setattr(crop_decode, "decode_region", spy)
    good = jpeg(photo(90, 60), orientation=6)  # stored 90x60, upright 60x90
    box = (5, 7, 30, 20)  # upright
    crop = crop_decode.crop_decode(good, "RGB", lambda h, w: box, MAX_IMAGE_PIXELS)
    assert calls == [(60 - 7 - 20, 5, 20, 30, 1, 3)]  # the box in the stored frame (turned 90 clockwise)
    monkeypatch.setattr(crop_decode, "decode_region", None)  # the path where the extension is not built
    assert torch.equal(crop, crop_decode.crop_decode(good, "RGB", lambda h, w: box, MAX_IMAGE_PIXELS))
    monkeypatch.setattr(crop_decode, "decode_region", spy)
    with pytest.raises(ValueError):  # cut short, no end marker: the whole image is decoded, and fails
        crop_decode.crop_decode(good[:len(good) // 2], "RGB", lambda h, w: (0, 0, 4, 4), MAX_IMAGE_PIXELS)
    assert len(calls) == 1


RESTART_EVERY_MCU = b"\xff\xdd\x00\x04\x00\x01"  # the DRI segment of restart interval 1


def mcu_boundary_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Boxes that start and end on, just before and just after 16-px MCU boundaries on both axes, where
    the MCU decode must take (or may leave out) the neighbouring MCU its fancy upsampling reads."""
    sides = [s for s in (0, 1, 2, 14, 15, 16, 17, 31, 32, 33) if s < min(height, width)]
    return [(top, left, min(height - top, 16 + top % 3), min(width - left, 16 - left % 2))
            for top in sides for left in sides]


@pytest.mark.parametrize("kind", ["4:4:4", "4:2:2", "4:2:0", "grey"])
@pytest.mark.parametrize("size", [(400, 350), (61, 37), (123, 90), (19, 29)])
def test_mcu_indexed_decode_is_the_whole_decode_cut_to_the_box_bit_for_bit(kind, size):
    """A file re-encoded with a restart marker after every MCU holds the same pixels, and a box decoded
    from the MCUs around it alone is the whole decode cut, at every edge (19 px: a narrow last MCU)."""
    channels = 1 if kind == "grey" else 3
    original = (jpeg(photo(*size, channels=1)) if kind == "grey"
                else jpeg(photo(*size, seed=sum(size)), subsampling=["4:4:4", "4:2:2", "4:2:0"].index(kind)))
    data = region.transcode_restart_every_mcu(original)
    assert RESTART_EVERY_MCU in data
    expected = whole(original, channels)
    assert np.array_equal(whole(data, channels), expected)  # lossless
    for box in edge_boxes(size[1], size[0], n=40, seed=sum(size)) + mcu_boundary_boxes(size[1], size[0]):
        top, left, height, width = box
        cut = expected[top:top + height, left:left + width]
        assert np.array_equal(decode_box(data, box, channels), cut), box


def test_mcu_indexed_decode_reads_only_the_mcus_around_the_box():
    """Damage to an MCU far from the box changes the whole decode but nothing in the box: the box came from
    the MCUs around it alone."""
    clean = jpeg(photo(160, 128), subsampling=2)
    data = bytearray(region.transcode_restart_every_mcu(clean))
    last_marker = data.rindex(b"\xff\xd9") - 1
    while not 0xD0 <= data[last_marker + 1] <= 0xD7 or data[last_marker] != 0xFF:
        last_marker -= 1  # the restart marker before the last MCU
    data[last_marker - 6:last_marker] = b"\x00" * 6  # garbage in the last row's second-to-last MCU
    expected = whole(clean, 3)
    assert not np.array_equal(whole(bytes(data), 3), expected)
    assert np.array_equal(decode_box(bytes(data), (0, 0, 40, 40)), expected[:40, :40])


def test_transcode_keeps_exif_orientation_and_refuses_a_bad_file():
    original = jpeg(photo(90, 60), orientation=6)
    data = region.transcode_restart_every_mcu(original)
    assert crop_decode.read_header(data, "RGB").orientation == 6
    box = lambda h, w: (5, 7, 30, 20)  # noqa: E731
    assert torch.equal(crop_decode.crop_decode(data, "RGB", box, MAX_IMAGE_PIXELS),
                       crop_decode.crop_decode(original, "RGB", box, MAX_IMAGE_PIXELS))
    with pytest.raises(ValueError, match="JPEG transcode"):
        region.transcode_restart_every_mcu(_cut_short(original))
