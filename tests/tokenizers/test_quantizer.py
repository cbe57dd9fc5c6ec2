import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mimkit.errors import MimkitError
from mimkit.tokenizers.quantizer import NormEMAQuantizer, spherical_kmeans


def quantizer(codebook: torch.Tensor, **kwargs) -> NormEMAQuantizer:
    """A quantizer holding `codebook` (rows normalized), past its k-means initialisation."""
    q = NormEMAQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    q.codebook.copy_(F.normalize(codebook, dim=1))
    q.initialized.fill_(True)
    return q


def test_outputs_are_unit_codes_of_the_codebook():
    torch.manual_seed(0)
    q = quantizer(torch.randn(16, 8))
    z = torch.randn(2, 5, 8) * 3  # any scale
    for mode in (False, True):
        q.train(mode)
        before = q.codebook.clone()
        quantized, ids, _, _ = q(z)
        assert quantized.shape == (2, 5, 8) and ids.shape == (2, 5)
        torch.testing.assert_close(quantized, before[ids])  # the codes chosen, before any update
        torch.testing.assert_close(quantized.norm(dim=-1), torch.ones(2, 5))
        # the nearest code on the sphere: highest cosine similarity
        assert torch.equal(ids, (F.normalize(z, dim=-1) @ before.T).argmax(-1))


def test_ema_update_equals_hand_computation():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = quantizer(codebook, decay=0.9, dead_after=None).train()
    z = torch.tensor([[2.0, 1.0], [1.0, -1.0], [0.0, 3.0]])
    _, ids, commitment, metrics = q(z)
    assert ids.tolist() == [0, 0, 1]  # code 2 is nobody's
    u = F.normalize(z, dim=1)
    mean0 = F.normalize(u[0] + u[1], dim=0)  # normalized mean of the vectors code 0 got
    expected = torch.stack([
        F.normalize(0.9 * codebook[0] + 0.1 * mean0, dim=0),
        F.normalize(0.9 * codebook[1] + 0.1 * u[2], dim=0),
        codebook[2],  # unused: unchanged
    ])
    torch.testing.assert_close(q.codebook, expected)
    assert q.unused_steps.tolist() == [0, 0, 1]
    hand_commitment = ((u - codebook[ids]) ** 2).mean()  # over the vectors and the 2 dims
    torch.testing.assert_close(commitment, hand_commitment)
    assert metrics["usage"].item() == pytest.approx(2 / 3)
    p = torch.tensor([2 / 3, 1 / 3])
    assert metrics["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_commitment_is_the_released_beta_times_mse(beta):
    # z = (3, 4) -> (0.6, 0.8), nearest code (0, 1): squared errors (0.36, 0.04), mean 0.2;
    # z = (-1, 0) -> nearest code (0, 1) (cosines -1 and 0): squared errors (1, 1), mean 1.
    # Averaged over the 2 vectors: 0.6 (a sum over the dims would give 1.2).
    q = quantizer(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), commitment=beta).eval()
    z = torch.tensor([[3.0, 4.0], [-1.0, 0.0]], requires_grad=True)
    _, ids, commitment, _ = q(z)
    assert ids.tolist() == [1, 1]
    assert commitment.item() == pytest.approx(beta * 0.6)
    commitment.backward()
    # the gradient of the released `beta * F.mse_loss(l2(z), sg(code))`
    reference = z.detach().clone().requires_grad_()
    codes = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    (beta * F.mse_loss(F.normalize(reference, dim=1), codes)).backward()
    torch.testing.assert_close(z.grad, reference.grad)
    assert z.grad.abs().sum() > 0


def test_without_kmeans_the_codebook_starts_as_random_unit_codes():
    q = NormEMAQuantizer(8, 4, kmeans_iters=0)
    assert q.initialized
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(8))
    assert q.codebook.unique(dim=0).shape == (8, 4)


def test_a_quantizer_loaded_from_its_state_keeps_its_codebook_and_dead_counts():
    """A resumed run: the k-means flag and the unused-step counts come back with the codebook, so the first
    training batch after a resume neither reruns k-means nor forgets how long a code has been unused."""
    torch.manual_seed(0)
    trained = NormEMAQuantizer(8, 4, kmeans_iters=2, decay=0.5, dead_after=50).train()
    trained(torch.randn(32, 4))
    trained.unused_steps[0] = 7
    resumed = NormEMAQuantizer(8, 4, kmeans_iters=2, decay=0.5, dead_after=50).train()
    resumed.load_state_dict(trained.state_dict())
    assert resumed.initialized and torch.equal(resumed.unused_steps, trained.unused_steps)
    batch = torch.randn(32, 4)
    expected = trained.codebook.clone()
    resumed(batch)
    trained(batch)
    torch.testing.assert_close(resumed.codebook, trained.codebook)
    assert not torch.equal(resumed.codebook, expected)  # the step moved it: the comparison means something


@pytest.mark.parametrize("iters", [1, 2])
def test_the_quantizers_kmeans_runs_its_own_number_of_rounds(iters):
    torch.manual_seed(0)
    data = F.normalize(torch.randn(64, 4), dim=1)
    q = NormEMAQuantizer(6, 4, kmeans_iters=iters, dead_after=None)
    torch.manual_seed(1)
    q.init_codebook(data)
    torch.manual_seed(1)
    torch.testing.assert_close(q.codebook, spherical_kmeans(data, 6, iters))
    torch.manual_seed(1)
    assert not torch.allclose(q.codebook, spherical_kmeans(data, 6, 10))


def test_eval_mode_leaves_the_codebook_alone():
    q = quantizer(torch.randn(8, 4)).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(32, 4))
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    q = NormEMAQuantizer(8, 4).train()
    x = torch.randn(10, 6)
    z = encoder(x)
    quantized, _, _, _ = q(z)
    weights = torch.randn(10, 4)
    (quantized * weights).sum().backward()  # a loss of the codes only, no commitment
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    # straight-through: d loss / d l2(z) is the gradient the codes received, `weights`
    u = F.normalize(encoder(x), dim=1)
    expected, = torch.autograd.grad((u * weights).sum(), encoder.weight)
    torch.testing.assert_close(encoder.weight.grad, expected)


def test_dead_codes_are_restarted_and_revived():
    torch.manual_seed(0)
    codebook = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    q = quantizer(codebook, decay=0.0, dead_after=3).train()
    data = F.normalize(torch.rand(64, 3) + 0.1, dim=1)  # the positive octant: code 2 is never nearest
    for step in range(1, 3):
        _, ids, _, metrics = q(data)
        assert (ids != 2).all() and metrics["restarted"] == 0 and q.unused_steps[2] == step
    _, _, _, metrics = q(data)  # third step unused: restarted at a vector of this batch
    assert metrics["restarted"] == 1 and q.unused_steps[2] == 0
    assert torch.isclose(data @ q.codebook[2], torch.tensor(1.0)).any()
    _, ids, _, _ = q(data)
    assert (ids == 2).any()  # revived: it is some vector's nearest code now


def test_kmeans_initialisation_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.eye(4)
    data = F.normalize(centers.repeat(50, 1) + 0.05 * torch.randn(200, 4), dim=1)
    q = NormEMAQuantizer(8, 4, kmeans_iters=10, decay=0.0).train()
    assert not q.initialized
    q(data)
    assert q.initialized
    similarity = q.codebook @ centers.T  # [codes, true centers]
    assert (similarity.max(1).values > 0.99).all()  # every code sits on a cluster
    assert (similarity.max(0).values > 0.99).all()  # and every cluster has a code
    # more codes than vectors: centers start from repeated draws and stay unit vectors
    few = spherical_kmeans(data[:3], 8, iters=2)
    torch.testing.assert_close(few.norm(dim=1), torch.ones(8))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(MimkitError, match="decay"):
        NormEMAQuantizer(8, 4, decay=1.0)
    with pytest.raises(MimkitError, match="dead_after"):
        NormEMAQuantizer(8, 4, dead_after=0)
    # the edges of the ranges are accepted: no averaging, and a restart after one unused step
    assert NormEMAQuantizer(8, 4, decay=0.0, dead_after=1).dead_after == 1


@pytest.mark.parametrize("n, k", [(6, 6), (9, 4)])
def test_kmeans_starts_at_distinct_vectors_of_the_batch(n, k):
    """Without rounds the centers are the draw itself: k different rows of the batch (all of them when it
    has exactly k), never a row drawn twice while others are left."""
    x = F.normalize(torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), dim=1)  # n > d rows
    for seed in range(4):
        centers = spherical_kmeans(x, k, iters=0, generator=torch.Generator().manual_seed(seed))
        rows = [int((x == c).all(1).nonzero()) for c in centers]
        assert len(set(rows)) == k


@pytest.mark.parametrize("n", [20, 3])  # with and without replacement (k = 5)
def test_kmeans_draws_its_start_from_the_generator_given(n):
    x = F.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(spherical_kmeans(x, 5, iters=0, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
def test_a_center_left_with_one_vector_moves_onto_it(order):
    """Two close vectors at 0 and 10 degrees and one at 90, two centers. Whichever two start, k-means ends
    with one center on the close pair's mean and one on the lone vector; when the pair starts as the
    centers, the far vector first pulls one of them away, then is its only vector."""
    angles = torch.tensor([0.0, 10.0, 90.0]).deg2rad()[list(order)]
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    centers = spherical_kmeans(x, 2, iters=10, generator=torch.Generator().manual_seed(0))
    degrees = sorted(torch.atan2(centers[:, 1], centers[:, 0]).rad2deg().tolist())
    assert degrees == pytest.approx([5.0, 90.0], abs=1e-4)


def _ddp_worker(rank: int, tmp: str, data: torch.Tensor):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different draws on each rank: k-means and restarts must come from rank 0
    plain = NormEMAQuantizer(6, 3, decay=0.5, kmeans_iters=3, dead_after=None).train()
    # more codes than a rank's first batch has vectors: k-means repeats some, which then go unused
    restarting = NormEMAQuantizer(24, 3, decay=0.5, kmeans_iters=3, dead_after=1).train()
    restarted = 0
    for step in range(len(data)):
        plain(data[step, rank])
        restarted += int(restarting(data[step, rank])[3]["restarted"])
    torch.save({"plain": plain.codebook, "restarting": restarting.codebook, "restarted": restarted},
               f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_codebook_as_one_process_on_the_global_batch(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(4, 2, 16, 3)  # [step, rank, N, d]: each rank sees its half of every global batch
    mp.spawn(_ddp_worker, args=(str(tmp_path), data), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["plain"], ranks[1]["plain"])
    assert torch.equal(ranks[0]["restarting"], ranks[1]["restarting"]) and ranks[0]["restarted"] > 0
    # One process, rank 0's RNG: k-means on rank 0's first batch, then EMA steps on the global batches.
    torch.manual_seed(0)
    single = NormEMAQuantizer(6, 3, decay=0.5, kmeans_iters=3, dead_after=None)
    NormEMAQuantizer(24, 3)  # rank 0 built a second quantizer before k-means drew
    single.init_codebook(F.normalize(data[0, 0], dim=1))
    for step in range(len(data)):
        z = F.normalize(data[step].reshape(-1, 3), dim=1)
        single.update(z, single.nearest(z))
    torch.testing.assert_close(ranks[0]["plain"], single.codebook)


def test_kmeans_initialisation_fits_clusters_a_random_codebook_cannot():
    """Four tight clusters inside one narrow cone of a 16-d sphere: a random codebook has no code near
    them, and the slow EMA (the default decay 0.99) cannot bring one there in a step. Only k-means puts
    a code on every cluster."""
    torch.manual_seed(0)
    axis = F.normalize(torch.ones(16), dim=0)
    centers = F.normalize(axis + 0.3 * F.normalize(torch.randn(4, 16), dim=1), dim=1)  # [4, 16]
    data = F.normalize(centers.repeat(64, 1) + 0.01 * torch.randn(256, 16), dim=1)

    def fit(kmeans_iters: int) -> torch.Tensor:
        """Each cluster center's similarity to its nearest code after one training step."""
        torch.manual_seed(1)
        q = NormEMAQuantizer(8, 16, kmeans_iters=kmeans_iters).train()
        q(data)
        return (centers @ q.codebook.T).max(1).values

    assert (fit(kmeans_iters=10) > 0.99).all()
    assert (fit(kmeans_iters=0) < 0.9).all()


def test_kmeans_converges_to_its_fixed_point():
    """After enough rounds every center is the normalized mean of the vectors nearest to it."""
    torch.manual_seed(0)
    data = F.normalize(torch.eye(3).repeat(20, 1) + 0.2 * torch.randn(60, 3), dim=1)
    centers = spherical_kmeans(data, 3, iters=20, generator=torch.Generator().manual_seed(0))
    ids = (data @ centers.T).argmax(1)
    assert ids.unique().numel() == 3
    for k in range(3):
        torch.testing.assert_close(centers[k], F.normalize(data[ids == k].sum(0), dim=0))
