"""Which labelled images an evaluation may use: a validation hold-out and a label-fraction subset.

Both are pure functions of the labels and a seed, never of the model, so every method compared at
the same fraction trains on exactly the same images. Subsets are nested: with one seed, the 1%
subset lies inside the 10% subset, which lies inside 100%.

- Label-efficiency protocol: e.g. SimCLR v2, Chen et al., 2020, arXiv:2006.10029 (1% / 10% subsets)
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from mimkit.config import check_range
from mimkit.data.splits import shuffled_by_class, split_train_val
from mimkit.errors import MimkitError


def label_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """A stratified, seeded subset of labelled positions.

    Each class keeps ``max(1, round(fraction * n_class))`` of its members, chosen by a per-class
    shuffle; the shuffle depends only on ``labels`` and ``seed``, so a smaller fraction gives a
    subset of a larger one.

    Args:
        labels: (N,) class of each item.
        fraction: in (0, 1]; 1 keeps everything.
        seed: the shuffle's seed.

    Returns:
        Sorted positions into ``labels``.
    """
    check_range("the label fraction (--label-fraction)", fraction, 0, 1, low_open=True)
    labels = torch.as_tensor(labels)
    if fraction == 1:
        return list(range(len(labels)))
    keep = []
    for members in shuffled_by_class(labels, seed).values():
        keep += members[: max(1, round(fraction * len(members)))].tolist()
    return sorted(keep)


@dataclass(frozen=True)
class Splits:
    """Positions into a source's train split: what to train on, and the held-out validation part.

    Attributes:
        train: positions used for training (after the hold-out, then the label fraction).
        val: held-out positions, empty when the dataset's own validation split is used.
    """

    train: list[int]
    val: list[int]


def make_splits(source: Dataset, label_fraction: float = 1.0, val_fraction: float = 0.0,
                seed: int = 0) -> Splits:
    """Hold out ``val_fraction`` of a train split (if > 0), then keep ``label_fraction`` of the rest.

    The hold-out is `mimkit.data.splits.split_train_val` (stratified, seeded); the validation part
    never overlaps the training subset, and the subset at a given fraction is the same whatever model
    is evaluated.

    Args:
        source: a labelled train split with ``.labels``.
        label_fraction: in (0, 1].
        val_fraction: in [0, 1); 0 means no hold-out.
        seed: seed of both draws.
    """
    check_range("the val fraction (--val-fraction)", val_fraction, 0, 1, high_open=True)
    labels = torch.as_tensor(source.labels).tolist()
    if not labels or min(labels) < 0:
        raise MimkitError(f"evaluation needs labelled training images, but '{source.info.name}' is "
                          "unlabelled; use a folder with one sub-folder per class, fashion-mnist, mnist or "
                          "synthetic")
    if val_fraction > 0:
        train_part, val_part = split_train_val(source, val_fraction, seed)
        train, val = list(train_part.indices), list(val_part.indices)
    else:
        train, val = list(range(len(labels))), []
    kept = label_subset([labels[i] for i in train], label_fraction, seed)
    splits = Splits(train=[train[i] for i in kept], val=val)
    empty = sorted(set(range(source.info.num_classes)) - {labels[i] for i in splits.train})
    if empty:
        names = [source.info.classes[c] if c < len(source.info.classes) else str(c) for c in empty]
        warnings.warn(f"{len(empty)} of {source.info.num_classes} classes have no training image at label "
                      f"fraction {label_fraction} and val fraction {val_fraction} (e.g. {names[:5]}); their "
                      "images can never be predicted: use a larger fraction", stacklevel=2)
    return splits
