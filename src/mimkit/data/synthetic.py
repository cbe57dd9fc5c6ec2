"""Generated images with class-dependent structure, for tests and smoke runs."""

import math

import torch
from torch.utils.data import Dataset

from mimkit.data.source_info import SourceInfo, check_channels
from mimkit.errors import MimkitError


class SyntheticSource(Dataset):
    """Deterministic generated images that a classifier can learn, for tests and smoke runs.

    Image i is a sinusoidal grating plus noise, drawn from a generator seeded by `(seed, i)`, so any
    item can be made alone, in any process. Its class (`i % num_classes`) sets the grating's
    orientation (spread over 0-90 degrees, so a horizontal flip keeps classes apart) and its mean
    brightness; frequency, phase, contrast and noise are random.

    Args:
        n: number of images.
        channels: 1 or 3 (channels differ in contrast).
        image_size: side in pixels.
        num_classes: at least 1.
        seed: different seeds give different images (use one per split).

    Item:
        `(image uint8 (channels, image_size, image_size), label int in [0, num_classes))`.
    """

    def __init__(self, n: int = 256, channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 seed: int = 0):
        check_channels(channels)
        if n < 1 or num_classes < 1 or image_size < 1:
            raise MimkitError(f"synthetic source needs n, num_classes, image_size >= 1, got "
                              f"{n}, {num_classes}, {image_size}")
        self.n, self.channels, self.image_size, self.num_classes, self.seed = (
            n, channels, image_size, num_classes, seed)
        self.labels = [i % num_classes for i in range(n)]
        self.info = SourceInfo(
            name="synthetic", channels=channels, image_size=image_size, mean=(0.5,) * channels,
            std=(0.2,) * channels, num_classes=num_classes,
            classes=[f"class_{k}" for k in range(num_classes)],
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = self.labels[index]
        rand = lambda *shape: torch.rand(shape, generator=g)
        angle = (math.pi / 2) * (label + 0.25 + 0.5 * rand(1)) / self.num_classes
        cycles = 2.0 + 3.0 * rand(1)  # periods across the image
        coords = torch.arange(self.image_size, dtype=torch.float32) / self.image_size
        y, x = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
        along = x * torch.cos(angle) + y * torch.sin(angle)  # [S, S] position across the stripes
        wave = torch.sin(2 * math.pi * (cycles * along + rand(1)))
        brightness = 0.35 + 0.3 * label / max(self.num_classes - 1, 1)
        contrast = 0.15 + 0.15 * rand(self.channels, 1, 1)
        noise = 0.05 * torch.randn((self.channels, self.image_size, self.image_size), generator=g)
        img = brightness + contrast * wave + noise  # [C, S, S] in about [0, 1]
        return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8), label  # +0.5 then truncate: rounding

