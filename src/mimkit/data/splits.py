"""Holding out part of a source: stratified, seeded shuffles by class."""

import torch
from torch.utils.data import Dataset, Subset

from mimkit.errors import MimkitError


def shuffled_by_class(labels: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    """Each class's positions in ``labels``, shuffled with one generator seeded by ``seed`` (classes in
    sorted order): the stratified shuffle of every split and label subset."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        out[label] = members[torch.randperm(len(members), generator=g)]
    return out


def split_train_val(source: Dataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Hold out a fraction of a source, stratified by label when it is labeled.

    Each class (or the whole source, when unlabeled) is shuffled with `seed` and `round(fraction * n)`
    of it goes to val; indices stay in source order within each part.

    Args:
        source: a source with `.info` and `.labels`.
        val_fraction: in (0, 1).
        seed: the shuffle's seed; the same seed gives the same split.

    Returns:
        `(train, val)` `Subset`s, each with the source's `.info` and its own `.labels`.
    """
    if not 0 < val_fraction < 1:
        raise MimkitError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    labels = torch.as_tensor(list(source.labels))
    val = []
    for members in shuffled_by_class(labels, seed).values():
        val += members[: round(val_fraction * len(members))].tolist()
    val_set = set(val)
    train = [i for i in range(len(labels)) if i not in val_set]
    if not train or not val:
        raise MimkitError(f"val_fraction={val_fraction} of {len(labels)} images leaves an empty "
                          f"{'val' if not val else 'train'} part")
    parts = []
    for indices in (train, sorted(val)):
        part = Subset(source, indices)
        part.info, part.labels = source.info, labels[indices].tolist()
        parts.append(part)
    return parts[0], parts[1]
