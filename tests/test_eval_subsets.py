"""Label-fraction subsets and validation hold-outs: stratified, reproducible, nested, disjoint."""

from collections import Counter

import pytest
import torch

from mimkit.data.sources import SyntheticSource
from mimkit.errors import MimkitError
from mimkit.eval.subsets import label_subset, make_splits

# 10 classes of unequal sizes: class c has 20 + 10 * c members
LABELS = [c for c in range(10) for _ in range(20 + 10 * c)]


def test_label_subset_is_stratified():
    picked = label_subset(LABELS, 0.1, seed=0)
    counts = Counter(LABELS[i] for i in picked)
    assert counts == {c: round(0.1 * (20 + 10 * c)) for c in range(10)}
    assert picked == sorted(set(picked))


def test_label_subset_keeps_one_per_class_and_all_at_one():
    assert Counter(LABELS[i] for i in label_subset(LABELS, 0.001)) == {c: 1 for c in range(10)}
    assert label_subset(LABELS, 1.0) == list(range(len(LABELS)))


def test_label_subset_is_reproducible_and_nested():
    assert label_subset(LABELS, 0.1, seed=3) == label_subset(LABELS, 0.1, seed=3)
    assert label_subset(LABELS, 0.1, seed=3) != label_subset(LABELS, 0.1, seed=4)
    small, large = set(label_subset(LABELS, 0.05, seed=1)), set(label_subset(LABELS, 0.3, seed=1))
    assert small < large


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_label_subset_rejects_bad_fractions(fraction):
    with pytest.raises(MimkitError, match="label fraction"):
        label_subset(LABELS, fraction)


def test_splits_are_disjoint_from_validation_and_the_same_for_every_caller():
    source = SyntheticSource(n=500, image_size=8)
    splits = make_splits(source, label_fraction=0.1, val_fraction=0.2, seed=0)
    assert not set(splits.train) & set(splits.val)
    assert len(splits.val) == 100 and len(splits.train) == 40
    assert Counter(source.labels[i] for i in splits.val) == {c: 10 for c in range(10)}
    assert Counter(source.labels[i] for i in splits.train) == {c: 4 for c in range(10)}
    assert make_splits(source, 0.1, 0.2, seed=0) == splits
    no_holdout = make_splits(source, label_fraction=1.0)
    assert no_holdout.train == list(range(500)) and no_holdout.val == []


def test_unlabelled_data_is_an_error():
    source = SyntheticSource(n=20, image_size=8)
    source.labels = torch.full((20,), -1)
    with pytest.raises(MimkitError, match="unlabelled"):
        make_splits(source)
