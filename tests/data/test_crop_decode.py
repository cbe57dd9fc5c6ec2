"""Crop decoding: the box drawn from a JPEG's header, only the crop decoded, and the same pixels as decoding
the whole image and cutting the box (DCT scaling aside); EXIF orientation, the files that take the general
path, and bad files."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from mimkit.data.crop_decode import crop_decode, dct_factor, read_header
from mimkit.data.decode import MAX_IMAGE_PIXELS, decode_image
from mimkit.data.folders import FlatFolderSource
from mimkit.data.loader import EpochBatches, SeededViews, build_loader
from mimkit.data.transforms import BICUBIC, mae_view, normalize
from mimkit.errors import MimkitError
from mimkit.eval.augment import FinetuneView
from tests.conftest import jpeg, photo

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def boxes(height: int, width: int, n: int = 12, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Random boxes, plus the whole image and boxes touching the far corner (partial MCUs at the edge)."""
    rng = np.random.default_rng(seed)
    out = [(0, 0, height, width), (height - 9, width - 13, 9, 13), (1, 1, height - 1, width - 1)]
    for _ in range(n):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        out.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return out


def decode_then_crop(data: bytes, mode: str, box) -> torch.Tensor:
    top, left, h, w = box
    return decode_image(io.BytesIO(data), mode)[:, top:top + h, left:left + w]


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("size", [(400, 350), (61, 37)])
def test_crop_decode_gives_the_pixels_of_decode_then_crop(subsampling, size):
    data = jpeg(photo(*size), subsampling=subsampling)
    assert read_header(data, "RGB").crop_decodable
    for box in boxes(size[1], size[0]):
        crop = crop_decode(data, "RGB", lambda h, w, box=box: box, MAX_IMAGE_PIXELS)
        assert torch.equal(crop, decode_then_crop(data, "RGB", box)), box


def test_crop_decode_of_a_grey_jpeg_and_restart_markers():
    grey = jpeg(photo(123, 77, channels=1))
    restarts = jpeg(photo(200, 150), restart_marker_blocks=3)
    for data, mode in ((grey, "L"), (restarts, "RGB")):
        assert read_header(data, mode).crop_decodable
        for box in boxes(*decode_image(io.BytesIO(data), mode).shape[1:]):
            assert torch.equal(crop_decode(data, mode, lambda h, w, box=box: box, MAX_IMAGE_PIXELS),
                               decode_then_crop(data, mode, box))


def test_a_crop_decodable_jpeg_above_the_pixel_cap_is_refused_and_one_at_it_decoded():
    data = jpeg(photo(64, 48))
    assert read_header(data, "RGB").crop_decodable
    whole = lambda h, w: (0, 0, h, w)  # noqa: E731
    assert crop_decode(data, "RGB", whole, max_pixels=64 * 48).shape == (3, 48, 64)
    with pytest.raises(ValueError, match="max_image_pixels=3071"):
        crop_decode(data, "RGB", whole, max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_decode_turns_the_box_for_exif_orientation_not_the_image(orientation):
    data = jpeg(photo(90, 60), orientation)
    upright = decode_image(io.BytesIO(data), "RGB")  # PIL's exif_transpose
    sizes = []

    def fixed(box):
        def draw(height, width):
            sizes.append((height, width))
            return box
        return draw

    for box in boxes(*upright.shape[1:], n=6):
        assert torch.equal(crop_decode(data, "RGB", fixed(box), MAX_IMAGE_PIXELS),
                           decode_then_crop(data, "RGB", box))
    assert set(sizes) == {tuple(upright.shape[1:])}  # the box is drawn on the upright size


def _png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _cmyk(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("kind,mode", [("png", "RGB"), ("progressive", "RGB"), ("cmyk", "RGB"),
                                       ("colour read as grey", "L")])
def test_other_files_take_the_decoding_path_of_today(kind, mode):
    pixels = photo(80, 50)
    data = {"png": lambda: _png(pixels), "progressive": lambda: jpeg(pixels, progressive=True),
            "cmyk": lambda: _cmyk(pixels), "colour read as grey": lambda: jpeg(pixels)}[kind]()
    header = read_header(data, mode)
    assert header is None if kind == "png" else not header.crop_decodable
    for box in boxes(50, 80, n=4):
        assert torch.equal(crop_decode(data, mode, lambda h, w, box=box: box, MAX_IMAGE_PIXELS),
                           decode_then_crop(data, mode, box))


def test_dct_scaling_applies_where_the_box_is_twice_the_output_and_stays_close():
    assert [dct_factor((0, 0, side, side), 224) for side in (447, 448, 900, 1792, 4000)] == [1, 2, 4, 8, 8]
    data = jpeg(photo(1024, 768))
    box = (10, 20, 700, 900)  # 700 >= 3 x 224: decoded at 1/2
    exact = v2.functional.resize(decode_then_crop(data, "RGB", box), [224, 224], interpolation=BICUBIC,
                                 antialias=True)
    scaled_crop = crop_decode(data, "RGB", lambda h, w: box, MAX_IMAGE_PIXELS, out_size=224)
    assert scaled_crop.shape == (3, 350, 450)
    scaled = v2.functional.resize(scaled_crop, [224, 224], interpolation=BICUBIC, antialias=True)
    difference = (scaled.float() - exact.float()).abs()
    assert 0 < difference.mean() < 2.0  # not the same pixels, but within a JPEG quality step of them
    odd = (11, 21, 700, 900)  # edges off the 1/2 grid: every stored pixel the box covers, rounded out
    assert crop_decode(data, "RGB", lambda h, w: odd, MAX_IMAGE_PIXELS, out_size=224).shape == (3, 351, 451)


def _folder(tmp_path, files: dict[str, bytes]):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _lying_about_its_height(data: bytes) -> bytes:
    sof = data.index(b"\xff\xc0")  # baseline start of frame: length(2) precision(1) height(2) width(2)
    return data[:sof + 5] + (4000).to_bytes(2, "big") + data[sof + 7:]


@pytest.mark.parametrize("bad", ["truncated", "truncated, end marker kept", "lying header"])
def test_a_bad_jpeg_stops_with_its_path_or_is_skipped_on_the_crop_decode_path(tmp_path, bad):
    good = jpeg(photo(64, 48))
    broken = {"truncated": lambda: good[:len(good) // 2],
              "truncated, end marker kept": lambda: good[:len(good) // 2] + b"\xff\xd9",  # region decoded
              "lying header": lambda: _lying_about_its_height(good)}[bad]()
    root = _folder(tmp_path, {"a.jpg": broken, "b.jpg": good, "c.jpg": jpeg(photo(64, 48, seed=1))})
    view = mae_view(32, MEAN, STD, patch_size=8)
    item = (0, 123)
    source = FlatFolderSource(root)
    with pytest.raises(MimkitError, match="a.jpg"):
        SeededViews(source, view)[item]
    skipping = FlatFolderSource(root, skip_bad_images=True)
    with pytest.warns(UserWarning, match="a.jpg"):
        got = SeededViews(skipping, view)[item]
    stand_in = SeededViews(FlatFolderSource(root), view)[(1, 123)]  # b.jpg under the same seed
    assert torch.equal(got["image"], stand_in["image"]) and torch.equal(got["noise"], stand_in["noise"])


def test_the_header_reader_takes_fill_bytes_and_exif_without_orientation_and_refuses_what_it_cannot_follow():
    """Fill bytes before a marker are skipped; an Exif block without the Orientation tag means upright;
    a file cut inside its markers, or an Exif block in no byte order, is left to the general path (None)."""
    data = jpeg(photo(40, 30))
    plain = read_header(data, "RGB")
    assert (plain.width, plain.height, plain.orientation, plain.crop_decodable) == (40, 30, 1, True)
    assert read_header(data[:2] + b"\xff\xff" + data[2:], "RGB") == plain
    maker = Image.Exif()
    maker[0x010F] = "camera"  # Make, no Orientation
    assert read_header(jpeg(photo(40, 30), exif=maker), "RGB") == plain
    exif = jpeg(photo(40, 30), orientation=6)
    assert read_header(exif, "RGB").upright_size == (40, 30)
    tiff = exif.index(b"Exif\x00\x00") + 6
    assert read_header(exif[:tiff] + b"XX" + exif[tiff + 2:], "RGB") is None
    assert read_header(data[:data.index(b"\xff\xda") - 3], "RGB") is None  # cut before its scan


def _with_a_second_exif_block(data: bytes, orientation: int) -> bytes:
    """`data` with another Exif block (APP1) after its first."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    block = exif.tobytes()
    first = data.index(b"\xff\xe1")
    end = first + 2 + int.from_bytes(data[first + 2:first + 4], "big")
    return data[:end] + b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block + data[end:]


def test_the_first_exif_blocks_orientation_counts_as_pillow_reads_it():
    data = _with_a_second_exif_block(jpeg(photo(40, 30), orientation=6), 3)
    assert read_header(data, "RGB").orientation == 6 == Image.open(io.BytesIO(data)).getexif()[0x0112]
    box = (2, 3, 20, 10)
    assert torch.equal(crop_decode(data, "RGB", lambda h, w: box, MAX_IMAGE_PIXELS),
                       decode_then_crop(data, "RGB", box))


class _DecodedFirst(torch.utils.data.Dataset):
    """The source without crop decoding: whole images decoded, as before crop decoding existed."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source[index]


def _old_mae_view(size, patch_size):
    """The MAE view as torchvision's transforms composed it before the view was cut into stages."""
    transform = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(), normalize(MEAN, STD)])
    return lambda image: {"image": transform(image), "noise": torch.rand((size // patch_size) ** 2)}


def test_crop_decoded_and_uint8_items_match_the_decode_then_view_pipeline(tmp_path):
    root = _folder(tmp_path, {f"{i}.jpg": jpeg(photo(120 + 7 * i, 90 + 5 * i, seed=i), orientation=1 + i % 8)
                              for i in range(6)})
    view = mae_view(32, MEAN, STD, patch_size=8)
    source = FlatFolderSource(root)
    crop_decoded = SeededViews(source, view)
    assert crop_decoded.crop_first
    old = SeededViews(_DecodedFirst(source), _old_mae_view(32, 8))
    for item in [(i, 1000 + i) for i in range(6)]:
        new, before = crop_decoded[item], old[item]
        assert torch.equal(new["image"], before["image"]) and torch.equal(new["noise"], before["noise"])
    batches = EpochBatches(6, 3, seed=5)
    float_batches = list(build_loader(old, batches))
    uint8_loader = build_loader(crop_decoded, batches, device=torch.device("cpu"))
    assert uint8_loader.dataset.uint8
    for got, want in zip(uint8_loader, float_batches, strict=True):
        assert got["image"].dtype == torch.float32 and torch.equal(got["image"], want["image"])
    assert next(iter(build_loader(crop_decoded.handing_over_uint8(), batches)))["image"].dtype == torch.uint8


def test_a_subset_of_encoded_images_is_crop_decoded_with_the_same_items(tmp_path):
    """A fine-tuning run trains on a label subset (a `Subset` of the source): its items are crop decoded
    too, each the item of its own image, for the MAE view and the fine-tuning view alike."""
    root = _folder(tmp_path, {f"{i}.jpg": jpeg(photo(100 + 9 * i, 80 + 6 * i, seed=i)) for i in range(6)})
    subset = torch.utils.data.Subset(FlatFolderSource(root), [4, 1, 3])
    for view in (mae_view(32, MEAN, STD, patch_size=8), FinetuneView(32, MEAN, STD)):
        crop_decoded, decoded = SeededViews(subset, view), SeededViews(_DecodedFirst(subset), view)
        assert crop_decoded.crop_first and not decoded.crop_first
        for item in [(i, 70 + i) for i in range(3)]:
            assert torch.equal(crop_decoded[item]["image"], decoded[item]["image"]), (view, item)
            assert crop_decoded[item]["label"] == decoded[item]["label"]
