"""What a segmentation run learns about its data before the first step, and how it sizes itself to it.

`survey_seg_data` checks every evaluated val mask and a spread-out sample of the train masks (header, mode,
size against the image's header, labels), reads the sampled images' sizes, and collects the labels the masks
hold, without decoding one image: a bad mask stops the command before training, not at the final
evaluation. `seg_size_hint` gives the settings that fit images much smaller than the run's crop (what
``--auto-size`` applies); `label_hint` notices a data set that uses fewer labels than it names classes
(Pascal VOC's 21 names on a folder whose masks hold 0-5).
"""

import statistics
import time
from dataclasses import dataclass

from torch.utils.data import Subset

from mimkit.data.segmentation import SegSource, spread

TRAIN_MASKS_CHECKED = 500  # train masks checked at start-up (evenly spread); every evaluated val mask is
AUTO_SIZE_BATCH_STEPS = 8  # --auto-size: a batch small enough for this many steps per epoch of the split
SMALL_CROP = 256  # --auto-size: a crop of at most this many px gets the narrow heads of a small-image run


@dataclass(frozen=True)
class SegDataFacts:
    """What a segmentation run found in its data.

    Attributes:
        train_images, val_images: pairs in the train split and the evaluated part of the val split.
        train_checked: train masks checked (all of them, or an evenly spread sample).
        median: `(width, height)` of the checked images, the median per side.
        labels: the class ids found in the checked masks (255 left out).
        seconds: how long the check took.
    """

    train_images: int
    val_images: int
    train_checked: int
    median: tuple[int, int]
    labels: tuple[int, ...]
    seconds: float

    def describe_masks(self) -> str:
        train = ("all" if self.train_checked == self.train_images
                 else f"{self.train_checked} of {self.train_images}")
        runs = self.labels and self.labels[-1] - self.labels[0] == len(self.labels) - 1
        found = (f"labels {self.labels[0]}-{self.labels[-1]}" if runs
                 else f"labels {', '.join(map(str, self.labels)) or 'none'}")
        return (f"{self.train_checked + self.val_images} checked in {self.seconds:.1f} s (every val mask, "
                f"{train} train): {found} found (255 ignored)")


def _checked(source: SegSource | Subset) -> tuple[SegSource, list[int]]:
    """The underlying source of a split and the indices of it the run reads."""
    if isinstance(source, Subset):
        return source.dataset, list(source.indices)
    return source, list(range(len(source)))


def survey_seg_data(train: SegSource, val: SegSource | Subset,
                    train_samples: int = TRAIN_MASKS_CHECKED) -> SegDataFacts:
    """Check every mask of ``val`` (a source, or the subset the run evaluates) and ``train_samples``
    spread-out train masks; raises the first bad one as a one-line error naming its file.

    Returns:
        What was found (`SegDataFacts`).
    """
    start = time.perf_counter()
    val_source, val_indices = _checked(val)
    picks = spread(len(train), train_samples)
    val_check = val_source.check_masks(val_indices, desc="checking val masks")
    train_check = train.check_masks(picks, desc="checking train masks")
    sizes = train_check.sizes
    median = (statistics.median_low(w for w, _ in sizes), statistics.median_low(h for _, h in sizes))
    return SegDataFacts(len(train), len(val_indices), len(picks), median,
                        tuple(sorted(val_check.labels | train_check.labels)), time.perf_counter() - start)


def label_hint(facts: SegDataFacts, num_classes: int) -> str:
    """A hint when the masks hold only the first few of the classes the data set names (e.g. Pascal VOC's 21
    names on masks labelled 0-5), else ``""``."""
    if not facts.labels or facts.labels[-1] + 1 >= num_classes:
        return ""
    used = facts.labels[-1] + 1
    return (f"labels {facts.labels[0]}-{facts.labels[-1]} found, but the data set has {num_classes} classes: "
            f"--set seg.num_classes={used}? (or name them: --set 'seg.class_names=[...]' or a classes.txt)")


def fitting_crop(short_side: int, patch_size: int) -> int:
    """The largest crop of whole patches within ``short_side`` (at least one patch)."""
    return max(short_side // patch_size, 1) * patch_size


def seg_size_hint(facts: SegDataFacts, crop: int, patch_size: int, embed_dim: int,
                  batch_size: int, train_images: int) -> dict | None:
    """The settings that fit a run to small images, as ``--set`` keys; None when there is nothing to fit.

    For images at most half the run's ``crop``:
    - crop: the images' median shorter side in whole patches; base scale: the median image, so the random
      rescale (0.5-2x) moves around the images' own size;
    - whole-image evaluation at that scale (a sliding window over a small image is one window).
    For a crop (fitted or not) of at most `SMALL_CROP` px:
    - UperNet a quarter of the encoder's width and the auxiliary head half of it (at the papers' full
      width a small image's pyramid costs several times the encoder: `segment_fmnist`'s 32 and 64 for a
      128-wide encoder, the widths that showed pretraining's worth on textured-scenes);
    - the batch: no more than gives `AUTO_SIZE_BATCH_STEPS` steps an epoch of the ``train_images`` trained
      on; the lr follows it (lr = base_lr x global batch / 256).
    """
    side = min(facts.median)
    settings: dict = {}
    if side <= crop / 2:
        crop = fitting_crop(side, patch_size)
        long_side = round(max(facts.median) * crop / side)
        settings = {"seg.crop_size": crop, "seg.scale": [long_side, crop], "seg.eval_mode": "whole",
                    "seg.eval_scale": [long_side, crop]}
    if crop > SMALL_CROP:
        return settings or None
    return settings | {"seg.channels": max(embed_dim // 4, 16), "seg.aux_channels": max(embed_dim // 2, 16),
                       "train.batch_size": max(2, min(batch_size, train_images // AUTO_SIZE_BATCH_STEPS))}
