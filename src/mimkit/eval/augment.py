"""Fine-tuning augmentation: the per-image view and the per-batch mixup / cutmix with label smoothing.

Both draw from the global torch RNG: the view runs under the loader's per-sample seed, the batch mix
in the training step, whose RNG state the checkpoints keep. So a fine-tuning run resumes exactly.

- RandAugment: Cubuk et al., 2019, arXiv:1909.13719
- Random erasing: Zhong et al., 2017, arXiv:1708.04896
- mixup: Zhang et al., 2017, arXiv:1710.09412; CutMix: Yun et al., 2019, arXiv:1905.04899
- Recipe (values): MAE, arXiv:2111.06377, table 9; BEiT, arXiv:2106.08254, table 15
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mimkit.data.transforms import BICUBIC, ImageView, normalize
from mimkit.errors import MimkitError


def finetune_view(img_size: int, mean: Sequence[float], std: Sequence[float],
                  crop_scale: tuple[float, float] = (0.08, 1.0), rand_augment_ops: int = 2,
                  rand_augment_magnitude: int = 9, reprob: float = 0.25) -> ImageView:
    """Training view: random resized crop, horizontal flip, RandAugment, normalize, random erasing.

    Args:
        img_size: output side.
        mean, std: per-channel normalization (the encoder's).
        crop_scale: area range of the crop.
        rand_augment_ops: operations per image; 0 leaves RandAugment out.
        rand_augment_magnitude: of torchvision's 31 bins.
        reprob: probability of erasing a random rectangle (to 0, the mean after normalization).

    Returns:
        view: uint8 ``(C, H, W)`` -> ``{"image": float (C, img_size, img_size)}``.
    """
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise MimkitError(f"crop_scale {tuple(crop_scale)} must satisfy 0 < low <= high <= 1")
    steps = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=BICUBIC, antialias=True),
             v2.RandomHorizontalFlip()]
    if rand_augment_ops > 0:
        steps.append(v2.RandAugment(rand_augment_ops, rand_augment_magnitude))
    steps.append(normalize(mean, std))
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value=0.0))
    return ImageView(v2.Compose(steps))


class MixTargets:
    """Per batch, mixup or cutmix (one of those enabled, at random), then label smoothing.

    Args:
        num_classes: C.
        mixup: Beta(alpha, alpha) of mixup; 0 disables it.
        cutmix: Beta(alpha, alpha) of cutmix; 0 disables it.
        label_smoothing: epsilon; targets become ``(1 - eps) * mixed + eps / C``.

    Call:
        ``(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes))``.
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                 label_smoothing: float = 0.1):
        if mixup < 0 or cutmix < 0 or not 0 <= label_smoothing < 1:
            raise MimkitError(f"mixup {mixup} and cutmix {cutmix} must be >= 0 and label_smoothing "
                              f"{label_smoothing} in [0, 1)")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        mixes = [mix(alpha=alpha, num_classes=num_classes)
                 for mix, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
        self.mix = v2.RandomChoice(mixes) if mixes else self._one_hot

    def _one_hot(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, F.one_hot(labels, self.num_classes).float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.mix(images, labels)
        return images, targets * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
