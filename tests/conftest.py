"""Shared test set-up, and the helpers several test files use."""

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import idx

TINY_MAE_KWARGS = ("depth=2", "embed_dim=32", "num_heads=2", "decoder_depth=1", "decoder_embed_dim=32",
                   "decoder_num_heads=2")

# a tiny MAE in the reference code's argument names, and the flags that train one imported from it
TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)
IMPORT_SETS = ["--set", "model.kwargs.num_heads=2", "--set", "model.kwargs.decoder_num_heads=2",
               "--set", "data.source=synthetic:64", "--set", "data.num_workers=0"]

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="apt-get install dataset-fashion-mnist")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """``array`` (uint8) as an IDX file, gzipped unless ``compress`` is False."""
    payload = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def run_records(run_dir, is_main: bool = True) -> dict:
    """The checkpoints and metric records `mimkit.train.loop.train` keeps in ``run_dir`` (made here, as
    `mimkit.runner.open_run` makes a run's), as its keyword arguments."""
    from mimkit.train.checkpoint_files import Checkpoints
    from mimkit.train.metrics_log import MetricsLog

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return {"checkpoints": Checkpoints(run_dir), "metrics": MetricsLog(run_dir, enabled=is_main)}


def perturb(module: torch.nn.Module, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Move every parameter (but those whose names end with ``keep``) off its initialization: zero biases
    and unit norms hide mapping mistakes and wrong head counts. Eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith(keep):
                p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


def same_outcomes(a: list, b: list) -> bool:
    """Whether two lists of tensors and plain values are equal item by item (tensors in shape and value):
    the tests that trace a setting to its effect compare a run's outcomes with it."""
    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        return x == y
    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``mimkit ARGS`` as a DDP job of 2 gloo processes (``torchrun --standalone``, a free port), one thread
    each. A failed job fails the test with what both processes printed (``check=True`` would show only the
    exit status), and a hung one after ``timeout`` seconds instead of blocking the suite."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mimkit.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def voc_palette() -> list[int]:
    """Pascal VOC's colour map as a PIL palette (768 values): the bits of index i spread over the high bits
    of red, green and blue (1 -> dark red 128,0,0, 2 -> dark green, 255 -> 224,224,192). Written out here,
    not taken from mimkit, so that a mask's colours and its indices differ as they do in VOC's PNGs."""
    palette = []
    for index in range(256):
        rgb, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= (bits >> channel & 1) << shift
            bits >>= 3
        palette += rgb
    return palette


def assert_two_views_normalized(view, image_norm: tuple, tokenizer_norm: tuple) -> None:
    """A two-view sample (``image``, ``tokenizer_image``) of a uniform mid-grey uint8 image: each view is that
    grey normalized by its own (mean, std), so a view normalized the other's way shows (3 channels)."""
    grey = view(torch.full((3, 40, 40), 128, dtype=torch.uint8))
    for key, (mean, std) in (("image", image_norm), ("tokenizer_image", tokenizer_norm)):
        expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(grey[key], expected.view(3, 1, 1).expand_as(grey[key]))


def grid_size(columns: int, rows: int, side: int) -> tuple[int, int]:
    """Pixel size of an `image_grid` of ``side``-px tiles (upscaled to at least 112 px, 4 px apart,
    under an 18 px header)."""
    tile = side * max(1, 4 if side >= 64 else 112 // side)
    return columns * (tile + 4) + 4, 18 + rows * (tile + 4) + 4


class Points(torch.utils.data.Dataset):
    """32 labelled 1x2x2 'images'."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 255, (n, 1, 2, 2), generator=g, dtype=torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(i % 2)


def noisy_view(image):
    """Uses the global RNG, as augmentations do."""
    return {"image": image.float().flatten() / 255 + 0.01 * torch.randn(4)}


def regression_loss(model, batch):
    pred = model(batch["image"]).squeeze(-1)
    return ((pred - batch["label"].float()) ** 2).mean(), {"mean_pred": pred.mean()}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tiny models run fastest on one thread; two threads on a busy 2-core machine thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def private_data_cache(monkeypatch, tmp_path):
    """No MIMKIT_DATA from the environment and a private cache: nothing is read from or written to the
    user's folders."""
    monkeypatch.delenv("MIMKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch, private_data_cache) -> Path:
    """A folder holding a tiny MNIST (10 train images, one a class, and 4 test images), the only one the test
    can find (no download): data that only a ``root`` reaches."""
    def offline(name):
        raise RuntimeError("no network in the tests")

    monkeypatch.setattr(idx, "_download_idx", offline)
    root = tmp_path / "mine"
    root.mkdir()
    for prefix, n in (("train", 10), ("t10k", 4)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 8, 8), 100, np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    return root


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory):
    """A tiny MAE pretrained for 2 steps on synthetic data (32 px, 3 channels, 2 blocks of width 32): the
    encoder the evaluation tests read. Treat it as read-only."""
    run = tmp_path_factory.mktemp("eval") / "mae"
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "32", "--set", "data.num_workers=0", *tiny]) == 0
    return run


def every_evaluation_command(run: Path, tmp_path: Path) -> None:
    """Run each evaluation command on a pretraining run of synthetic 32-px images (``knn --layer all``,
    ``linprobe``, a one-step ``finetune`` and ``predict`` with it, a quick ``segment``), each to success: what
    every method's runs must take."""
    from tests.eval.test_segment import QUICK, write_layout  # that module imports this one

    probe = ["--data", "synthetic:64", "--num-workers", "0"]
    assert main(["knn", str(run), *probe, "--layer", "all", "--out", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", str(run), *probe, "--out", str(tmp_path / "lin"), "--epochs", "1"]) == 0
    assert main(["finetune", str(run), "--data", "synthetic:64", "--out", str(tmp_path / "ft"), "--max-steps",
                 "1", "--batch-size", "8", "--set", "data.num_workers=0"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), "gray").save(images / "a.png")
    assert main(["predict", str(tmp_path / "ft"), "--images", str(images), "--out",
                 str(tmp_path / "pred")]) == 0
    scenes = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    assert main(["segment", str(run), "--data", str(scenes), "--out", str(tmp_path / "seg"), *QUICK]) == 0


def photo(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth waves plus noise: compresses like a photograph, with detail everywhere a crop can land."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    waves = np.stack([np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y)) for _ in range(3)],
                     -1)
    pixels = (127 + 90 * waves + rng.normal(0, 12, waves.shape)).clip(0, 255).astype(np.uint8)
    return pixels[..., 0] if channels == 1 else pixels


def jpeg(pixels: np.ndarray, orientation: int = 1, **options) -> bytes:
    """`pixels` as a JPEG (quality 90 unless given) with EXIF `orientation`; Pillow's save options pass on."""
    img, buf = Image.fromarray(pixels), io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    img.save(buf, "JPEG", quality=options.pop("quality", 90), **options)
    return buf.getvalue()
