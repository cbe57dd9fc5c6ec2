"""Loader throughput per worker at ImageNet shapes: images/s of the mae_in1k training view (random resized
crop to 224, flip, normalize, mask noise) from a folder, tar shards and a Hugging Face dataset, with each
JPEG decoder worth trying.

A DataLoader worker is one process with one torch thread, so the rate of one process with one thread
that reads, decodes and views samples in the loader's seeded order is the rate per worker; it is
reported per CPU second of that process (robust to other load on the machine) and per wall-clock
second. The data: generated JPEGs of ImageNet-like sizes (about 400x350, quality 90; smooth waves plus
noise, so they compress and decode like photographs), 10 class folders.

Decoders (each replaces `mimkit.data.decode.decode_image` for its runs):
    pillow        PIL, as `mimkit.data.decode.decode_image` decodes
    pillow-draft  PIL with `Image.draft` asking for the smallest size that a 224 crop of scale >= 0.2 still
                  samples at full resolution (JPEG DCT scaling); it only shrinks images above ~1000 px
    torchvision   torchvision.io.decode_jpeg (libjpeg-turbo) straight to a uint8 tensor; deprecated since
                  torchvision 0.29 (a warning per call; TorchCodec replaces it)
    simplejpeg    simplejpeg.decode_jpeg (libjpeg-turbo) to numpy, if installed

Every decoder is checked against Pillow on the same samples and seeds (the crops and flips are the same
draws): the largest pixel difference of the decoded images, and the per-channel mean and std of the views,
which must stay within STATS_TOLERANCE (0.01 in normalized units) of Pillow's.

    .venv/bin/python benchmarks/loader_throughput.py [--images 2000] [--repeats 3] [--work DIR]
"""

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.data import decode
from mimkit.data.loader import SeededViews, sample_seed
from mimkit.data.shards import pack_files
from mimkit.data.decode import _to_mode
from mimkit.data.sources import build_source
from mimkit.data.transforms import mae_view

MIN_CROP_SIDE = 0.2**0.5  # the smallest crop of the mae_in1k view: area scale 0.2 (of either side, ~0.45)
CROP = 224
# A decoder "gives the same image statistics" when the per-channel mean and std of its views (normalized
# units) are within this of Pillow's, on the same samples and seeds.
STATS_TOLERANCE = 0.01


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs, ~400x350 (sides drawn around ImageNet's average), quality 90, in 10 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(300, 500)), int(rng.integers(260, 440))
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        waves = [2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform())
                 for _ in range(3)]
        base = np.sin(np.stack(waves, -1))  # [h, w, 3]
        noise = rng.normal(0, 0.08, (h, w, 3))
        pixels = ((0.5 + 0.35 * base + noise).clip(0, 1) * 255).astype(np.uint8)
        path = folder / f"class_{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def decode_pillow(file, mode: str) -> torch.Tensor:
    return decode.pil_to_tensor(_to_mode(decode.ImageOps.exif_transpose(Image.open(file)), mode))


def decode_pillow_draft(file, mode: str) -> torch.Tensor:
    with Image.open(file) as img:
        side = int(CROP / MIN_CROP_SIDE) + 1  # smaller would sample the smallest crop below 224 px
        img.draft(mode, (side, side))  # JPEG only; keeps both sides >= side
        return decode.pil_to_tensor(_to_mode(decode.ImageOps.exif_transpose(img), mode))


def _data(file) -> bytes:
    return Path(file).read_bytes() if isinstance(file, (str, Path)) else file.read()


def decode_torchvision(file, mode: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = _data(file)
    if data[:2] != b"\xff\xd8":  # not a JPEG
        return decode_pillow(io.BytesIO(data), mode)
    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=read_mode,
                       apply_exif_orientation=True)


def decode_simplejpeg(file, mode: str) -> torch.Tensor:
    import simplejpeg

    data = _data(file)
    if data[:2] != b"\xff\xd8":
        return decode_pillow(io.BytesIO(data), mode)
    array = simplejpeg.decode_jpeg(data, colorspace="RGB" if mode == "RGB" else "GRAY")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


DECODERS = {"pillow": decode_pillow, "pillow-draft": decode_pillow_draft, "torchvision": decode_torchvision,
            "simplejpeg": decode_simplejpeg}


def available_decoders() -> dict:
    out = dict(DECODERS)
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        out.pop("simplejpeg")
    return out


def make_sources(work: Path, n: int) -> dict:
    folder = work / "images"
    if not folder.is_dir():
        make_images(folder, n)
    specs = {"folder": str(folder)}
    if not (work / "shards").is_dir():
        pack_files([Path(p) for p in build_source(str(folder)).paths], folder, work / "shards", 256 * 2**20)
    specs["shards"] = f"shards:{work / 'shards'}"
    try:
        import datasets
    except ImportError:
        return {k: build_source(v) for k, v in specs.items()}
    if not (work / "hf").is_dir():
        paths = build_source(str(folder)).paths
        rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths],
                "label": [int(Path(p).parent.name.split("_")[1]) for p in paths]}
        datasets.Dataset.from_dict(rows, features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64")})).save_to_disk(str(work / "hf"))
    specs["hf"] = f"hf:{work / 'hf'}"
    return {k: build_source(v) for k, v in specs.items()}


def items(n_source: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """The loader's (index, seed) pairs for the first `count` samples of epoch 0."""
    order = torch.randperm(n_source, generator=torch.Generator().manual_seed(sample_seed(seed, 0, 0)))
    return [(int(order[p]), sample_seed(seed, 0, p + 1)) for p in range(count)]


def rate(views: SeededViews, picks: list[tuple[int, int]]) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for item in picks:
        views[item]
    return len(picks) / (time.perf_counter() - wall), len(picks) / (time.process_time() - cpu)


def decode_rate(source, picks) -> float:
    """Images decoded per CPU second."""
    cpu = time.process_time()
    for index, _ in picks:
        source.load(index)
    return len(picks) / (time.process_time() - cpu)


def statistics_of(views: SeededViews, picks) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([views[item]["image"] for item in picks])  # [N, 3, 224, 224]
    return images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="generated JPEGs")
    p.add_argument("--samples", type=int, default=400, help="samples timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per configuration; the best is kept")
    p.add_argument("--check", type=int, default=200, help="samples compared with Pillow")
    p.add_argument("--work", help="folder for the generated data (default: a temporary one)")
    p.add_argument("--decoders", nargs="+", choices=sorted(DECODERS),
                   help="the decoders to try (default: all)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision.io's, per call
    work = Path(a.work or tempfile.mkdtemp(prefix="loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_sources(work, a.images)
    view = mae_view(CROP, IMAGENET_MEAN, IMAGENET_STD, patch_size=16)
    picks = items(len(data["folder"]), a.samples)
    check = items(len(data["folder"]), a.check, seed=1)
    sizes = [Image.open(p).size for p in data["folder"].paths[:200]]
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"torch {torch.__version__}, 1 torch thread; {len(data['folder'])} JPEGs, mean size "
          f"{statistics.mean(w for w, _ in sizes):.0f}x{statistics.mean(h for _, h in sizes):.0f}, "
          f"{sum(Path(p).stat().st_size for p in data['folder'].paths) / len(data['folder']) / 1e3:.0f} KB")
    original = decode.decode_image
    try:
        decode.decode_image = decode_pillow
        reference = statistics_of(SeededViews(data["folder"], view), check)  # Pillow's view statistics
        for name, decoder in available_decoders().items():
            if a.decoders and name not in a.decoders:
                continue
            decode.decode_image = decoder
            pixels = max(int((decoder(p, "RGB").int() - decode_pillow(p, "RGB").int()).abs().max())
                         if decoder(p, "RGB").shape == decode_pillow(p, "RGB").shape else -1
                         for p in data["folder"].paths[:50])
            mean, std = statistics_of(SeededViews(data["folder"], view), check)
            drift = max((mean - reference[0]).abs().max().item(), (std - reference[1]).abs().max().item())
            best_decode = max(decode_rate(data["folder"], picks) for _ in range(a.repeats))
            verdict = "same statistics" if drift <= STATS_TOLERANCE else "DIFFERENT statistics"
            print(f"{name}: decode alone {best_decode:.1f} img/s per CPU second; vs pillow: max pixel diff "
                  f"{pixels}, view mean/std drift {drift:.4f} ({verdict}, tolerance {STATS_TOLERANCE})",
                  flush=True)
            for kind, source in data.items():
                views = SeededViews(source, view)
                wall, cpu = zip(*(rate(views, picks) for _ in range(a.repeats)), strict=True)
                print(f"  {kind:>7} {name:>13}: {max(cpu):6.1f} img/s per worker (CPU time), best wall-clock "
                      f"{max(wall):6.1f} img/s", flush=True)
    finally:
        decode.decode_image = original


if __name__ == "__main__":
    main()
