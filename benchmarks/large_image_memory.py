"""Peak memory of reading one very large image through a folder source and the MAE crop view.

Writes a striped 13000 x 13000 PNG and 8000 x 8000 PNG and JPEG into a temporary folder, then reads each
in a fresh process: in full (the pixel cap raised), at the size a 224-pixel view needs
(``decode_min_side=672``), and with the default cap. Prints the peak resident memory of each.

    .venv/bin/python benchmarks/large_image_memory.py
"""

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CASES = [("13000.png", 0, 200_000_000), ("13000.png", 672, 200_000_000), ("13000.png", 672, 0),
         ("8000.png", 0, 0), ("8000.png", 672, 0), ("8000.jpg", 0, 0), ("8000.jpg", 672, 0)]


def write_images(folder: Path) -> None:
    Image.MAX_IMAGE_PIXELS = None
    for side, suffix in ((13000, "png"), (8000, "png"), (8000, "jpg")):
        pixels = np.zeros((side, side, 3), np.uint8)
        pixels[::7] = 200
        pixels[:, ::5, 1] = 90
        (folder / f"{side}-{suffix}").mkdir()
        Image.fromarray(pixels).save(folder / f"{side}-{suffix}" / f"{side}.{suffix}", compress_level=1,
                                     quality=90)


def read_one(folder: Path, decode_min_side: int, max_image_pixels: int) -> None:
    import warnings

    from mimkit.data.decode import MAX_IMAGE_PIXELS
    from mimkit.data.sources import build_source
    from mimkit.data.transforms import crop_view
    from mimkit.errors import MimkitError

    warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning above 89 megapixels
    source = build_source(str(folder), decode_min_side=decode_min_side or None,
                          max_image_pixels=max_image_pixels or MAX_IMAGE_PIXELS)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        image = source[0][0]
        crop_view(224, [0.5] * 3, [0.2] * 3)(image)
        outcome = "x".join(map(str, image.shape))
    except MimkitError as err:
        outcome = f"refused ({str(err).split(': ', 1)[1].split(';')[0]})"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {folder.name} | {decode_min_side or '-'} | {max_image_pixels or 'default'} | {outcome} | "
          f"{start:.0f} | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # folder, decode_min_side, max pixels
    parser.add_argument("--write", help=argparse.SUPPRESS)  # folder
    args = parser.parse_args()
    if args.one:
        read_one(Path(args.one[0]), int(args.one[1]), int(args.one[2]))
        return
    if args.write:
        write_images(Path(args.write))
        return
    with tempfile.TemporaryDirectory() as tmp:
        # every step in its own process: Linux carries a parent's peak RSS into a child it forks
        subprocess.run([sys.executable, __file__, "--write", tmp], check=True)
        print("| file | decode_min_side | max_image_pixels | decoded | RSS before (MB) | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        for name, min_side, max_pixels in CASES:
            folder = Path(tmp) / name.replace(".", "-")
            subprocess.run([sys.executable, __file__, "--one", str(folder), str(min_side), str(max_pixels)],
                           check=True)


if __name__ == "__main__":
    main()
