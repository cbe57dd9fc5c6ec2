"""Fine-tuning augmentation: the per-image view and the per-batch mixup / cutmix with label smoothing, both
timm's own implementations, the ones the MAE and BEiT fine-tuning code runs.

timm's RandAugment, crop and random erasing draw from Python's ``random`` and NumPy's global RNG as well as
torch's, and its Mixup from NumPy's. `PythonSeeded` seeds both from the torch RNG around each call and puts
their state back after it: the view runs under the loader's per-sample torch seed, the batch mix in the
training step, whose torch RNG state the checkpoints keep. So a fine-tuning run still resumes exactly.

- RandAugment: Cubuk et al., 2019, arXiv:1909.13719 (timm's ``rand-m9-mstd0.5-inc1``: 2 operations at
  magnitude 9 of 10 with noise 0.5, increasing-severity variants)
- Random erasing: Zhong et al., 2017, arXiv:1708.04896 (``remode='pixel'``: per-pixel normal noise)
- mixup: Zhang et al., 2017, arXiv:1710.09412; CutMix: Yun et al., 2019, arXiv:1905.04899
- Recipe (values): MAE, arXiv:2111.06377, table 9; BEiT, arXiv:2106.08254, table 15
"""

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import functional as F
from torchvision.transforms import v2

from mimkit.config import check_crop_scale
from mimkit.data.transforms import StagedView, normalize
from mimkit.errors import MimkitError

RE_MODES = ("pixel", "rand", "const")


def python_seed() -> int:
    """A seed for Python's and NumPy's RNGs, drawn from the torch RNG (so seeding torch decides it)."""
    return int(torch.randint(2**32, (), dtype=torch.int64))


class PythonSeeded:
    """Runs ``fn`` with Python's ``random`` and NumPy's global RNG seeded by `python_seed`, then restores
    their state, so a per-sample (or per-step) torch seed decides everything ``fn`` draws."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        seed = python_seed()
        saved = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.fn(*args)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn})"


def timm_train_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                         crop_scale: tuple[float, float] = (0.08, 1.0),
                         auto_augment: str | None = "rand-m9-mstd0.5-inc1") -> tuple[Callable, Callable]:
    """timm's training transform as the MAE and BEiT fine-tuning code builds it (``create_transform``, no
    colour jitter), in the two stages timm hands to its GPU prefetcher: ``(crop, augment)``, the random
    resized crop (bicubic) and flip on a PIL image, then RandAugment and the conversion to a uint8 tensor."""
    check_crop_scale("augment", crop_scale)
    try:
        crop, augment, to_tensor = create_transform(
            img_size, is_training=True, scale=tuple(crop_scale), hflip=0.5, color_jitter=None,
            auto_augment=auto_augment or None, interpolation="bicubic", mean=tuple(mean), std=tuple(std),
            use_prefetcher=True, separate=True)
    except (AssertionError, ValueError, KeyError) as err:
        raise MimkitError(f"augment.auto_augment {auto_augment!r} is not a timm policy such as "
                          f"'rand-m9-mstd0.5-inc1' ({err})") from None
    return crop, v2.Compose([augment, to_tensor])


class FinetuneView(StagedView):
    """Training view: timm's random resized crop (bicubic), horizontal flip, RandAugment, normalize, random
    erasing, with every RNG it uses decided by the torch RNG (`PythonSeeded`).

    It is cut into the stages a loader runs in different places, as `mimkit.data.transforms.CropView` is
    (so a crop can be decoded from a JPEG's header, and workers hand over uint8):

    - `draw_box(height, width)`: timm's crop box, from the image's size alone;
    - `from_crop(crop)`: uint8 crop -> `{"image": uint8 (C, img_size, img_size)}`: resized (Pillow,
      bicubic), flipped and RandAugmented, as timm's workers do before its prefetcher;
    - `on_device(batch)`: float conversion, normalization and random erasing of an item or a batch
      `(..., C, H, W)`, where it lies (timm's prefetcher erases on the GPU too). Its draws come from the
      torch RNG of the process that runs it: the sample's seed in a worker, the training process's (which
      checkpoints keep) for a uint8 hand-over. So a run resumes exactly either way.

    Args:
        img_size: output side.
        mean, std: per-channel normalization (the encoder's).
        crop_scale: area range of the crop.
        auto_augment: a timm policy string (``rand-m9-mstd0.5-inc1``: MAE's and BEiT's); None leaves it out.
        reprob: probability of erasing a random rectangle.
        remode: what fills it: ``pixel`` (per-pixel normal noise, the papers'), ``rand`` (per channel),
            ``const`` (zeros, the mean after normalization).

    Call: uint8 ``(C, H, W)`` -> ``{"image": float (C, img_size, img_size)}``.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_scale: tuple[float, float] = (0.08, 1.0),
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 remode: str = "pixel"):
        if remode not in RE_MODES:
            raise MimkitError(f"augment.remode {remode!r} is not one of {', '.join(RE_MODES)}")
        crop_and_flip, self.augment = timm_train_transform(img_size, mean, std, crop_scale, auto_augment)
        self.crop, self.flip = crop_and_flip.transforms
        self.size = img_size
        self.normalize = normalize(mean, std)
        self.erasing = RandomErasing(reprob, mode=remode, max_count=1, device="cpu") if reprob > 0 else None

    def draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """`(top, left, height, width)` of timm's crop of an image of this size."""
        shape_only = torch.empty(()).expand(1, height, width)  # no memory: the draw reads the size only
        return PythonSeeded(self.crop.get_params)(shape_only, self.crop.scale, self.crop.ratio)

    def from_crop(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 `(C, h, w)` crop -> `{"image": uint8 (C, img_size, img_size)}`."""
        picture = F.resize(F.to_pil_image(crop), list(self.crop.size), self.crop.interpolation)
        return {"image": PythonSeeded(self.augment)(self.flip(picture))}

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalize and randomly erase the uint8 `"image"` of an item or a batch `(..., C, H, W)`."""
        images = self.normalize(batch["image"])
        if self.erasing:
            self.erasing.device = images.device  # the noise is drawn where the images lie
            images = PythonSeeded(self.erasing)(images)
        return batch | {"image": images}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop}, flip={self.flip}, augment={self.augment}, "
                f"normalize={self.normalize}, erasing={self.erasing})")


class MixTargets:
    """Per batch, timm's `Mixup`: mixup or cutmix (switching to cutmix with ``switch_prob`` when both are
    on) with probability ``prob``, then label smoothing; its NumPy draws are decided by the torch RNG.

    Args:
        num_classes: C.
        mixup: Beta(alpha, alpha) of mixup; 0 disables it.
        cutmix: Beta(alpha, alpha) of cutmix; 0 disables it.
        label_smoothing: epsilon; targets become ``(1 - eps) * mixed + eps / C``.
        switch_prob: the chance of cutmix rather than mixup when both are on (0.5 in MAE and BEiT).
        prob: the chance a batch is mixed at all (1.0 in MAE and BEiT).

    Call:
        ``(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes))``; with
        mixing on, B must be even (timm mixes the batch with its reverse); off, any B passes unchanged.
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                 label_smoothing: float = 0.1, switch_prob: float = 0.5, prob: float = 1.0):
        if mixup < 0 or cutmix < 0 or not 0 <= label_smoothing < 1:
            raise MimkitError(f"mixup {mixup} and cutmix {cutmix} must be >= 0 and label_smoothing "
                              f"{label_smoothing} in [0, 1)")
        if not (0 <= switch_prob <= 1 and 0 <= prob <= 1):
            raise MimkitError(f"mixup switch_prob {switch_prob} and prob {prob} must be in [0, 1]")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mix = None  # mixing off: no Mixup, only the smoothed targets (`__call__`)
        if mixup > 0 or cutmix > 0:
            self.mix = PythonSeeded(Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob,
                                          switch_prob=switch_prob, label_smoothing=label_smoothing,
                                          num_classes=num_classes))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None:  # timm's Mixup refuses an odd batch even when it has nothing to mix
            return images, mixup_target(labels, self.num_classes, smoothing=self.label_smoothing)
        if len(images) % 2:
            raise MimkitError(f"mixup and cutmix need an even batch, got {len(images)}; change "
                              "train.batch_size or turn augment.mixup and augment.cutmix off")
        return self.mix(images.clone(), labels)
