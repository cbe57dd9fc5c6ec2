"""textured-scenes: a small segmentation set in the Pascal VOC layout, unlike fmnist-scenes, made on the spot.

Each scene is a 64x64 RGB image: a textured background (a sine grating, hard stripes, a checkerboard or
smooth noise, between two random colours) under 2 to 4 shapes of five classes (disk, square, triangle,
ring, cross), drawn one after the other so later ones cover earlier ones. Every shape is filled with a
texture of its own drawn the same way as the background's, so a class is its outline, never its colour
or texture, and an object is told from what lies around it by a change of texture. As in VOC, a ring of
255 ("ignore") marks the object borders: every pixel whose 3x3 neighbourhood holds two labels (2 px wide,
one on each side of a border).

Scene ``i`` of a split is a pure function of ``(split seed, i)`` (a numpy generator seeded by both), so a
set is the same on every machine. The folder is written to a temporary sibling and renamed into place, so
a folder that exists is complete:

    OUT/JPEGImages/<id>.jpg                 RGB 64x64, JPEG quality 90
    OUT/SegmentationClass/<id>.png          palette ('P') PNG, VOC's colours, index = label (0-5, 255)
    OUT/ImageSets/Segmentation/train.txt    the ids of each split
    OUT/ImageSets/Segmentation/val.txt
    OUT/classes.txt                         background + the five shapes

    .venv/bin/python benchmarks/textured_scenes.py --out /work/bench/textured-scenes --train 5000 --val 1000
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mimkit.viz import seg_palette

SIZE = 64
CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")
IGNORE = 255
OBJECTS = (2, 4)  # shapes per scene, both ends included
RADIUS = (7.0, 16.0)  # of a shape's circumscribed circle, px: from a sixth to half of the scene's side
TEXTURES = ("grating", "stripes", "checker", "noise")
NOISE = 0.03  # per-pixel Gaussian noise over the whole scene, so no region is perfectly flat
JPEG_QUALITY = 90
SPLIT_SEED = {"train": 0, "val": 1}

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5  # pixel centres


def texture(rng: np.random.Generator) -> np.ndarray:
    """A random texture between two random colours: float `(SIZE, SIZE, 3)` in [0, 1]."""
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    angle = rng.uniform(0, np.pi)
    along = _X * np.cos(angle) + _Y * np.sin(angle)  # [H, W] coordinate across the pattern's lines
    across = -_X * np.sin(angle) + _Y * np.cos(angle)
    if kind == "grating":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(4, 16) + rng.uniform(0, 2 * np.pi))
    elif kind == "stripes":
        t = (np.sin(2 * np.pi * along / rng.uniform(4, 16) + rng.uniform(0, 2 * np.pi)) > 0).astype(float)
    elif kind == "checker":
        cell = rng.uniform(3, 9)
        t = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(float)
    else:  # smooth noise: a coarse random grid, enlarged bilinearly
        coarse = (rng.uniform(size=(rng.integers(3, 10),) * 2) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR), np.float64) / 255
    low, high = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return low + (high - low) * t[..., None]


def shape_mask(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Where a shape of class `kind`, at a random place, size and rotation, covers the scene.

    Its centre may lie near the border, so shapes are sometimes cut by the frame.

    Returns:
        bool `(SIZE, SIZE)`.
    """
    r = rng.uniform(*RADIUS)
    cx, cy = rng.uniform(4, SIZE - 4, 2)
    angle = rng.uniform(0, 2 * np.pi)
    u = (_X - cx) * np.cos(angle) + (_Y - cy) * np.sin(angle)  # [H, W] the shape's own axes
    v = -(_X - cx) * np.sin(angle) + (_Y - cy) * np.cos(angle)
    if kind == "disk":
        return u**2 + v**2 <= r**2
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= r / np.sqrt(2)
    if kind == "triangle":  # equilateral, inscribed in the circle of radius r: three half-planes
        sides = [u * np.cos(a) + v * np.sin(a) <= r / 2 for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        return sides[0] & sides[1] & sides[2]
    if kind == "ring":  # the hole shows what lies under the ring
        return (u**2 + v**2 <= r**2) & (u**2 + v**2 >= (0.55 * r) ** 2)
    if kind == "cross":
        arm = 0.3 * r
        return ((abs(u) <= arm) & (abs(v) <= r)) | ((abs(v) <= arm) & (abs(u) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def borders(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood (clipped at the frame) holds another label: bool, same shape."""
    padded = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    shifted = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.any([s != labels for s in shifted], axis=0)


def make_scene(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """Scene `index` of the split seeded `seed`.

    Returns:
        `(image, labels, shapes)`: uint8 `(SIZE, SIZE, 3)`; uint8 `(SIZE, SIZE)` with 0 background, 1-5 the
        shapes of `CLASSES`, 255 the borders between labels; and each shape as drawn, in drawing order,
        before later ones covered it: `(label, bool (SIZE, SIZE))`.
    """
    rng = np.random.default_rng([seed, index])
    image = texture(rng)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    shapes = []
    for _ in range(rng.integers(OBJECTS[0], OBJECTS[1] + 1)):
        label = int(rng.integers(1, len(CLASSES)))
        covered = shape_mask(rng, CLASSES[label])
        image[covered] = texture(rng)[covered]  # later shapes cover earlier ones
        labels[covered] = label
        shapes.append((label, covered))
    image = np.clip(image + rng.normal(0, NOISE, image.shape), 0, 1)
    labels[borders(labels)] = IGNORE
    return (image * 255).round().astype(np.uint8), labels, shapes


def write_scenes(out: Path, counts: dict[str, int]) -> None:
    """Generate the set into `out` (which must not exist), in the Pascal VOC layout, atomically.

    Args:
        out: the folder to create.
        counts: scenes per split, e.g. `{"train": 5000, "val": 1000}`; ids are `<split>_<index:06d>`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    palette = seg_palette(256).flatten().tolist()  # VOC's colour map, 255 (the borders) included
    try:
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / folder).mkdir(parents=True)
        for split, count in counts.items():
            ids = [f"{split}_{i:06d}" for i in range(count)]
            for i, stem in enumerate(tqdm(ids, desc=f"textured-scenes {split}", unit="scene",
                                          dynamic_ncols=True)):
                image, labels, _ = make_scene(SPLIT_SEED[split], i)
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{stem}.jpg", quality=JPEG_QUALITY)
                mask = Image.fromarray(labels)
                mask.putpalette(palette)  # an 8-bit grey image becomes a palette one, indices kept
                mask.save(tmp / "SegmentationClass" / f"{stem}.png")
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to create (it must not exist)")
    parser.add_argument("--train", type=int, default=5000, help="training scenes")
    parser.add_argument("--val", type=int, default=1000, help="validation scenes")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; give a new --out (a finished set is never overwritten)")
    if args.train < 1 or args.val < 1:
        sys.exit("--train and --val must be at least 1")
    write_scenes(out, {"train": args.train, "val": args.val})
    print(f"{out}: {args.train} train + {args.val} val scenes, classes {', '.join(CLASSES)}")


if __name__ == "__main__":
    main()
