"""Joint views for segmentation: one geometry applied to an image and its mask together.

A joint view is a callable `view(image uint8 (C, H, W), mask uint8 (H, W)) -> {"image": float (C, h, w),
"mask": int64 (h, w)}`. Like the image views of `mimkit.data.transforms` it draws only from the global
torch RNG, which `mimkit.data.loader.SeededViews` seeds per sample (it hands a source's mask to the view
along with the image), so the crops, flips and colour changes of a run are reproducible and a resumed run
is exact. Images are resized bilinearly, masks by nearest neighbour (pixel centres aligned, so a mask
stays on its image), and the mask's ignore index (255) fills padding.

- `SegTrainView`: the training pipeline of the BEiT / MAE ADE20K recipes (mmsegmentation's): random
  rescale of a base scale by a ratio in [0.5, 2.0], random crop retried while one class covers more than
  75% of it, horizontal flip, photometric distortion, normalize, pad to the crop size.
- `SegEvalView`: rescale the image to the base scale keeping its aspect, normalize; the mask is left at
  its original size, where the metrics are computed (the model's logits are resized to it), as the
  benchmark does.

- BEiT: Bao et al., 2021, arXiv:2106.08254 (appendix: ADE20K with UperNet, 512 crop, mmsegmentation)
- MAE: He et al., 2021, arXiv:2111.06377 (appendix A.4: ADE20K with UperNet, BEiT's segmentation code)
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mimkit.data.segmentation import IGNORE_INDEX
from mimkit.data.transforms import normalize
from mimkit.errors import MimkitError

BILINEAR = v2.InterpolationMode.BILINEAR
# NEAREST_EXACT samples at pixel centres, as bilinear does; plain NEAREST shifts masks by up to half a pixel.
NEAREST = v2.InterpolationMode.NEAREST_EXACT


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size that fits `(height, width)` into `scale` = (long side, short side), keeping the aspect.

    The factor is the largest that keeps the long side within `scale[0]` and the short side within
    `scale[1]` (mmsegmentation's `keep_ratio` resize), e.g. 640x480 into (2048, 512) -> 683x512.
    """
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _coin() -> bool:
    return torch.rand(()).item() < 0.5


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PhotometricDistortion:
    """Brightness, contrast, saturation and hue changes, each applied with probability 1/2.

    Contrast comes before or after the colour changes (a coin decides); saturation and hue are skipped on
    grey images. The ranges are mmsegmentation's: brightness +-32 of 255, contrast and saturation
    factors in [0.5, 1.5], hue +-18 of OpenCV's 180 steps (0.1 of the circle).

    Call: float image `(C, H, W)` in [0, 1] -> float image `(C, H, W)` in [0, 1].
    """

    def __init__(self, brightness: float = 32 / 255, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: float = 18 / 180):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def _contrast(self, image: torch.Tensor) -> torch.Tensor:
        return TF.adjust_contrast(image, _uniform(*self.contrast)) if _coin() else image

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if _coin():
            image = (image + _uniform(-self.brightness, self.brightness)).clamp(0, 1)
        contrast_first = _coin()
        if contrast_first:
            image = self._contrast(image)
        if image.shape[0] == 3:
            if _coin():
                image = TF.adjust_saturation(image, _uniform(*self.saturation))
            if _coin():
                image = TF.adjust_hue(image, _uniform(-self.hue, self.hue))
        if not contrast_first:
            image = self._contrast(image)
        return image

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness={self.brightness:.3f}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue:.3f})")


class SegTrainView:
    """Random rescale, class-balanced random crop, flip, photometric distortion, normalize, pad.

    Args:
        crop_size: side (or `(height, width)`) of the output.
        scale: base (long side, short side); each sample is rescaled to fit `ratio * scale`, keeping its
            aspect, with `ratio` uniform in `ratio_range` (ADE20K: (2048, 512)).
        mean, std: per-channel normalization.
        ratio_range: the rescale ratio's range.
        cat_max_ratio: a crop is drawn again (up to `crop_tries` times in all) while one class covers more
            than this fraction of its labelled pixels, or it holds one class only; the last draw stays.
            1 turns the retries off.
        crop_tries: draws of the crop at most.
        photometric: apply `PhotometricDistortion`.

    Call:
        `(image uint8 (C, H, W), mask uint8 (H, W))` -> `{"image": float32 (C, *crop_size),
        "mask": int64 crop_size}`; padding is 0 in the normalized image (the mean colour) and 255 in the mask.
    """

    def __init__(self, crop_size: int | Sequence[int], scale: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, crop_tries: int = 10, photometric: bool = True):
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise MimkitError(f"ratio_range={ratio_range} must be two positive numbers, low first")
        if crop_tries < 1:
            raise MimkitError(f"crop_tries={crop_tries} must be at least 1")
        self.crop_size, self.scale = _pair(crop_size), _pair(scale)
        self.ratio_range, self.cat_max_ratio, self.crop_tries = ratio_range, cat_max_ratio, crop_tries
        self.photometric = PhotometricDistortion() if photometric else v2.Identity()
        self.normalize = v2.Normalize(list(mean), list(std))

    def _rescale(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = _uniform(*self.ratio_range)
        size = rescaled_size(*image.shape[-2:], (round(self.scale[0] * ratio), round(self.scale[1] * ratio)))
        image = TF.resize(image, list(size), interpolation=BILINEAR, antialias=True)
        mask = TF.resize(mask[None], list(size), interpolation=NEAREST)[0]
        return image, mask

    def _crop_box(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a crop whose largest class covers at most `cat_max_ratio`."""
        height, width = mask.shape
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        for _ in range(self.crop_tries):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            labels = mask[top:top + crop_h, left:left + crop_w]
            counts = labels[labels != IGNORE_INDEX].bincount()
            counts = counts[counts > 0]
            balanced = len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()
            if balanced or self.cat_max_ratio >= 1:
                break
        return top, left, crop_h, crop_w

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        image, mask = self._rescale(image, mask)
        top, left, crop_h, crop_w = self._crop_box(mask)
        rows, cols = slice(top, top + crop_h), slice(left, left + crop_w)
        image, mask = image[:, rows, cols], mask[rows, cols]
        if _coin():
            image, mask = image.flip(-1), mask.flip(-1)
        image = self.normalize(self.photometric(TF.to_dtype(image, torch.float32, scale=True)))
        pad = (0, self.crop_size[1] - crop_w, 0, self.crop_size[0] - crop_h)  # right, then bottom
        return {"image": F.pad(image, pad, value=0.0),
                "mask": F.pad(mask.long(), pad, value=IGNORE_INDEX)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, "
                f"ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, "
                f"crop_tries={self.crop_tries}, photometric={self.photometric}, normalize={self.normalize})")


class SegEvalView:
    """Rescale the image to fit `scale` (keeping its aspect) and normalize; keep the mask as it is.

    Args:
        scale: (long side, short side) the image is fitted into (ADE20K: (2048, 512)); None keeps
            the image's size.
        mean, std: per-channel normalization.

    Call:
        `(image uint8 (C, H, W), mask uint8 (H, W))` -> `{"image": float32 (C, h, w), "mask": int64 (H, W)}`:
        the mask at the original size, where the metrics are computed.
    """

    def __init__(self, scale: Sequence[int] | None, mean: Sequence[float], std: Sequence[float]):
        self.scale = None if scale is None else _pair(scale)
        self.normalize = normalize(mean, std)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """The model input for one uint8 image `(C, H, W)` (also for images without a mask)."""
        if self.scale is not None:
            size = rescaled_size(*image.shape[-2:], self.scale)
            if size != tuple(image.shape[-2:]):
                image = TF.resize(image, list(size), interpolation=BILINEAR, antialias=True)
        return self.normalize(image)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.image(image), "mask": mask.long()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, normalize={self.normalize})"
