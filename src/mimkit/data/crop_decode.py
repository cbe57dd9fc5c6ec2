"""Crop decoding: draw a view's crop box from a JPEG's header, then decode what that box needs.

A random resized crop needs only the image's size to draw its box, and the header has it (read here
from the JPEG markers, without Pillow). So the box is drawn first (from the seeded torch RNG, as the view
would draw it from the decoded image: resume stays exact), then:

- only the box's region is decoded, by mimkit's own C extension (`mimkit.data._jpeg_region`, over
  libjpeg-turbo's `jpeg_skip_scanlines` / `jpeg_crop_scanline`): the rows above the box are entropy-decoded
  and dropped, the columns outside the box's iMCU columns skip the inverse DCT, upsampling and colour
  conversion, and decoding stops at the box's last row. The pixels are bit-identical to Pillow's full
  decode cut to the box (accurate integer IDCT, fancy upsampling; one column more is decoded on each side
  so the box's edge columns are upsampled from their true neighbours). In a file with a restart marker
  after every MCU (`mimkit data pack --mcu-index`), the extension decodes, at full size, only the MCUs
  around the box, cut out as a small JPEG of their own: no entropy decoding above or beside the box either;
- where the box is at least twice the output side, the image is decoded at 1/2, 1/4 or 1/8 scale in the
  DCT domain (libjpeg's scaled IDCT), so a large image costs a fraction of its full decode; the pixels
  then differ from a full-size decode followed by the resize (measured in `benchmarks/RESULTS.md`);
- EXIF orientation is kept by turning the box into the stored image's frame, cutting it there and turning
  only the crop.

The extension is optional (setup.py builds it where a compiler and libjpeg's headers are found). Without
it, and for a file that does not end with the JPEG end marker (cut short, or trailing bytes), the whole
image is decoded by libjpeg-turbo through `simplejpeg` and the box cut: the same pixels, slower. So a file
cut short is reported whatever its box; a header that claims more rows than the data holds is reported
only when a box reaches past the data (the region decoder never reads below the box). libjpeg's warnings
(corrupt data) are errors on both paths, as `simplejpeg`'s strict mode makes them.

Files that are not baseline JPEGs in the mode asked for (PNG, progressive or CMYK JPEGs, a colour JPEG
read as grey) take the general path: `decode_image`, then the box from the decoded size (a progressive
JPEG keeps every scan's coefficients before its first row, so a region saves it almost nothing: measured
in `benchmarks/RESULTS.md`). A bad file raises there or here alike, for the source to report or skip.
"""

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch

from mimkit.data.decode import decode_image

try:  # the optional C extension (setup.py): built where a compiler and libjpeg's headers were found
    from mimkit.data._jpeg_region import decode_region
except ImportError:
    decode_region = None

Box = tuple[int, int, int, int]  # top, left, height, width
DrawBox = Callable[[int, int], Box]  # (height, width) of the oriented image -> its crop box
DCT_FACTORS = (8, 4, 2)  # the DCT-domain reductions used, largest first
_COLORSPACE = {"RGB": "RGB", "L": "GRAY"}
_END_OF_IMAGE = b"\xff\xd9"  # a file cut short lacks it: decoded whole, so the cut is seen whatever the box
_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline and extended sequential frames: what decodes as Pillow does
_FRAMES = (*_SEQUENTIAL_HUFFMAN, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# EXIF orientation -> how the stored pixels `a [H, W, C]` turn into the upright image (PIL's exif_transpose)
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # turned 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # turned 90 clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # turned 90 counter-clockwise
}


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels `[H, W, C]` turned upright (a view); unknown orientations are left as they are."""
    turn = _ORIENT.get(orientation)
    return turn(pixels) if turn else pixels


@dataclass(frozen=True)
class JpegHeader:
    """What a crop decode needs from a file's header.

    Attributes:
        width, height: the stored image's size (before EXIF orientation).
        orientation: EXIF orientation, 1 (upright) to 8.
        crop_decodable: a baseline JPEG in the mode asked for, which `simplejpeg` decodes as Pillow does.
    """

    width: int
    height: int
    orientation: int
    crop_decodable: bool

    @property
    def upright_size(self) -> tuple[int, int]:
        """`(height, width)` of the image as the view sees it (after EXIF orientation)."""
        turned = self.orientation in (5, 6, 7, 8)
        return (self.width, self.height) if turned else (self.height, self.width)


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of an Exif block's first IFD; 1 when it has none."""
    order = {b"II": "little", b"MM": "big"}[tiff[:2]]
    ifd = int.from_bytes(tiff[4:8], order)
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(tiff[ifd:ifd + 2], order), 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)  # a SHORT, first in its 4-byte field
    return 1


def read_header(data: bytes, mode: str) -> JpegHeader | None:
    """Read a JPEG's markers up to its scan: size, EXIF orientation (the first Exif block, as Pillow reads
    it) and the frame type. None when the data is not a JPEG or its markers cannot be followed (the
    general path then decodes, or reports, it). A tenth of the time of opening it with Pillow.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, orientation, frame = 2, None, None
    try:
        while data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0xDA:  # start of scan: every header marker is behind
                break
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            segment = data[pos + 4:pos + 2 + length]
            if marker == 0xE1 and orientation is None and segment[:6] == b"Exif\x00\x00":
                orientation = _exif_orientation(segment[6:])
            elif marker in _FRAMES and frame is None:  # precision, height, width, components
                frame = (marker, segment[0], int.from_bytes(segment[1:3], "big"),
                         int.from_bytes(segment[3:5], "big"), segment[5])
            pos += 2 + length
    except (IndexError, KeyError):  # cut short, or an Exif block in no byte order
        return None
    if frame is None or data[pos:pos + 2] != b"\xff\xda":
        return None
    marker, precision, height, width, components = frame
    decodable = (marker in _SEQUENTIAL_HUFFMAN and precision == 8 and mode in _COLORSPACE
                 and components == len(mode) and width > 0 and height > 0)  # "RGB": 3 components, "L": 1
    return JpegHeader(width, height, orientation or 1, decodable)


def dct_factor(box: Box, out_size: int) -> int:
    """The largest of 8, 4, 2 by which the box still covers `out_size` on both sides; 1 when none does."""
    return next((f for f in DCT_FACTORS if min(box[2], box[3]) >= f * out_size), 1)


def _stored_box(box: Box, header: JpegHeader) -> Box:
    """The upright box `box` in the stored image's frame: the same pixels before orientation."""
    top, left, height, width = box
    bottom, right = top + height - 1, left + width - 1
    last_row, last_col = header.height - 1, header.width - 1
    rows, cols = {  # the stored rows and columns each orientation shows the upright box from (`_ORIENT`)
        2: ((top, bottom), (last_col - right, last_col - left)),
        3: ((last_row - bottom, last_row - top), (last_col - right, last_col - left)),
        4: ((last_row - bottom, last_row - top), (left, right)),
        5: ((left, right), (top, bottom)),
        6: ((last_row - right, last_row - left), (top, bottom)),
        7: ((last_row - right, last_row - left), (last_col - bottom, last_col - top)),
        8: ((left, right), (last_col - bottom, last_col - top)),
    }.get(header.orientation, ((top, bottom), (left, right)))
    return rows[0], cols[0], rows[1] - rows[0] + 1, cols[1] - cols[0] + 1


def _decode_stored(data: bytes, header: JpegHeader, mode: str, box: Box, factor: int) -> np.ndarray:
    """The box `(top, left, height, width)` of the stored image decoded at 1/factor of its size (the box on
    that reduced grid), `[height, width, C]` uint8: the region alone where the extension is built and the
    file ends as a whole JPEG does; otherwise the whole image, then the cut. Raises ValueError on a bad file.
    """
    top, left, height, width = box
    if decode_region is not None and data.endswith(_END_OF_IMAGE):
        pixels = decode_region(data, top, left, height, width, factor, len(mode))
        return np.frombuffer(pixels, np.uint8).reshape(height, width, len(mode))
    full_height, full_width = math.ceil(header.height / factor), math.ceil(header.width / factor)
    pixels = simplejpeg.decode_jpeg(data, _COLORSPACE[mode], min_height=full_height, min_width=full_width)
    if pixels.shape[:2] != (full_height, full_width):  # a header that lies about the size
        raise ValueError(f"decoded {pixels.shape[1]}x{pixels.shape[0]}, the header says "
                         f"{header.width}x{header.height}")
    return pixels[top:top + height, left:left + width]


def crop_decode(data: bytes, mode: str, draw_box: DrawBox, max_pixels: int, out_size: int | None = None,
                min_side: int | None = None) -> torch.Tensor:
    """Decode the crop of an encoded image that `draw_box` picks from the image's size.

    Args:
        data: the encoded file.
        mode: `"RGB"` or `"L"`.
        draw_box: `(height, width) -> (top, left, height, width)` of the upright image; called once.
        max_pixels: a larger image is refused before decoding (ValueError).
        out_size: the side the crop will be resized to; with it, a box at least twice that side is decoded
            at 1/2, 1/4 or 1/8 scale (DCT scaling). None decodes at full size (the same pixels as
            decoding the whole image and cutting the box).
        min_side: the general path's reduced-size decoding (`decode_image`).

    Returns:
        uint8 `(C, h, w)`: the box's pixels, at full size or reduced by the DCT factor.

    Raises:
        whatever Pillow or libjpeg raise on a bad file (truncated data, a header that lies about the size).
    """
    header = read_header(data, mode)
    if header is None or not header.crop_decodable or header.width * header.height > max_pixels:
        image = decode_image(io.BytesIO(data), mode, max_pixels, min_side)
        top, left, height, width = draw_box(*image.shape[-2:])
        return image[:, top:top + height, left:left + width]
    box = draw_box(*header.upright_size)
    factor = dct_factor(box, out_size) if out_size else 1
    top, left, height, width = _stored_box(box, header)
    if factor > 1:  # the box on the reduced grid: every stored pixel it covers, rounded outwards
        bottom, right = math.ceil((top + height) / factor), math.ceil((left + width) / factor)
        top, left = top // factor, left // factor
        height, width = bottom - top, right - left
    pixels = _decode_stored(data, header, mode, (top, left, height, width), factor)
    crop = _upright(pixels, header.orientation)
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)  # [C, h, w]
