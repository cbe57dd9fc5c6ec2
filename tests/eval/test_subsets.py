"""Label-fraction subsets and validation hold-outs: stratified, reproducible, nested, disjoint; the seed
that picks them reaches them from the command line (``--seed``, ``--set labels.seed=N``)."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.data.synthetic import SyntheticSource
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


def test_data_with_some_unlabelled_images_is_an_error_too():
    """One image without a label (-1) would be trained on as a class that does not exist."""
    source = SyntheticSource(n=20, image_size=8)
    source.labels = torch.arange(20) % 2
    source.labels[3] = -1
    with pytest.raises(MimkitError, match="unlabelled"):
        make_splits(source)


def test_without_a_seed_the_subsets_are_those_of_seed_0():
    """What the configurations' default seed (0) picks, a caller of the functions gets too."""
    assert label_subset(LABELS, 0.1) == label_subset(LABELS, 0.1, seed=0)
    source = SyntheticSource(n=100, image_size=8)
    assert make_splits(source, 0.5, 0.2) == make_splits(source, 0.5, 0.2, seed=0)


def test_a_class_left_without_training_images_is_named_by_its_number_when_the_data_names_none():
    info = SimpleNamespace(name="mine", num_classes=3, classes=[])
    unnamed = SimpleNamespace(labels=[1, 1, 2, 2], info=info)
    with pytest.warns(UserWarning, match=r"1 of 3 classes have no training image .* \(e.g. \['0'\]\)"):
        make_splits(unnamed)


def test_a_class_held_out_whole_is_named_as_left_without_training_images():
    """The hold-out takes a one-image class's only image (0.6 of 1 rounds to 1): it is in the data's labels
    but never trained on, and the warning says so."""
    info = SimpleNamespace(name="mine", num_classes=2, classes=["shirt", "boot"])
    source = SimpleNamespace(labels=[0, 0, 0, 0, 0, 1], info=info)
    with pytest.warns(UserWarning, match=r"1 of 2 classes have no training image .* \(e.g. \['boot'\]\)"):
        splits = make_splits(source, val_fraction=0.6)
    assert 5 in splits.val


def test_the_seed_picks_the_subset_and_the_holdout():
    source = SyntheticSource(n=500, image_size=8)
    for val_fraction in (0.0, 0.2):
        one = make_splits(source, 0.1, val_fraction, seed=1)
        assert make_splits(source, 0.1, val_fraction, seed=1) == one
        other = make_splits(source, 0.1, val_fraction, seed=2)
        assert set(other.train) != set(one.train)
        assert set(other.val) != set(one.val) or val_fraction == 0


def probe_train_rows(command: str, mae_run, tmp_path, name: str, seed: int) -> list[int]:
    """The training images a probe run at 10% of the labels encoded: the rows its feature cache filled."""
    cache = tmp_path / f"cache-{name}"
    epochs = ["--epochs", "1"] if command == "linprobe" else []
    assert main([command, str(mae_run), "--data", "synthetic", "--out", str(tmp_path / name),
                 "--label-fraction", "0.1", "--seed", str(seed), "--features-cache", str(cache),
                 "--num-workers", "0", *epochs]) == 0
    [train_cache] = cache.glob("synthetic_train-*.safetensors")
    assert len(list(cache.glob("synthetic_test-*.safetensors"))) == 1
    return load_file(str(train_cache))["have"].nonzero().flatten().tolist()


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_probe_seed_flag_picks_the_subset(mae_run, tmp_path, command):
    """For both probes: the linear probe's seed also seeds its probe, which hides from
    `test_probe_settings.py` a seed that misses the subset."""
    first = probe_train_rows(command, mae_run, tmp_path, "a", seed=1)
    assert len(first) == round(0.1 * len(SyntheticSource()))
    assert probe_train_rows(command, mae_run, tmp_path, "b", seed=1) == first
    assert probe_train_rows(command, mae_run, tmp_path, "c", seed=2) != first


class SplitsChosen(Exception):
    """Stops a fine-tuning run once it has chosen its training images."""


def finetune_train_images(mae_run, tmp_path, monkeypatch, *flags: str) -> list[int]:
    chosen = []

    def record(*args, **kwargs):
        chosen.append(make_splits(*args, **kwargs).train)
        raise SplitsChosen

    monkeypatch.setattr("mimkit.eval.finetune.make_splits", record)
    with pytest.raises(SplitsChosen):
        main(["finetune", str(mae_run), "--data", "synthetic", "--out", str(tmp_path / "ft"),
              "--label-fraction", "0.1", "--set", "data.num_workers=0", *flags])
    return chosen[0]


def test_finetune_labels_seed_picks_the_subset(mae_run, tmp_path, monkeypatch):
    first = finetune_train_images(mae_run, tmp_path, monkeypatch, "--set", "labels.seed=1")
    assert finetune_train_images(mae_run, tmp_path, monkeypatch, "--set", "labels.seed=1") == first
    assert finetune_train_images(mae_run, tmp_path, monkeypatch, "--set", "labels.seed=2") != first
    assert finetune_train_images(mae_run, tmp_path, monkeypatch) == make_splits(
        SyntheticSource(), 0.1, 0.0, seed=0).train  # the default seed is 0
