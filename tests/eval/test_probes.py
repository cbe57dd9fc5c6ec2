"""Linear probe, LARS and k-NN on separable synthetic features; top-k counting; the feature cache."""

import pytest
import torch

from mimkit.data.synthetic import SyntheticSource
from mimkit.data.transforms import eval_view
from mimkit.eval.features import cached_features
from mimkit.eval.knn import knn_accuracy, knn_scores
from mimkit.eval.lars import LARS
from mimkit.eval.linprobe import LinearProbe, probe_accuracy, train_linear_probe
from mimkit.eval.scores import topk_correct
from mimkit.models.classifier import pooled_features
from mimkit.models.vit import build_vit
from tests.conftest import perturb


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


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_linear_probe_separates_clusters(optimizer):
    x, y = clusters()
    test_x, test_y = clusters(seed=1)
    # LARS moves each matrix by ~lr * 1e-3 of its norm a step: it needs a far larger lr than SGD
    probe = train_linear_probe(x, y, 5, epochs=30, batch_size=64, optimizer=optimizer,
                               base_lr=0.1 if optimizer == "sgd" else 20.0, warmup_epochs=2)
    assert isinstance(probe[0], torch.nn.BatchNorm1d) and not probe[0].affine
    assert probe_accuracy(probe, test_x, test_y)["top1"] >= 95


def test_linear_probe_shapes():
    probe = LinearProbe(16, 5)
    assert probe(torch.randn(8, 16)).shape == (8, 5)


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


def test_linear_probe_decays_the_weights_only():
    """weight_decay reaches the linear weights, never the bias: on features that carry nothing (all zero) the
    bias learns the label frequencies alike with and without decay, and only the weights shrink."""
    features, labels = torch.zeros(64, 4), torch.tensor([0] * 48 + [1] * 16)
    plain, decayed = (train_linear_probe(features, labels, 2, epochs=3, batch_size=16, weight_decay=wd,
                                         warmup_epochs=0)[1] for wd in (0.0, 0.5))
    assert plain.bias[0] > plain.bias[1]  # the frequent class
    torch.testing.assert_close(decayed.bias, plain.bias, rtol=0, atol=0)
    assert decayed.weight.abs().sum() < plain.weight.abs().sum()


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
    assert sum(calls) == 6 and len(list(tmp_path.iterdir())) == 2  # 1 for `expected`; another pooling, file


def test_feature_cache_is_per_weights(tmp_path):
    """Features cached for an encoder are never read for the same architecture with other weights (a run
    trained further, or another run sharing --features-cache): the cache is named by the weights' values."""
    torch.manual_seed(0)
    encoder = build_vit(dict(embed_dim=32, depth=1, num_heads=2), img_size=16, patch_size=4, in_chans=3)
    source = SyntheticSource(n=8, image_size=16)
    view = eval_view(16, source.info.mean, source.info.std)
    before, _ = cached_features(encoder.eval(), source, view, "avg", "synthetic:train", tmp_path, [0, 1])
    perturb(encoder)  # the same names, shapes and dtypes; other values
    with torch.no_grad():
        expected = pooled_features(encoder, torch.stack([view(source[i][0])["image"] for i in (0, 1)]), "avg")
    after, _ = cached_features(encoder, source, view, "avg", "synthetic:train", tmp_path, [0, 1])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)
    assert len(list(tmp_path.iterdir())) == 2


def test_lars_steps_a_bias_by_plain_sgd_and_scales_a_matrix_by_its_trust_ratio():
    """LARS scales a weight matrix's step to the matrix's norm (eta |w| / |g + wd w|) and leaves a bias (any
    1-d parameter) a plain SGD step, without weight decay: MAE's linear probe."""
    weight, bias = torch.nn.Parameter(torch.full((2, 2), 2.0)), torch.nn.Parameter(torch.full((2,), 2.0))
    weight.grad, bias.grad = torch.ones(2, 2), torch.ones(2)
    LARS([weight, bias], lr=0.5, weight_decay=0.5, trust_coefficient=0.1).step()
    d = torch.ones(2, 2) + 0.5 * 2.0  # g + wd w: 2 everywhere
    torch.testing.assert_close(weight.detach(), 2.0 - 0.5 * 0.1 * 4.0 / d.norm() * d)  # |w| = 4
    torch.testing.assert_close(bias.detach(), torch.full((2,), 2.0 - 0.5))


def test_knn_scores_the_same_in_chunks_of_queries():
    """Queries scored a chunk at a time (bounded memory) get the votes they get all at once."""
    train, labels, queries = torch.randn(12, 4), torch.arange(12) % 3, torch.randn(5, 4)
    whole = knn_scores(train, labels, queries, 3, k=4)
    assert whole.shape == (5, 3)
    torch.testing.assert_close(knn_scores(train, labels, queries, 3, k=4, chunk=2), whole)
