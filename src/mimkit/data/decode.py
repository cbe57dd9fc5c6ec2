"""Decoding one encoded image (a path or a binary file object) to a uint8 tensor, with EXIF orientation
applied, oversized files refused before decoding, and optional reduced-size decoding of large files."""

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

# PIL modes stored as one grey channel; the 16/32-bit ones are rescaled to 8 bits, not clipped.
GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# Above this many pixels a file is refused before it is decoded: 8192 x 8192 is already ~200 MB as RGB, and
# the decoder, the tensor and the view each hold a copy.
MAX_IMAGE_PIXELS = 8192 * 8192


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in _WIDE_GRAY_MODES:  # 16-bit grey: keep the top 8 bits (PIL's convert would clip)
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return img.convert(mode)


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Refuse an opened (not yet decoded) image above ``max_pixels`` (ValueError): a small file can hold a
    huge image, whose decoding would fill the memory."""
    width, height = img.size
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} pixels is above data.max_image_pixels={max_pixels}; "
                         "shrink the file or raise that limit")


def decode_image(file: str | Path | BinaryIO, mode: str, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int | None = None) -> torch.Tensor:
    """Decode one encoded image (a path or a binary file object) to uint8 `(C, H, W)` in `mode`.

    EXIF orientation is applied. An image above `max_pixels` is refused before decoding (ValueError); with
    `min_side`, a large image is decoded at a reduced size whose shorter side stays at least that (JPEG's
    DCT scaling through PIL's ``draft``, else ``reduce``). Raises whatever PIL raises on a bad file.
    """
    with Image.open(file) as img:
        width, height = img.size
        check_pixels(img, max_pixels)
        if min_side and (factor := min(img.size) // min_side) > 1:
            img.draft(None, (width // factor, height // factor))  # JPEG: decode at 1/2, 1/4 or 1/8
        if min_side and (factor := min(img.size) // min_side) > 1:  # before exif_transpose, which copies
            img = img.reduce(factor)
        return pil_to_tensor(to_mode(ImageOps.exif_transpose(img), mode))
