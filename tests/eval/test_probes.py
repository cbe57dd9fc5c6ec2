"""Linear probe, LARS and k-NN on separable synthetic features; top-k counting; the feature cache."""

import dataclasses
import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mimkit.cli import main
from mimkit.data.loader import eval_loader
from mimkit.data.sources import build_source
from mimkit.data.synthetic import SyntheticSource
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval import features as features_module
from mimkit.eval.config import KnnConfig, LinprobeConfig
from mimkit.eval.features import ProbeData, cached_features, extract_features, probe_data, weights_digest
from mimkit.eval.knn import knn_accuracy, knn_scores, run_knn
from mimkit.eval.lars import LARS
from mimkit.eval.linprobe import LinearProbe, probe_accuracy, run_linprobe, single_thread, train_linear_probe
from mimkit.eval.scores import (
    classification_accuracy,
    depth_results,
    prefixed,
    topk_correct,
    write_results,
    write_segmentation_results,
)
from mimkit.eval.subsets import make_splits
from mimkit.models.classifier import pooled_features
from mimkit.models.vit import build_vit
from mimkit.runs import load_encoder, read_run
from mimkit.train.metrics_log import read_metrics
from tests.conftest import TINY_MAE_KWARGS, perturb

# scores that rank class 0 first, then 1, 2, ..., 7, for 5 queries, and their labels: 2 top-1 hits (class 0),
# 2 more top-5 hits (classes 1 and 3), 1 miss (class 6); a top-2 count would find 3
RANKED_SCORES, RANKED_LABELS = torch.linspace(8, 1, 8).repeat(5, 1), torch.tensor([0, 1, 6, 0, 3])


def clusters(n_per_class=60, num_classes=5, dim=16, seed=0, scale=3.0):
    """Gaussian clusters around random centres, far apart relative to their spread, with an offset and
    an uneven scale per dimension (what BatchNorm in the probe is for)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * scale
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[labels] + torch.randn(len(labels), dim, generator=g)
    return x * torch.linspace(0.1, 10, dim) + 5.0, labels


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert topk_correct(scores, torch.tensor([1, 1, 0]), (1, 2, 5)) == [1, 2, 3]
    assert topk_correct(RANKED_SCORES, RANKED_LABELS) == [2, 4]  # top-1 and top-5 unless asked otherwise
    assert prefixed("val", {"top1": 1.0, "top5": 2.0}) == {"val_top1": 1.0, "val_top5": 2.0}


def test_classification_accuracy_scores_in_full_precision_on_the_cpu():
    """bfloat16 autocast is for CUDA only: on the CPU two logits 0.1% apart stay apart (in bfloat16 the
    weights 1.0 and 1.001 round to the same number, and the tie would go to class 0)."""
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [1.001]]))
    items = [{"image": torch.ones(1), "label": torch.tensor(1)}] * 4
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    assert classification_accuracy(model, loader, torch.device("cpu"))["top1"] == 100.0


def test_results_json_is_written_indented_into_a_new_or_an_existing_folder(tmp_path):
    """Folders above the run are made; a second write (a resumed run's) replaces the first."""
    path = write_results(tmp_path / "runs" / "probe", {"test_top1": 1.0})
    assert path == tmp_path / "runs" / "probe" / "results.json"
    write_results(tmp_path / "runs" / "probe", {"test_top1": 2.0})
    assert path.read_text() == '{\n  "test_top1": 2.0\n}\n'


def test_classification_accuracy_scores_the_model_as_at_inference():
    """A classifier handed over in train mode (dropout, drop path on) is scored in eval mode, and left so: the
    scores do not depend on the mode its caller's training left it in."""
    labels = torch.arange(40) % 4
    images = nn.functional.one_hot(labels, 4).float() + 1  # the label's logit 2, the others 1
    items = [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]
    loader = torch.utils.data.DataLoader(items, batch_size=8)
    model = nn.Dropout(0.9).train()  # in train mode 9 of 10 logits would be zeroed, the others scaled by 10
    torch.manual_seed(0)
    assert classification_accuracy(model, loader, torch.device("cpu")) == {"top1": 100.0, "top5": 100.0}
    assert not model.training


def test_classification_accuracy_counts_top1_and_top5_over_the_batches():
    """The ranked scores as a classifier's logits, in batches of 2: 2 of 5 top-1 hits, 4 of 5 top-5 hits."""
    items = [{"image": x, "label": y} for x, y in zip(RANKED_SCORES, RANKED_LABELS, strict=True)]
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    assert classification_accuracy(nn.Identity(), loader, torch.device("cpu")) == {"top1": 40.0, "top5": 80.0}


def test_the_results_files_name_the_best_block_and_keep_the_confusion_rows_as_truth(tmp_path):
    """``best_layer`` is the block of highest test top-1 (not the last); ``confusion.json`` keeps the matrix
    as given, rows truth, with the classes in order."""
    rows = [{"layer": 1, "test_top1": 50.0}, {"layer": 2, "test_top1": 70.0}, {"layer": 3, "test_top1": 60.0}]
    depth = depth_results(tmp_path, "knn", rows)
    assert depth == {"by_layer": rows, "best_layer": 2, "plot": "accuracy_by_depth.png"}
    assert (tmp_path / "accuracy_by_depth.png").is_file()
    scores = {"confusion": [[5, 1], [0, 2]], "per_class": [{"class": "sky"}, {"class": "road"}]}
    write_segmentation_results(tmp_path / "seg", {"mIoU": 1.0}, scores)
    assert json.loads((tmp_path / "seg" / "confusion.json").read_text()) == {
        "classes": ["sky", "road"], "rows_truth_columns_prediction": [[5, 1], [0, 2]]}
    assert json.loads((tmp_path / "seg" / "results.json").read_text()) == {"mIoU": 1.0}
    assert (tmp_path / "seg" / "confusion.png").is_file()


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_linear_probe_separates_clusters(optimizer):
    x, y = clusters()
    test_x, test_y = clusters(seed=1)
    # LARS moves each matrix by ~lr * 1e-3 of its norm a step: it needs a far larger lr than SGD
    probe = train_linear_probe(x, y, 5, epochs=30, batch_size=64, optimizer=optimizer,
                               base_lr=0.1 if optimizer == "sgd" else 20.0, warmup_epochs=2)
    assert isinstance(probe[0], torch.nn.BatchNorm1d) and not probe[0].affine
    assert probe_accuracy(probe, test_x, test_y)["top1"] >= 95


def test_linear_probe_shapes_and_initialization():
    """MAE's head: BatchNorm without affine parameters (eps 1e-6), a linear layer of std 0.01, zero bias."""
    probe = LinearProbe(16, 5)
    assert probe(torch.randn(8, 16)).shape == (8, 5)
    assert not probe[0].affine and probe[0].eps == 1e-6
    assert 0.005 < probe[1].weight.std() < 0.02 and not probe[1].bias.any()


def test_probe_accuracy_counts_top1_and_top5_and_leaves_the_probe_in_eval_mode():
    probe = nn.Sequential(nn.BatchNorm1d(8, affine=False)).train()
    assert probe_accuracy(probe, RANKED_SCORES, RANKED_LABELS) == {"top1": 40.0, "top5": 80.0}
    assert not probe.training


def test_single_thread_gives_the_threads_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class Records:
    """A stand-in for `MetricsLog`: keeps what is written."""

    def __init__(self):
        self.records = []

    def write(self, step, **values):
        self.records.append({"step": step, **values})


def test_linear_probe_lr_scales_with_the_batch():
    """lr = base_lr x batch / 256 (MAE's linear probe), then cosine to 0: 4 steps of batch 32, no warmup."""
    features, labels = clusters(n_per_class=16, num_classes=4)
    log = Records()
    train_linear_probe(features, labels, 4, epochs=2, batch_size=32, base_lr=0.1, warmup_epochs=0, log=log)
    lr = 0.1 * 32 / 256
    assert [r["lr"] for r in log.records] == pytest.approx([0.75 * lr, 0.0])  # each epoch's last step


def test_linear_probe_warms_up_over_epochs_not_steps():
    """4 steps an epoch, 2 warmup epochs: the lr ramps over 8 steps (each epoch's record: its last step)."""
    features, labels = clusters(n_per_class=8, num_classes=4)
    log = Records()
    train_linear_probe(features, labels, 4, epochs=4, batch_size=8, base_lr=0.1, warmup_epochs=2, log=log)
    lr = 0.1 * 8 / 256
    assert [r["lr"] for r in log.records[:2]] == pytest.approx([3 / 8 * lr, 7 / 8 * lr])


def test_linear_probe_starts_as_maes_a_normalization_without_affine_and_weights_of_std_0_01():
    """MAE's linear probe: BatchNorm without affine (eps 1e-6), then a linear layer of weights drawn with
    std 0.01 and a zero bias (paper constants written out, not read back from the module)."""
    torch.manual_seed(0)
    probe = LinearProbe(256, 200)
    assert (probe[0].affine, probe[0].eps) == (False, 1e-6)
    assert abs(float(probe[1].weight.detach().std()) - 0.01) < 0.0005 and not probe[1].bias.any()


def test_linear_probe_training_top1_counts_the_images_it_stepped_on():
    """10 images in batches of 4: 8 are stepped on each epoch (the last, incomplete batch is dropped), so a
    probe that fits them all reports 100 %, not 80 %."""
    features, labels = clusters(n_per_class=5, num_classes=2)
    log = Records()
    train_linear_probe(features, labels, 2, epochs=20, batch_size=4, base_lr=50.0, warmup_epochs=0, log=log)
    assert log.records[-1]["train_top1"] == 100.0


def test_linear_probe_decays_the_weights_only():
    """weight_decay reaches the linear weights, never the bias: on features that carry nothing (all zero) the
    bias learns the label frequencies alike with and without decay, and only the weights shrink."""
    features, labels = torch.zeros(64, 4), torch.tensor([0] * 48 + [1] * 16)
    plain, decayed = (train_linear_probe(features, labels, 2, epochs=3, batch_size=16, weight_decay=wd,
                                         warmup_epochs=0)[1] for wd in (0.0, 0.5))
    assert plain.bias[0] > plain.bias[1]  # the frequent class
    torch.testing.assert_close(decayed.bias, plain.bias, rtol=0, atol=0)
    assert decayed.weight.abs().sum() < plain.weight.abs().sum()


def test_linear_probe_steps_by_sgd_with_momentum_along_its_schedule():
    """On features that carry nothing (all zero) only the bias learns, and every step can be followed by hand:
    one step of all 64 images an epoch, lr 4.0 x 64 / 256 = 1 then cosine to 0, momentum 0.9; each epoch's
    record holds the loss before its step, its lr and the share of images the bias got right (class 0, the
    first of a tie at the start: 48 of 64)."""
    features, labels = torch.zeros(64, 4), torch.tensor([0] * 48 + [1] * 16)
    log = Records()
    probe = train_linear_probe(features, labels, 2, epochs=3, batch_size=64, base_lr=4.0, warmup_epochs=0,
                               log=log)
    frequency = torch.tensor([0.75, 0.25])
    bias, velocity, expected = torch.zeros(2), torch.zeros(2), []
    for lr in (1.0, 0.5, 0.0):
        expected.append({"step": len(expected) + 1, "loss": -(frequency * bias.log_softmax(0)).sum().item(),
                         "lr": lr, "train_top1": 75.0})
        velocity = 0.9 * velocity + bias.softmax(0) - frequency  # the mean gradient of the cross-entropy
        bias = bias - lr * velocity
    assert log.records == [pytest.approx(record) for record in expected]
    torch.testing.assert_close(probe[1].bias.detach(), bias)


def test_linear_probe_epoch_averages_its_steps_and_counts_each_image_once():
    """4 steps of 16 an epoch at an lr too small to move the bias from 0: every step's loss is log 2 whatever
    its labels, and the prediction (class 0) is right for the 48 images of class 0 among 64."""
    features, labels = torch.zeros(64, 4), torch.tensor([0] * 48 + [1] * 16)
    log = Records()
    train_linear_probe(features, labels, 2, epochs=2, batch_size=16, base_lr=1e-9, warmup_epochs=0, log=log)
    assert [r["loss"] for r in log.records] == pytest.approx([math.log(2)] * 2)
    assert [r["train_top1"] for r in log.records] == [75.0] * 2


def test_linear_probe_evaluates_every_eval_every_epochs_and_at_the_end():
    features, labels = clusters(n_per_class=8, num_classes=2)
    log = Records()
    train_linear_probe(features, labels, 2, epochs=5, batch_size=8, warmup_epochs=0, eval_every=2, log=log,
                       evaluate=lambda probe: {"val_top1": 50.0})
    assert [r["step"] for r in log.records if "val_top1" in r] == [2, 4, 5]


def test_an_evaluation_leaves_the_probes_training_alone():
    """Scoring the probe (in eval mode) after every epoch changes nothing in how it trains: each epoch trains
    in train mode again (BatchNorm on the batch's statistics)."""
    features, labels = clusters(n_per_class=8, num_classes=2)
    plain = train_linear_probe(features, labels, 2, epochs=3, batch_size=8, warmup_epochs=0)
    watched = train_linear_probe(features, labels, 2, epochs=3, batch_size=8, warmup_epochs=0, eval_every=1,
                                 evaluate=lambda probe: probe_accuracy(probe, features, labels))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(watched.state_dict()[name], value, rtol=0, atol=0)


def test_linear_probe_follows_its_seed_alone():
    """The probe's initialization and data order come from ``seed``, whatever the global random state."""
    features, labels = clusters(n_per_class=8, num_classes=2)
    weights = []
    for global_seed, seed in ((0, 3), (1, 3), (0, 4)):
        torch.manual_seed(global_seed)
        probe = train_linear_probe(features, labels, 2, epochs=2, batch_size=4, warmup_epochs=0, seed=seed)
        weights.append(probe[1].weight.detach())
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)
    assert not torch.equal(weights[2], weights[0])



def test_a_linear_probe_without_a_seed_takes_seed_0():
    features, labels = clusters(n_per_class=8, num_classes=2)
    probes = [train_linear_probe(features, labels, 2, epochs=1, batch_size=4, warmup_epochs=0, **seed)
              for seed in ({}, {"seed": 0})]
    torch.testing.assert_close(probes[0][1].weight, probes[1][1].weight, rtol=0, atol=0)

def test_linear_probe_refuses_an_unknown_optimizer():
    with pytest.raises(MimkitError, match="optimizer 'adam' is not one of sgd, lars"):
        train_linear_probe(torch.zeros(4, 2), torch.arange(4) % 2, 2, optimizer="adam")


def test_knn_separates_clusters_and_weights_by_similarity():
    x, y = clusters()
    test_x, test_y = clusters(seed=1)
    assert knn_accuracy(x, y, test_x, test_y, 5, k=20, temperature=0.07)["top1"] >= 95
    # one query equal to a class-2 point, its other neighbours of class 0: the exp(cos/T) weight wins
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([2, 0, 0, 0])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.05]]), 3, k=4, temperature=0.07)
    assert scores.shape == (1, 3) and scores.argmax().item() == 2


def test_knn_compares_directions_not_lengths():
    """Both sides are L2-normalized: a long training feature 45 degrees away is no nearer than a short one
    along the query (by the dot product it would be), and the vote weighs the cosine."""
    train, labels = torch.tensor([[1.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1])
    query = torch.tensor([[1.0, 0.1]])
    scores = knn_scores(train, labels, query, num_classes=2, k=1, temperature=0.1)
    cosine = 1.0 / query.norm()
    torch.testing.assert_close(scores, torch.stack([(cosine / 0.1).exp(), torch.tensor(0.0)])[None])


def test_feature_cache_extracts_each_image_once(tmp_path):
    torch.manual_seed(0)
    encoder = build_vit(dict(embed_dim=32, depth=1, num_heads=2), img_size=16, patch_size=4, in_chans=3)
    source = SyntheticSource(n=40, image_size=16)
    view = eval_view(16, source.info.mean, source.info.std)
    calls = []
    encoder.eval()
    forward = encoder.forward_features
    encoder.forward_features = lambda x: calls.append(len(x)) or forward(x)

    first, labels = cached_features(encoder, source, view, "avg", "synthetic:train", tmp_path, [3, 1, 2])
    assert sum(calls) == 3 and labels.tolist() == [source.labels[i] for i in (3, 1, 2)]
    again, _ = cached_features(encoder, source, view, "avg", "synthetic:train", tmp_path, [1, 2, 5])
    assert sum(calls) == 4  # only image 5 was new
    torch.testing.assert_close(again[:2], first[1:])
    with torch.no_grad():
        expected = pooled_features(encoder, torch.stack([view(source[5][0])["image"]]), "avg")
    torch.testing.assert_close(again[2:], expected)
    cached_features(encoder, source, view, "cls", "synthetic:train", tmp_path, [1])
    assert sum(calls) == 6  # 1 for `expected`; another pooling, another file, each named by data and pooling
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir()) == ["synthetic_train-avg",
                                                                            "synthetic_train-cls"]
    nothing, no_labels = cached_features(encoder, source, view, "avg", "synthetic:train", tmp_path, [])
    assert nothing.shape == (0, 32) and no_labels.shape == (0,) and sum(calls) == 6  # none asked, none made
    other_view = eval_view(16, [0.0] * 3, [1.0] * 3)  # another normalization: other features, another file
    other, _ = cached_features(encoder, source, other_view, "avg", "synthetic:train", tmp_path, [1])
    assert sum(calls) == 7 and not torch.allclose(other, first[1:2])


def test_feature_cache_is_per_weights(tmp_path):
    """Features cached for an encoder are never read for the same architecture with other weights (a run
    trained further, or another run sharing --features-cache): the cache is named by the weights' values. The
    cache folder is made with its parents; the encoder is put in eval mode."""
    torch.manual_seed(0)
    encoder = build_vit(dict(embed_dim=32, depth=1, num_heads=2), img_size=16, patch_size=4, in_chans=3)
    source = SyntheticSource(n=8, image_size=16)
    view = eval_view(16, source.info.mean, source.info.std)
    cache = tmp_path / "features" / "cache"
    before, _ = cached_features(encoder.eval(), source, view, "avg", "synthetic:train", cache, [0, 1])
    perturb(encoder)  # the same names, shapes and dtypes; other values
    with torch.no_grad():
        expected = pooled_features(encoder, torch.stack([view(source[i][0])["image"] for i in (0, 1)]), "avg")
    after, _ = cached_features(encoder.train(), source, view, "avg", "synthetic:train", cache, [0, 1])
    assert not encoder.training
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)
    assert len(list(cache.iterdir())) == 2


class Holder(nn.Module):
    """A module holding one tensor, as its buffer ``tensor``."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.register_buffer("tensor", tensor)


def test_weights_digest_tells_names_shapes_dtypes_and_values_apart():
    """Ones in five ways (names, shapes, dtypes, values): the caches of their features must differ."""
    ones = torch.ones(2, 3)
    modules = [Holder(ones), Holder(ones.reshape(3, 2)), Holder(ones.double()), Holder(2 * ones),
               nn.Sequential(Holder(ones))]
    assert len({weights_digest(module) for module in modules}) == 5
    assert weights_digest(Holder(ones.clone())) == weights_digest(modules[0])


def test_probe_data_reads_named_data_from_root_in_the_encoders_channels(mae_run, tmp_path, tiny_mnist):
    """Named IDX data is looked up in ``root`` first, and its grey images reach the 3-channel encoder as RGB:
    features of every train and test image."""
    data = probe_data(load_encoder(mae_run), "mnist", "avg", root=str(tiny_mnist),
                      cache_dir=tmp_path / "features")
    assert data.train[0].shape == (10, 32) and data.test[0].shape == (4, 32)
    assert data.test[1].tolist() == [0, 1, 2, 3]


def test_probe_data_reads_colour_data_grey_for_a_grey_encoder(tmp_path):
    """The other way round: a 1-channel encoder probed on RGB data (synthetic) gets its images converted to
    grey, train and test alike, rather than 3 channels it cannot take."""
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    run = tmp_path / "grey"
    assert main(["pretrain", "mae", "--data", "synthetic:8", "--out", str(run), "--max-steps", "1",
                 "--batch-size", "8", "--set", "data.num_workers=0", "--set", "data.channels=1", *tiny]) == 0
    with pytest.warns(UserWarning, match="2 of 10 classes have no training image"):  # 8 images, 10 classes
        data = probe_data(load_encoder(run), "synthetic:8", "avg", cache_dir=tmp_path / "features")
    assert data.train[0].shape == (8, 32) and data.test[0].shape[1] == 32


def test_probe_data_extracts_with_the_workers_asked_for_through_the_encoders_view(mae_run, tmp_path,
                                                                                 monkeypatch):
    """``num_workers`` reaches the loaders of the feature pass (train and test), not only `probe_data`; their
    view is the encoder's (its size, mean and std)."""
    asked, real = [], features_module.eval_loader

    def loader(source, view, batch_size, num_workers):
        asked.append((num_workers, repr(view)))
        return real(source, view, batch_size, 0)

    monkeypatch.setattr(features_module, "eval_loader", loader)
    encoder = load_encoder(mae_run)
    probe_data(encoder, "synthetic:16", "avg", num_workers=2, cache_dir=tmp_path)
    spec = encoder.spec.data
    assert spec.mean != spec.std and asked == [(2, repr(eval_view(spec.img_size, spec.mean, spec.std)))] * 2


@pytest.mark.parametrize("label_fraction, val_fraction, layers", [(1.0, 0.5, None), (0.5, 0.25, None),
                                                                    (0.5, 0.25, (1, 2))])
def test_each_part_of_probe_data_holds_the_features_and_labels_of_its_own_images(mae_run, tmp_path,
                                                                                 label_fraction, val_fraction,
                                                                                 layers):
    """Train, held-out val and test each hold the features of their own images, extracted afresh through the
    encoder's view: the label subset of the train split, the part held out of it (never the training
    subset's features again), the test split (same size as train here, so a cache shared between the splits
    would show). Final features and per-block features alike."""
    encoder = load_encoder(mae_run)
    data = probe_data(encoder, "synthetic:40", "avg", label_fraction=label_fraction,
                      val_fraction=val_fraction, seed=3, cache_dir=tmp_path / "features", layers=layers)
    spec = encoder.spec.data
    view = eval_view(spec.img_size, spec.mean, spec.std)
    train, test = build_source("synthetic:40", "train"), build_source("synthetic:40", "test")
    splits = make_splits(train, label_fraction, val_fraction, seed=3)
    assert splits.val and not set(splits.val) & set(splits.train)
    assert (len(splits.train) < 40 - len(splits.val)) == (label_fraction < 1)  # a subset of the rest
    for part, source, indices in [(data.train, train, splits.train), (data.val, train, splits.val),
                                  (data.test, test, range(40))]:
        loader = eval_loader(torch.utils.data.Subset(source, list(indices)), view, 8, 0)
        expected = extract_features(encoder.model, loader, "avg", torch.device("cpu"), layers=layers)
        torch.testing.assert_close(part[0], expected[0])
        assert part[1].tolist() == expected[1].tolist() == [source.labels[i] for i in indices]


def test_lars_steps_a_bias_by_plain_sgd_and_scales_a_matrix_by_its_trust_ratio():
    """LARS scales a weight matrix's step to the matrix's norm (eta |w| / |g + wd w|) and leaves a bias (any
    1-d parameter) a plain SGD step, without weight decay: MAE's linear probe. The gradient is not parallel
    to the weight, so the decay turns the step's direction, not only its length (which the trust ratio
    rescales)."""
    weight, bias = torch.nn.Parameter(torch.full((2, 2), 2.0)), torch.nn.Parameter(torch.full((2,), 2.0))
    weight.grad, bias.grad = torch.eye(2), torch.ones(2)
    LARS([weight, bias], lr=0.5, weight_decay=0.5, trust_coefficient=0.1).step()
    d = torch.eye(2) + 0.5 * 2.0  # g + wd w: [[2, 1], [1, 2]]
    torch.testing.assert_close(weight.detach(), 2.0 - 0.5 * 0.1 * 4.0 / d.norm() * d)  # |w| = 4
    torch.testing.assert_close(bias.detach(), torch.full((2,), 2.0 - 0.5))


@pytest.mark.parametrize("weight, grad", [(torch.zeros(2, 2), torch.ones(2, 2)),
                                          (torch.ones(2, 2), torch.zeros(2, 2))],
                         ids=["zero-weight", "zero-gradient"])
def test_lars_steps_a_matrix_unscaled_when_its_norm_or_its_steps_is_zero(weight, grad):
    """A trust ratio of 1 where either norm is 0 (a zero matrix, a gradient of zeros): no 0/0, no NaN."""
    param = nn.Parameter(weight.clone())
    param.grad = grad
    LARS([param], lr=0.5, trust_coefficient=0.1).step()
    torch.testing.assert_close(param.detach(), weight - 0.5 * grad)


def test_lars_accumulates_its_steps_with_the_momentum_asked_for():
    bias = nn.Parameter(torch.zeros(2))
    optimizer = LARS([bias], lr=1.0, momentum=0.5)
    for _ in range(2):
        bias.grad = torch.ones(2)
        optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.full((2,), -1.0 - (0.5 + 1.0)))  # 0.9 would give -2.9


def test_knn_scores_the_same_in_chunks_of_queries():
    """Queries scored a chunk at a time (bounded memory) get the votes they get all at once."""
    train, labels, queries = torch.randn(12, 4), torch.arange(12) % 3, torch.randn(5, 4)
    whole = knn_scores(train, labels, queries, 3, k=4)
    assert whole.shape == (5, 3)
    torch.testing.assert_close(knn_scores(train, labels, queries, 3, k=4, chunk=2), whole)


def test_knn_scores_cap_k_at_the_training_features():
    """k above the 3 training features: every one of them votes, as with k = 3."""
    train, labels, queries = torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(2, 4)
    torch.testing.assert_close(knn_scores(train, labels, queries, 2, k=20),
                               knn_scores(train, labels, queries, 2, k=3))


def test_knn_accuracy_counts_every_query_of_every_chunk_at_top1_and_top5():
    """One training feature per class along its own axis; every query points the same way, nearest to class 0,
    then 1, 2, ...: a query of class 0 is a top-1 hit, of classes 1 to 4 a top-5 hit, of 6 a miss. Five
    queries in chunks of 2, the first of them a hit."""
    train, labels = torch.eye(8), torch.arange(8)
    scores = knn_accuracy(train, labels, RANKED_SCORES, RANKED_LABELS, 8, k=8, chunk=2)
    assert scores == {"top1": 40.0, "top5": 80.0}


# k = the 10 training images: no warning that k is capped
PROBE_RUNS = {"knn": (run_knn, KnnConfig(data="mnist", k=10), 0, {"k": 10, "train_images": 10}),
              "linprobe": (run_linprobe, LinprobeConfig(data="mnist", epochs=2), 2,
                           {"feature_dim": 32, "epochs": 2, "weight_decay": 0.0, "train_images": 10})}


@pytest.mark.parametrize("protocol", PROBE_RUNS)
def test_a_probe_run_scores_its_held_out_part_beside_the_test_split(mae_run, tmp_path, protocol):
    """With ``--val-fraction`` the part held out of the training images is scored too (``val_*``), and the
    neighbours or the probe come from the rest only."""
    run, config, _, _ = PROBE_RUNS[protocol]
    config = dataclasses.replace(config, data="synthetic:40", cache_dir=str(tmp_path / "features"),
                                 val_fraction=0.5)
    results = run(load_encoder(mae_run), config, tmp_path / "out")
    assert {"val_top1", "val_top5", "test_top1", "test_top5"} <= results.keys()
    assert results["train_images"] == 20
    assert {"val_top1", "test_top1"} <= read_metrics(tmp_path / "out")[-1].keys()


@pytest.mark.parametrize("protocol", PROBE_RUNS)
def test_a_probe_run_scores_each_part_on_its_own_features(mae_run, tmp_path, monkeypatch, protocol):
    """The neighbours or the probe come from the training part alone, and each number from its own part: the
    held-out part is labelled against its clusters (0% top-1) and the test split with them (100%), so scoring
    one part on the other's features, or drawing neighbours from the held-out part, shows; ``train_images``
    counts the training part alone."""
    val_x, val_y = clusters(8, seed=1)
    parts = ProbeData(train=clusters(20), val=(val_x, (val_y + 2) % 5), test=clusters(8, seed=2),
                      num_classes=5)
    monkeypatch.setattr(f"mimkit.eval.{protocol}.probe_data", lambda *args, **kwargs: parts)
    run, config, _, _ = PROBE_RUNS[protocol]
    quick = {"epochs": 30, "batch_size": 64} if protocol == "linprobe" else {}
    config = dataclasses.replace(config, val_fraction=0.3, **quick)
    results = run(load_encoder(mae_run), config, tmp_path / "out")
    assert (results["val_top1"], results["test_top1"], results["train_images"]) == (0.0, 100.0, 100)


def test_a_knn_run_with_k_above_its_training_images_records_the_k_it_used(mae_run, tmp_path):
    config = KnnConfig(data="synthetic:40", k=50, val_fraction=0.5, cache_dir=str(tmp_path / "features"))
    with pytest.warns(UserWarning, match="k=50 is more than the 20 training images; k=20 is used"):
        results = run_knn(load_encoder(mae_run), config, tmp_path / "out")
    assert results["k"] == 20


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("protocol", PROBE_RUNS)
def test_a_probe_run_saves_its_kind_its_final_record_and_its_wall_time(mae_run, tmp_path, tiny_mnist,
                                                                       protocol):
    """The library call as the command makes it: the data from its ``root``, ``config.yaml`` (kind and
    settings) read back, the last metrics record (step 0 for k-NN, the last epoch for the linear probe)
    holding the results' numbers, the files it writes, the time it took; another's folder is refused unless
    forced."""
    run, config, step, expected = PROBE_RUNS[protocol]
    config = dataclasses.replace(config, root=str(tiny_mnist), cache_dir=str(tmp_path / "features"))
    encoder = load_encoder(mae_run)
    started = time.perf_counter()
    results = run(encoder, config, tmp_path / "out")
    assert 0 <= results["wall_s"] <= time.perf_counter() - started + 0.1
    assert expected.items() <= results.items()
    kind, saved = read_run(tmp_path / "out")
    assert kind.name == protocol and saved == config
    assert read_metrics(tmp_path / "out")[-1] == {"step": step, "test_top1": results["test_top1"],
                                                  "test_top5": results["test_top5"]}
    probe_file = ["probe.safetensors"] if protocol == "linprobe" else []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [".mimkit-out", "config.yaml", "metrics.jsonl", "results.json", *probe_file])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    with pytest.raises(MimkitError, match="--force"):
        run(encoder, config, tmp_path / "notes")


@pytest.mark.parametrize("layer", [None, "all"])
def test_each_written_probe_number_is_its_saved_probes_on_its_own_part(mae_run, tmp_path, monkeypatch, layer):
    """Each number results.json and metrics.jsonl give is the saved probe's on its own part: ``probe.
    safetensors`` (``probe-block{k}.safetensors`` for ``--layer all``), loaded and scored on that block's
    held-out and test features, gives that row's val and test numbers; the top level is the last block's.
    Block 1's features hold the clusters, block 2's noise, so their numbers differ."""
    train, val, test = clusters(20), clusters(8, seed=1), clusters(8, seed=2)
    noise = torch.Generator().manual_seed(3)

    def blocks(part):  # (N, 2, D): the clusters at block 1, noise at block 2
        return torch.stack([part[0], torch.randn(part[0].shape, generator=noise) * 50], 1), part[1]

    parts = (ProbeData(train=train, val=val, test=test, num_classes=5) if layer is None else
             ProbeData(train=blocks(train), val=blocks(val), test=blocks(test), num_classes=5, layers=(1, 2)))
    monkeypatch.setattr("mimkit.eval.linprobe.probe_data", lambda *args, **kwargs: parts)
    config = LinprobeConfig(data="mnist", epochs=30, batch_size=64, val_fraction=0.3, layer=layer)
    results = run_linprobe(load_encoder(mae_run), config, tmp_path / "out")
    rows = results.get("by_layer", [{"layer": None, **{k: v for k, v in results.items() if "top" in k}}])
    for block, part in parts.per_layer():
        row = next(r for r in rows if r["layer"] == block)
        probe = LinearProbe(16, 5)
        name = "probe.safetensors" if block is None else f"probe-block{block}.safetensors"
        probe.load_state_dict(load_file(str(tmp_path / "out" / name)))
        for split, (x, y) in (("val", part.val), ("test", part.test)):
            scored = probe_accuracy(probe, x, y)
            assert (row[f"{split}_top1"], row[f"{split}_top5"]) == (scored["top1"], scored["top5"]), split
    assert {k: results[k] for k in ("val_top1", "test_top1", "test_top5")} == {
        k: rows[-1][k] for k in ("val_top1", "test_top1", "test_top5")}
    logged = read_metrics(tmp_path / "out")[-1]
    assert (logged["test_top1"], logged["val_top1"]) == (rows[-1]["test_top1"], rows[-1]["val_top1"])
    if layer == "all":
        assert rows[0]["test_top1"] == 100.0 and rows[1]["test_top1"] < 60


def test_results_json_says_what_and_how_the_probe_measured(mae_run, tmp_path, monkeypatch):
    """results.json names the encoder, the data, the pooling, both fractions and the probe's settings (each
    one off its default here); metrics.jsonl holds the held-out scores taken while the probe trained, every
    10 epochs, before the final record."""
    parts = ProbeData(train=clusters(20), val=clusters(8, seed=1), test=clusters(8, seed=2), num_classes=5)
    monkeypatch.setattr("mimkit.eval.linprobe.probe_data", lambda *args, **kwargs: parts)
    settings = dict(data="mnist", pool="avg", label_fraction=0.5, val_fraction=0.3, seed=3, epochs=20,
                    base_lr=0.05, optimizer="lars", weight_decay=0.01)
    encoder = load_encoder(mae_run)
    results = run_linprobe(encoder, LinprobeConfig(batch_size=64, **settings), tmp_path / "out")
    assert {key: results[key] for key in settings} == settings
    assert results["encoder"] == encoder.origin and results["layer"] is None
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert [r["step"] for r in read_metrics(tmp_path / "out") if "val_top1" in r] == [10, 20, 20]


def test_probe_features_are_cached_in_the_encoder_runs_folder_by_default(mae_run, tmp_path, monkeypatch):
    """Without a cache folder the features go to the run's ``features/``, wherever the command runs."""
    run = shutil.copytree(mae_run, tmp_path / "run", ignore=shutil.ignore_patterns("features"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    probe_data(load_encoder(run), "synthetic:16", "avg")
    assert len(list((run / "features").glob("*.safetensors"))) == 2  # train and test
    assert list(elsewhere.iterdir()) == []


def test_probe_data_by_default_reads_in_this_process_and_draws_the_subset_of_seed_0(mae_run, tmp_path,
                                                                                   monkeypatch):
    """Without ``num_workers`` the feature pass loads in this process (`probe_data` and `cached_features`
    alike, in batches of 256 unless told); ``batch_size`` reaches the loaders; without ``seed`` the label
    subset is seed 0's (as `make_splits`')."""
    asked, real = [], features_module.eval_loader

    def loader(source, view, batch_size, num_workers):
        asked.append((batch_size, num_workers))
        return real(source, view, batch_size, 0)

    monkeypatch.setattr(features_module, "eval_loader", loader)
    encoder = load_encoder(mae_run)
    data = probe_data(encoder, "synthetic:40", "avg", label_fraction=0.5, cache_dir=tmp_path, batch_size=4)
    spec = encoder.spec.data
    view = eval_view(spec.img_size, spec.mean, spec.std)
    cached_features(encoder.model, build_source("synthetic:8", "train"), view, "avg", "other", tmp_path)
    assert asked == [(4, 0), (4, 0), (256, 0)]
    seeded = [probe_data(encoder, "synthetic:40", "avg", label_fraction=0.5, cache_dir=tmp_path, seed=seed)
              for seed in (0, 1)]
    assert torch.equal(data.train[0], seeded[0].train[0])
    assert not torch.equal(data.train[0], seeded[1].train[0])


def test_a_knn_run_records_each_of_its_settings_in_its_results(mae_run, tmp_path):
    config = KnnConfig(data="synthetic:40", pool="cls", k=5, temperature=0.5, label_fraction=0.5,
                       val_fraction=0.25, seed=3, cache_dir=str(tmp_path / "features"))
    encoder = load_encoder(mae_run)
    results = run_knn(encoder, config, tmp_path / "out")
    recorded = {k: results[k] for k in ("protocol", "encoder", "data", "pool", "layer", "label_fraction",
                                        "val_fraction", "seed", "k", "temperature")}
    assert recorded == {"protocol": "knn", "encoder": encoder.origin, "data": "synthetic:40", "pool": "cls",
                        "layer": None, "label_fraction": 0.5, "val_fraction": 0.25, "seed": 3, "k": 5,
                        "temperature": 0.5}
