"""A user's own folder: training speed with the old and new defaults, and start-up with a stored file list.

Speed: a folder of 64x64 RGB JPEGs (generated, kept in --folder) pretrained by `mimkit pretrain mae` in a
fresh process per setting; images/s is the median of the logged per-step speeds after the first two steps.
    old    --config mae_in1k (ViT-B/16 at 224 px, 8 data workers), as a folder got before mae_small
    new    the folder's default: mae_small (ViT-Tiny/16 at 224 px when measured; ViT-Mini/16 since),
           workers capped at the usable CPUs
    new+auto-size   the same with --auto-size (64 px in 8-px patches)

Start-up: --list-files N tiny files (one small JPEG's bytes, copied) in a temporary folder, then the time
to get the run's train source listed afresh (walk, sort, store files.txt) and from the stored list.

    .venv/bin/python benchmarks/own_folder.py --images 3000 --steps 6 --list-files 100000
"""

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SETTINGS = {
    "old (mae_in1k, 224 px, 8 workers)": ["--config", "mae_in1k"],
    "new (mae_small, 224 px, capped workers)": [],
    "new + --auto-size (64 px, 8-px patches)": ["--auto-size"],
}


def make_folder(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(list(folder.glob("*.jpg"))), n):
        # smooth blobs plus noise: compresses like a photo, unlike pure noise
        low = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((64, 64), Image.BILINEAR), dtype=np.int16)
        img = (img + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def images_per_s(folder: Path, extra: list[str], steps: int, batch: int | None) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        batch_flag = ["--batch-size", str(batch)] if batch else []
        cmd = [sys.executable, "-m", "mimkit.cli", "pretrain", "mae", "--data", str(folder), "--out", out,
               "--max-steps", str(steps), "--set", "train.log_every=1", *batch_flag, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        speeds = [json.loads(line)["images_per_s"] for line in open(Path(out) / "metrics.jsonl")]
        machine = next(line for line in done.stdout.splitlines() if line.startswith("machine"))
        return statistics.median(speeds[2:]), machine


def startup(n: int) -> dict:
    from mimkit.data.filelist import train_source

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, "JPEG")
    tmp = Path(tempfile.mkdtemp(prefix="mimkit-list-"))
    try:
        folder = tmp / "data"
        for d in range(100):  # 100 sub-folders, as a large collection is usually split
            (folder / f"{d:03d}").mkdir(parents=True)
        for i in range(n):
            (folder / f"{i % 100:03d}" / f"{i:07d}.jpg").write_bytes(buf.getvalue())
        times = {}
        for name in ("listed afresh", "from the stored list"):
            start = time.perf_counter()
            source, _ = train_source(str(folder), tmp / "run")
            times[name] = time.perf_counter() - start
            assert len(source) == n
        return times
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/mimkit-own-folder", help="where the generated JPEGs are kept")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, help="the same batch for every setting (default: each recipe's)")
    p.add_argument("--list-files", type=int, default=100_000)
    a = p.parse_args()
    folder = Path(a.folder)
    make_folder(folder, a.images)
    for name, extra in SETTINGS.items():
        speed, machine = images_per_s(folder, extra, a.steps, a.batch_size)
        print(f"{name}: {speed:.1f} images/s  [{machine.split(maxsplit=1)[1]}]", flush=True)
    if a.list_files:
        for name, seconds in startup(a.list_files).items():
            print(f"{a.list_files} files, {name}: {seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
