"""SimMIM's model: the loss reads masked pixels only, the mask token hides masked patches from the encoder,
the encoder is a plain timm Beit, the reference init; the mask's geometry and its one-line refusals."""

import math

import pytest
import torch
from timm.models.beit import Beit

from mimkit.errors import MimkitError
from mimkit.models.simmim import (
    SimMIM,
    check_mask_geometry,
    create_simmim,
    num_masked_cells,
    pixel_mask,
    simmim_mask,
)
from tests.conftest import perturb


def tiny(**kwargs) -> SimMIM:
    torch.manual_seed(0)
    return SimMIM(**dict(img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                         drop_path_rate=0.0) | kwargs).eval()


def masks(batch: int, grid: int = 4, scale: int = 2, num_masked: int = 10) -> torch.Tensor:
    return torch.stack([simmim_mask(grid, scale, num_masked, torch.Generator().manual_seed(i)).flatten()
                        for i in range(batch)])


def test_loss_is_the_mean_l1_over_masked_pixels_only():
    model = tiny()
    imgs, mask = torch.randn(2, 3, 32, 32), masks(2)
    pred = torch.randn(2, 3, 32, 32)
    hidden = pixel_mask(mask, 4).expand_as(imgs).bool()
    loss = model.forward_loss(imgs, pred, mask)
    assert loss == pytest.approx((pred - imgs).abs()[hidden].mean().item(), rel=1e-6)
    visible_changed = torch.where(hidden, pred, pred + 5.0)
    assert model.forward_loss(imgs, visible_changed, mask) == loss
    masked_changed = torch.where(hidden, pred + 5.0, pred)
    assert model.forward_loss(imgs, masked_changed, mask) != loss


def test_masked_patches_reach_the_encoder_only_as_the_mask_token():
    model = perturb(tiny())
    imgs, mask = torch.randn(2, 3, 32, 32), masks(2)
    hidden = pixel_mask(mask, 4).bool()
    with torch.no_grad():
        x = model.forward_encoder(imgs, mask)
        scrambled = model.forward_encoder(torch.where(hidden, torch.randn_like(imgs), imgs), mask)
        unmasked = model.forward_encoder(torch.where(hidden, torch.randn_like(imgs), imgs),
                                         torch.zeros_like(mask))
    assert x.shape == (2, 1 + 64, 32)
    torch.testing.assert_close(scrambled, x)
    assert not torch.allclose(unmasked, x)


def test_prediction_is_image_shaped_and_gradients_reach_every_weight():
    model = tiny(in_chans=1).train()
    loss, pred = model(torch.randn(2, 1, 32, 32), masks(2))
    assert pred.shape == (2, 1, 32, 32) and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_each_patchs_pixels_are_predicted_from_its_own_token_at_its_place():
    """The decoder (a 1x1 convolution, then pixel shuffle) reads the token grid row by row: changing the
    token of patch (row 1, column 5) of the 8x8 grid changes that patch's pixels and no others."""
    model = perturb(tiny())
    tokens = torch.randn(1, 1 + 64, 32)
    changed = tokens.clone()
    changed[0, 1 + 1 * 8 + 5] += 1.0
    with torch.no_grad():
        moved = (model.forward_decoder(changed) - model.forward_decoder(tokens)).abs().sum(dim=1)[0] > 1e-6
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:8, 20:24] = True
    assert torch.equal(moved, expected)


def test_encoder_is_a_plain_timm_beit_with_the_reference_architecture():
    model = perturb(tiny())
    enc = model.encoder
    assert enc.rel_pos_bias is not None and enc.pos_embed is None  # shared table, no absolute positions
    assert torch.equal(tiny().encoder.blocks[0].gamma_1, torch.full((32,), 0.1))
    timm_model = Beit(**model.encoder_kwargs).eval()
    timm_model.load_state_dict(enc.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # no patch masked: SimMIM's encoder is timm's
        torch.testing.assert_close(model.forward_encoder(imgs, torch.zeros(2, 64, dtype=torch.bool)),
                                   timm_model.forward_features(imgs))


def test_init_follows_the_reference_truncated_normals():
    model = create_simmim("vit_mini", img_size=32, patch_size=4, in_chans=1)
    enc = model.encoder
    for name, p in [("cls_token", enc.cls_token), ("mask_token", model.mask_token),
                    ("patch_embed", enc.patch_embed.proj.weight), ("qkv", enc.blocks[0].attn.qkv.weight)]:
        assert p.abs().max() <= 0.02 and p.std() > 0.005, name  # cut at one std (0.02), not at 2
    block = enc.blocks[1]
    assert block.mlp.fc2.weight.abs().max() <= 0.02 / math.sqrt(4) + 1e-7  # rescaled by sqrt(2 * 2)
    assert torch.count_nonzero(enc.rel_pos_bias.relative_position_bias_table) == 0


def test_mask_hides_whole_mask_patches_and_rounds_up():
    assert num_masked_cells(49, 0.6) == 30 and num_masked_cells(16, 0.6) == 10
    mask = simmim_mask(7, 2, 30, torch.Generator().manual_seed(0))
    assert mask.shape == (14, 14) and mask.sum() == 30 * 4
    cells = mask.view(7, 2, 7, 2)
    assert torch.equal(cells.all(3).all(1), cells.any(3).any(1))  # every 2x2 block all masked or all visible
    assert not torch.equal(mask, simmim_mask(7, 2, 30, torch.Generator().manual_seed(1)))
    assert check_mask_geometry(224, 16, 32) == 7 and check_mask_geometry(28, 4, 4) == 7


@pytest.mark.parametrize("args, message", [
    ((32, 4, 6), "simmim.mask_patch_size=6 is not a multiple of the patch size 4"),
    ((32, 4, 2), "simmim.mask_patch_size=2 is not a multiple of the patch size 4"),
    ((32, 4, 12), "simmim.mask_patch_size=12 does not tile 32 px images"),
])
def test_bad_mask_geometry_is_refused(args, message):
    with pytest.raises(MimkitError, match=message):
        check_mask_geometry(*args)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_mask_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(MimkitError, match=r"simmim.mask_ratio=.* must be in \(0, 1\)"):
        num_masked_cells(49, ratio)


def test_init_std_is_the_reference_normals_of_std_0_02_cut_at_one_std():
    """A normal of std 0.02 cut at +-0.02 has std 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.01079; a
    normal of std 1 cut at +-0.02 (the same bounds, no std) is flat there: std 0.04 / sqrt(12) = 0.01155."""
    model = create_simmim("vit_mini", img_size=32, patch_size=4, in_chans=1, depth=1)
    phi1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    expected = 0.02 * math.sqrt(1 - 2 * phi1 / mass)
    weight = model.encoder.blocks[0].mlp.fc1.weight  # 512 x 128 draws
    assert weight.std().item() == pytest.approx(expected, abs=2.5e-4)


def test_init_zeroes_the_patch_embeddings_bias_as_the_reference():
    """timm's Beit leaves the patch convolution's bias at PyTorch's uniform init; the reference zeroes it."""
    model = tiny()
    assert torch.count_nonzero(model.encoder.patch_embed.proj.bias) == 0
    biases = [m.bias for m in model.encoder.modules()
              if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_the_mask_is_drawn_from_the_given_generator_only():
    torch.manual_seed(1)
    first = simmim_mask(4, 2, 10, torch.Generator().manual_seed(7))
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(simmim_mask(4, 2, 10, torch.Generator().manual_seed(7)), first)
    cells = torch.zeros(16, dtype=torch.bool)
    cells[torch.randperm(16, generator=torch.Generator().manual_seed(7))[:10]] = True
    assert torch.equal(first[::2, ::2].flatten(), cells)


def test_a_patch_size_that_does_not_tile_the_image_is_a_one_line_error():
    with pytest.raises(MimkitError, match="img_size 30 is not a positive multiple of patch_size 4"):
        tiny(img_size=30)
    with pytest.raises(MimkitError, match="img_size 32 is not a positive multiple of patch_size 0"):
        check_mask_geometry(32, 0, 8)  # not a ZeroDivisionError


@pytest.mark.parametrize("name, width, depth, heads", [
    ("vit_mini", 128, 6, 4), ("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12),
    ("vit_large", 1024, 24, 16),
])
def test_each_named_model_has_its_archs_width_and_heads(name, width, depth, heads):
    from mimkit.models.simmim import SIMMIM_MODELS
    model = create_simmim(name, img_size=16, patch_size=8, in_chans=1, depth=1)  # one block: fast
    assert isinstance(model, SimMIM) and len(model.encoder.blocks) == 1
    assert model.encoder.embed_dim == width and model.encoder.blocks[0].attn.num_heads == heads
    assert SIMMIM_MODELS[name](img_size=16, patch_size=8, in_chans=1, depth=1).encoder.embed_dim == width
    # the arch's depth, narrowed to 8 channels a head
    narrow = create_simmim(name, img_size=16, patch_size=8, in_chans=1, embed_dim=8 * heads)
    assert len(narrow.encoder.blocks) == depth and narrow.encoder.blocks[0].attn.num_heads == heads


def test_an_unknown_model_name_is_a_one_line_error_listing_the_names():
    names = "vit_mini, vit_tiny, vit_small, vit_base, vit_large"
    with pytest.raises(MimkitError, match=rf"unknown SimMIM model 'vit_huge'; choose one of: {names}$"):
        create_simmim("vit_huge")


def test_set_grad_checkpointing_turns_it_on_by_default():
    model = tiny()
    model.set_grad_checkpointing()
    assert model.encoder.grad_checkpointing is True
    model.set_grad_checkpointing(False)
    assert model.encoder.grad_checkpointing is False
