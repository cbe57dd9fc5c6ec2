"""MaskDistill's model: the loss at masked patches only, the teacher's features layer-normalized without
affine, the Smooth-L1 and cosine distances, gradients that reach the student and not the teacher."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.errors import MimkitError
from mimkit.masking import block_mask
from mimkit.models.maskdistill import MaskDistill, cosine_distance, create_maskdistill, smooth_l1_distance

TEACHER_DIM = 24  # no other layer of the tiny model is 24 wide


def tiny(**kwargs) -> MaskDistill:
    dims = dict(img_size=28, patch_size=4, in_chans=1, teacher_dim=TEACHER_DIM, embed_dim=32, depth=2,
                num_heads=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    return create_maskdistill("vit_mini", **{**dims, **kwargs})


def masks(batch: int) -> torch.Tensor:
    return torch.stack([block_mask(7, 7, 20, generator=torch.Generator().manual_seed(i)).flatten()
                        for i in range(batch)])


def test_smooth_l1_is_squared_below_beta_and_linear_above_averaged_over_channels():
    pred, target = torch.zeros(2, 2), torch.tensor([[0.5, 3.0], [1.0, -1.0]])
    assert torch.allclose(smooth_l1_distance(pred, target, beta=1.0), torch.tensor([(0.125 + 2.5) / 2, 0.5]))
    # beta 2: 0.5 -> 0.5 * 0.25 / 2, 3 -> 3 - 1, 1 -> 0.25
    expected = torch.tensor([(0.0625 + 2.0) / 2, 0.25])
    assert torch.allclose(smooth_l1_distance(pred, target, beta=2.0), expected)


def test_cosine_distance_is_the_squared_distance_of_unit_vectors():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[5.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert torch.allclose(cosine_distance(a, b), torch.tensor([0.0, 2.0, 4.0]))
    unit_distance = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1)
    assert torch.allclose(cosine_distance(a, b), unit_distance)


def test_the_loss_reads_the_teacher_at_masked_patches_only():
    model = tiny().eval()
    imgs, mask, teacher = torch.randn(2, 1, 28, 28), masks(2), torch.randn(2, 49, TEACHER_DIM)
    with torch.no_grad():
        loss, metrics = model(imgs, mask, teacher)
        changed = teacher.clone()
        changed[~mask] = torch.randn(int((~mask).sum()), TEACHER_DIM)  # every visible patch's feature
        assert torch.equal(model(imgs, mask, changed)[0], loss)
        changed[mask.nonzero()[0].tolist()] += 1.0  # one masked patch's feature
        assert model(imgs, mask, changed)[0] != loss
    assert -1 <= metrics["cosine"] <= 1


def test_the_targets_are_layer_normalized_without_affine():
    model = tiny().eval()
    imgs, mask, teacher = torch.randn(2, 1, 28, 28), masks(2), torch.randn(2, 49, TEACHER_DIM)
    target = model.forward_target(teacher * 5 + 3)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 49), atol=1e-5)
    assert torch.allclose(target.var(-1, unbiased=False), torch.ones(2, 49), atol=1e-4)
    assert not any(p.requires_grad for p in model.target_norm.parameters())  # nothing to learn there
    rescaled = teacher * (torch.rand(2, 49, 1) * 9 + 1) + torch.randn(2, 49, 1)  # per-feature scale, shift
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, mask, rescaled)[0], model(imgs, mask, teacher)[0])
        raw = tiny(target_norm=False).eval()
        assert not torch.allclose(raw(imgs, mask, rescaled)[0], raw(imgs, mask, teacher)[0])


def test_the_loss_is_the_distance_of_the_head_to_the_normalized_target():
    for loss_name, distance in (("smooth_l1", lambda p, t: F.smooth_l1_loss(p, t, beta=0.5)),
                                ("cosine", lambda p, t: (2 - 2 * F.cosine_similarity(p, t, dim=-1)).mean())):
        model = tiny(loss=loss_name, smooth_l1_beta=0.5).eval()
        imgs, mask, teacher = torch.randn(2, 1, 28, 28), masks(2), torch.randn(2, 49, TEACHER_DIM)
        with torch.no_grad():
            x, _ = model.forward_features(imgs, mask)
            pred = model.lm_head(x[:, 1:])[mask]  # the head at the masked patches
            target = F.layer_norm(teacher, (TEACHER_DIM,), eps=1e-6)[mask]
            loss, metrics = model(imgs, mask, teacher)
            torch.testing.assert_close(loss, distance(pred, target))
            torch.testing.assert_close(metrics["cosine"], F.cosine_similarity(pred, target, dim=-1).mean())


def test_gradients_reach_the_student_and_the_mask_token_and_not_the_teacher():
    model = tiny()
    teacher = torch.randn(2, 49, TEACHER_DIM, requires_grad=True)
    loss, _ = model(torch.randn(2, 1, 28, 28), masks(2), teacher.detach())
    loss.backward()
    assert teacher.grad is None
    for name in ("mask_token", "lm_head.weight", "encoder.patch_embed.proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_training_brings_the_predictions_to_the_teacher():
    """Images of two kinds (dark, bright); the teacher gives every patch of a kind that kind's feature, which
    the visible patches reveal."""
    model = tiny()
    kind = torch.tensor([0, 1, 0, 1])
    imgs = (kind.float() * 2 - 1).view(4, 1, 1, 1) + 0.1 * torch.randn(4, 1, 28, 28)
    teacher = torch.randn(2, TEACHER_DIM)[kind][:, None].expand(-1, 49, -1)  # [4, 49, D]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, metrics = model(imgs, masks(4), teacher)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.4 * losses[0] and metrics["cosine"] > 0.8, (losses[-1], metrics["cosine"])


def test_an_unknown_loss_is_refused():
    with pytest.raises(MimkitError, match="unknown MaskDistill loss 'l2'; choose one of: smooth_l1, cosine"):
        tiny(loss="l2")


def test_the_students_settings_reach_its_encoder_and_one_bias_table_is_shared_by_default():
    """MaskDistill's default (BEiT v2's pretraining) is one relative position table for all blocks, unlike
    BEiT's; drop path and layer scale reach every block."""
    shared = tiny()
    assert shared.encoder.rel_pos_bias is not None
    assert all(block.attn.relative_position_bias_table is None for block in shared.encoder.blocks)
    own = tiny(shared_rel_pos_bias=False, depth=3, drop_path_rate=0.2, layer_scale_init=0.05, mlp_ratio=2.0)
    assert own.encoder.blocks[0].mlp.fc1.out_features == 64
    assert own.encoder.rel_pos_bias is None
    assert all(block.attn.relative_position_bias_table is not None for block in own.encoder.blocks)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in own.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    gammas = torch.cat([block.gamma_1 for block in own.encoder.blocks])
    assert torch.equal(gammas, torch.full_like(gammas, 0.05))
