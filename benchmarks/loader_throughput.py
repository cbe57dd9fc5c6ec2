"""Loader throughput per worker at ImageNet shapes: images/s of the mae_in1k training view (random resized
crop to 224, flip, normalize, mask noise) from tar shards, today's Pillow path against crop decoding, DCT
scaling, uint8 hand-over and packs with a maximum side; and the JPEG decoders that could do the decoding.

A DataLoader worker is one process with one torch thread, so the rate of one process with one thread
that reads, decodes and views samples in the loader's seeded order is the rate per worker; it is
reported per CPU second of that process (robust to other load on the machine). The rows are measured
interleaved, round after round in one process, and each row's median over the rounds is compared with
the first row's: on a shared machine the ratios hold where absolute rates drift.

Rows (all from shards of generated JPEGs, about 400x350, quality 90; smooth waves plus noise, so they
compress and decode like photographs; and one set at 1024x768):
    today            the whole image decoded by Pillow, then the view (float, normalized, in the worker)
    crop decode      the box drawn from the header, the whole image decoded by libjpeg-turbo (`simplejpeg`),
                     the box cut
    region decode    the box drawn from the header, only its rows and iMCU columns decoded (mimkit's C
                     extension, `mimkit.data._jpeg_region`; absent where it was not built, and then the
                     rows below name "crop decode": the path the loader takes is printed first)
    + DCT scaling    (on the loader's path) boxes at least twice the output decoded at 1/2, 1/4, 1/8
                     (`decode_min_side` set)
    + uint8          the worker hands over uint8; normalization is left to the device (timed apart, per
                     image, as it would run in the main process on CPU)
    max side N       the same from shards packed with `--max-side N` (`mimkit data pack`)
    MCU-indexed      region decode from shards packed with `--mcu-index` (a restart marker after every MCU):
                     only the MCUs around the box are decoded (where the C extension is built)

Checks printed with the rows: crop decode, and the MCU-indexed pack, against today on the same samples and
seeds (largest pixel difference of the views: 0 means bit-identical); DCT scaling against the full-size
decode (mean and largest difference of the 224-px uint8 views, on the large images where it applies).

    .venv/bin/python benchmarks/loader_throughput.py [--images 500] [--rounds 5] [--work DIR]
"""

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mimkit.data import crop_decode
from mimkit.data.decode import decode_image
from mimkit.data.loader import SeededViews, sample_seed
from mimkit.data.shards import pack_files
from mimkit.data.sources import build_source
from mimkit.data.transforms import mae_view

CROP = 224
PACK_SIDES = (256, 320, 512)
LOADER_PATH = "region decode" if crop_decode.decode_region else "crop decode"  # what the loader uses here


def make_images(folder: Path, n: int, size: tuple[int, int] | None = None, seed: int = 0) -> None:
    """n JPEGs, quality 90, in 10 class folders: ~400x350 (sides drawn around ImageNet's average), or
    `size` (width, height)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size or (int(rng.integers(300, 500)), int(rng.integers(260, 440)))
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        waves = [2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform())
                 for _ in range(3)]
        base = np.sin(np.stack(waves, -1))  # [h, w, 3]
        noise = rng.normal(0, 0.08, (h, w, 3))
        pixels = ((0.5 + 0.35 * base + noise).clip(0, 1) * 255).astype(np.uint8)
        path = folder / f"class_{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def shards_of(work: Path, name: str, n: int, size: tuple[int, int] | None, max_side: int | None,
              mcu_index: bool = False) -> str:
    """The spec of shards of generated images (made once in `work`)."""
    folder = work / f"images-{name}"
    if not folder.is_dir():
        make_images(folder, n, size)
    out = work / f"shards-{name}-{max_side or 'full'}{'-mcu' if mcu_index else ''}"
    if not out.is_dir():
        files = [Path(p) for p in build_source(str(folder)).paths]
        pack_files(files, folder, out, 256 * 2**20, max_side=max_side, mcu_index=mcu_index)
    return f"shards:{out}"


class DecodedFirst(torch.utils.data.Dataset):
    """A source without crop decoding: the whole image decoded by Pillow, as before issue #26."""

    def __init__(self, source):
        self.source, self.info = source, source.info

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.source[index]


def whole_image_decoding(run: Callable[[tuple[int, int]], object]) -> Callable[[tuple[int, int]], object]:
    """`run` with crop decoding's region decoder switched off: the whole image decoded, the box cut."""
    def without_region(item):
        region, crop_decode.decode_region = crop_decode.decode_region, None
        try:
            return run(item)
        finally:
            crop_decode.decode_region = region
    return without_region


def items(n_source: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """The loader's (index, seed) pairs for the first `count` samples of epoch 0."""
    order = torch.randperm(n_source, generator=torch.Generator().manual_seed(sample_seed(seed, 0, 0)))
    return [(int(order[p]), sample_seed(seed, 0, p + 1)) for p in range(count)]


def cpu_rate(run: Callable[[tuple[int, int]], object], picks: list[tuple[int, int]]) -> float:
    """Images per CPU second of this process."""
    cpu = time.process_time()
    for item in picks:
        run(item)
    return len(picks) / (time.process_time() - cpu)


def rows_for(spec_full: str, work: Path, name: str, n: int, size, view, with_packs: bool) -> dict:
    """`{row name: (callable over (index, seed), note)}` for one image set."""
    full = build_source(spec_full)
    scaled = build_source(spec_full, decode_min_side=3 * CROP)
    rows = {
        "today (Pillow, decode then crop)": SeededViews(DecodedFirst(full), view).__getitem__,
        "crop decode (whole image, then cut)": whole_image_decoding(SeededViews(full, view).__getitem__),
    }
    rows |= {
        LOADER_PATH: SeededViews(full, view).__getitem__,
        f"{LOADER_PATH} + DCT scaling": SeededViews(scaled, view).__getitem__,
        f"{LOADER_PATH} + uint8": SeededViews(full, view, uint8=True).__getitem__,
        f"{LOADER_PATH} + DCT scaling + uint8": SeededViews(scaled, view, uint8=True).__getitem__,
    }
    if crop_decode.decode_region:  # `--mcu-index` needs the C extension
        mcu = build_source(shards_of(work, name, n, size, None, mcu_index=True))
        rows |= {f"MCU-indexed pack + {LOADER_PATH}": SeededViews(mcu, view).__getitem__,
                 f"MCU-indexed pack + {LOADER_PATH} + uint8": SeededViews(mcu, view, uint8=True).__getitem__}
    if with_packs:
        for side in PACK_SIDES:
            packed = build_source(shards_of(work, name, n, size, side), decode_min_side=3 * CROP)
            views = SeededViews(packed, view, uint8=True)
            rows[f"max side {side} + {LOADER_PATH} + uint8"] = views.__getitem__
    return rows


def largest_difference(a: SeededViews, b: SeededViews, picks) -> tuple[float, float]:
    """(mean, largest) absolute difference of the uint8 views of the same samples."""
    diffs = [(a[item]["image"].float() - b[item]["image"].float()).abs() for item in picks]
    return statistics.mean(d.mean().item() for d in diffs), max(d.max().item() for d in diffs)


def decoder_rates(spec: str, picks, view, repeats: int) -> dict[str, float]:
    """ms per image to get the crop's pixels, by each decoder that is installed (the same boxes)."""
    source = build_source(spec)
    blobs, boxes = [], []
    for index, seed in picks:
        data = source.image_file(index).read()
        with Image.open(io.BytesIO(data)) as img:
            torch.manual_seed(seed)
            boxes.append(view.draw_box(img.height, img.width))
        blobs.append(data)

    def pillow(data, box):
        top, left, h, w = box
        return decode_image(io.BytesIO(data), "RGB")[:, top:top + h, left:left + w]

    def simplejpeg_full(data, box):
        import simplejpeg
        top, left, h, w = box
        return simplejpeg.decode_jpeg(data, "RGB")[top:top + h, left:left + w]

    def region(data, box):
        top, left, h, w = box
        return crop_decode.decode_region(data, top, left, h, w, 1, 3)

    decoders = {"Pillow (full decode, then crop)": pillow,
                "simplejpeg (full decode, then crop)": simplejpeg_full}
    if crop_decode.decode_region:
        decoders["mimkit region decode (the box's rows and iMCU columns)"] = region
    try:
        import turbojpeg

        jpeg = turbojpeg.TurboJPEG()

        def pyturbojpeg_full(data, box):
            top, left, h, w = box
            return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB)[top:top + h, left:left + w]

        def pyturbojpeg_lossless_crop(data, box):
            top, left, h, w = box  # crop to the MCU grid as a new JPEG, decode that, cut the rest
            x0, y0 = left // 16 * 16, top // 16 * 16
            part = jpeg.crop(data, x0, y0, left + w - x0, top + h - y0)  # PyTurboJPEG 1.x's lossless crop
            pixels = jpeg.decode(part, pixel_format=turbojpeg.TJPF_RGB)
            return pixels[top - y0:top - y0 + h, left - x0:left - x0 + w]

        decoders |= {"PyTurboJPEG (full decode, then crop)": pyturbojpeg_full,
                     "PyTurboJPEG (lossless crop, then decode)": pyturbojpeg_lossless_crop}
    except (ImportError, RuntimeError, OSError):  # not installed, or no libturbojpeg
        pass
    out = {}
    for name, decode in decoders.items():
        times = []
        for _ in range(repeats):
            cpu = time.process_time()
            for data, box in zip(blobs, boxes, strict=True):
                decode(data, box)
            times.append((time.process_time() - cpu) / len(blobs) * 1e3)
        out[name] = min(times)
    return out


def normalize_cost(view, repeats: int = 20) -> float:
    """ms per image of the on-device stage run on CPU in the main process, for a batch of 64."""
    batch = {"image": torch.randint(0, 256, (64, 3, CROP, CROP), dtype=torch.uint8)}
    cpu = time.process_time()
    for _ in range(repeats):
        view.on_device(batch)
    return (time.process_time() - cpu) / repeats / 64 * 1e3


def measure(rows: dict, picks, rounds: int) -> dict[str, list[float]]:
    rates = {name: [] for name in rows}
    for _ in range(rounds):  # interleaved: every row once per round
        for name, run in rows.items():
            rates[name].append(cpu_rate(run, picks))
    return rates


def report(title: str, rates: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(rates.values())))
    print(f"\n{title}\n| row | img/s per worker (CPU s), median | rounds min-max | vs today |\n"
          "|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / base:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="generated ~400x350 JPEGs")
    p.add_argument("--large-images", type=int, default=100, help="generated 1024x768 JPEGs")
    p.add_argument("--samples", type=int, default=150, help="samples timed per row and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--work", help="folder for the generated data (default: a temporary one)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    work = Path(a.work or tempfile.mkdtemp(prefix="loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    view = mae_view(CROP, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, patch_size=16)
    imagenet = shards_of(work, "imagenet", a.images, None, None)
    large = shards_of(work, "1024", a.large_images, (1024, 768), None)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"torch {torch.__version__}, 1 torch thread; {a.images} JPEGs ~400x350 and {a.large_images} at "
          f"1024x768, quality 90; {a.samples} samples per row and round, {a.rounds} rounds; the loader's "
          f"path: {LOADER_PATH}")
    picks = items(a.images, a.samples)
    full = build_source(imagenet)
    today = SeededViews(DecodedFirst(full), view).handing_over_uint8()
    check = items(a.images, min(100, a.images), seed=1)
    same = largest_difference(today, SeededViews(full, view, uint8=True), check)
    print(f"{LOADER_PATH} vs today, {len(check)} samples: mean |diff| {same[0]:.4f}, largest {same[1]:.0f} "
          "(uint8 levels)")
    if crop_decode.decode_region:
        mcu = build_source(shards_of(work, "imagenet", a.images, None, None, mcu_index=True))
        same = largest_difference(today, SeededViews(mcu, view, uint8=True), check)
        print(f"MCU-indexed pack + {LOADER_PATH} vs today, {len(check)} samples: mean |diff| {same[0]:.4f}, "
              f"largest {same[1]:.0f} (uint8 levels)")
    large_full = build_source(large)
    large_checks = items(a.large_images, min(100, a.large_images), seed=1)  # boxes >= 448 px: DCT scaled
    dct = largest_difference(SeededViews(DecodedFirst(large_full), view).handing_over_uint8(),
                             SeededViews(build_source(large, decode_min_side=3 * CROP), view, uint8=True),
                             large_checks)
    print(f"DCT scaling vs full-size decode, 1024x768, {len(large_checks)} samples (those with a box under "
          f"{2 * CROP} px are exact): mean |diff| {dct[0]:.2f}, largest {dct[1]:.0f} (uint8 levels)")
    print(f"on-device stage run on CPU (main process): {normalize_cost(view):.3f} ms per image")
    print("\ndecoders, ms per image for the crop's pixels (~400x350):")
    for name, ms in decoder_rates(imagenet, picks[:100], view, 3).items():
        print(f"  {name}: {ms:.3f}")
    small_rows = rows_for(imagenet, work, "imagenet", a.images, None, view, with_packs=True)
    report("~400x350 JPEGs from shards", measure(small_rows, picks, a.rounds))
    large_rows = rows_for(large, work, "1024", a.large_images, (1024, 768), view, with_packs=False)
    report("1024x768 JPEGs from shards", measure(large_rows, items(a.large_images, a.samples // 2), a.rounds))


if __name__ == "__main__":
    main()
