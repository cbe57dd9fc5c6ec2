"""MaskFeat's HOG target (hand-made edges, a loop-by-loop reference, the authors' normalization) and model
(mask token, loss on masked patches only, a timm encoder, bad settings)."""

import math

import pytest
import timm
import torch

from mimkit.errors import MimkitError
from mimkit.models.maskfeat import HOG, create_maskfeat, gaussian_window

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, hog_cell=4)


def edge(vertical: bool, size: int = 8) -> torch.Tensor:
    """(1, 1, size, size): dark left half and bright right half (or dark top, bright bottom)."""
    img = torch.zeros(1, 1, size, size)
    img[..., :, size // 2:] = 1.0
    return img.transpose(-1, -2) if not vertical else img


def test_a_vertical_edge_votes_in_the_horizontal_gradient_bin_and_a_horizontal_one_in_bin_0():
    hog = HOG(in_chans=1, nbins=9, cell_size=4, window=0)
    for vertical, bin_ in ((True, 4), (False, 0)):
        cells = hog.cells(edge(vertical))  # [1, 1, 9, 2, 2]: both cells of each row see the edge
        expected = torch.zeros(9)
        expected[bin_] = 1.0
        assert torch.allclose(cells[0, 0].permute(1, 2, 0), expected.expand(2, 2, 9))
    # a bright-to-dark edge is the same orientation (unsigned gradients), a flat image votes nowhere
    assert torch.allclose(hog.cells(1 - edge(True)), hog.cells(edge(True)))
    assert torch.equal(hog.cells(torch.full((1, 1, 8, 8), 0.3)), torch.zeros(1, 1, 9, 2, 2))


def test_each_cell_and_channel_is_l2_normalized_on_its_own():
    """The authors' local normalization: a cell's histogram has unit norm per colour channel, so the
    contrast of a channel, or its offset (the image normalization's mean and std), changes nothing."""
    torch.manual_seed(0)
    hog = HOG(in_chans=3, nbins=9, cell_size=4, window=8)
    img = torch.rand(2, 3, 16, 16)
    cells = hog.cells(img)
    assert torch.allclose(cells.norm(dim=2), torch.ones(2, 3, 4, 4), atol=1e-6)
    gain, offset = torch.tensor([0.2, 3.0, 1.0]).view(3, 1, 1), torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)
    scaled = img * gain + offset
    assert torch.allclose(hog.cells(scaled), cells, atol=1e-5)
    one_channel = img.clone()
    one_channel[:, 1] = 0  # a flat channel has empty histograms, the others are untouched
    assert torch.equal(hog.cells(one_channel)[:, 1], torch.zeros(2, 9, 4, 4))
    assert torch.allclose(hog.cells(one_channel)[:, [0, 2]], cells[:, [0, 2]])


def reference_hog(img: torch.Tensor, nbins: int, cell: int, patch: int, window: int) -> torch.Tensor:
    """HOG features (1, L, C * nbins * k * k) of one image, pixel by pixel in plain Python: Sobel with
    reflected borders, atan2(left - right, top - bottom) folded onto 180 degrees, Gaussian-weighted votes,
    L2 norm per cell and channel, patches row-major, each (channel, bin, cell row, cell column)."""
    _, C, H, W = img.shape
    x = img[0].double().tolist()
    sigma = window / 2

    def at(c, i, j):  # reflect padding
        i = -i if i < 0 else (2 * (H - 1) - i if i >= H else i)
        j = -j if j < 0 else (2 * (W - 1) - j if j >= W else j)
        return x[c][i][j]

    sobel = ((-1, 1), (0, 2), (1, 1))  # (offset, weight) across the derivative
    hist = [[[[0.0] * (W // cell) for _ in range(H // cell)] for _ in range(nbins)] for _ in range(C)]
    for c in range(C):
        for i in range(H):
            for j in range(W):
                gx = sum(w * (at(c, i + d, j - 1) - at(c, i + d, j + 1)) for d, w in sobel)
                gy = sum(w * (at(c, i - 1, j + d) - at(c, i + 1, j + d)) for d, w in sobel)
                u, v = (i % window - (window - 1) / 2) / sigma, (j % window - (window - 1) / 2) / sigma
                weight = math.exp(-0.5 * (u * u + v * v))
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                hist[c][b][i // cell][j // cell] += math.hypot(gx, gy) * weight
    k, g = patch // cell, H // patch
    features = []
    for pi in range(g):
        for pj in range(g):
            row = []
            for c in range(C):
                norms = [[math.sqrt(sum(hist[c][b][ci][cj] ** 2 for b in range(nbins))) or 1.0
                          for cj in range(W // cell)] for ci in range(H // cell)]
                row += [hist[c][b][pi * k + a][pj * k + e] / norms[pi * k + a][pj * k + e]
                        for b in range(nbins) for a in range(k) for e in range(k)]
            features.append(row)
    return torch.tensor([features], dtype=torch.float64)


def test_hog_features_match_a_pixel_by_pixel_reference():
    torch.manual_seed(1)
    img = torch.zeros(1, 2, 12, 12)
    # a flat 2-px frame: reflection makes the border's gradients exactly 0 in one direction, an angle on a
    # bin boundary that float32 rounding noise decides, here with no vote
    img[..., 2:-2, 2:-2] = torch.randn(1, 2, 8, 8)
    hog = HOG(in_chans=2, nbins=9, cell_size=2, window=4)
    ours = hog(img, patch_size=4)  # [1, 9 patches, 2 channels x 9 bins x 2 x 2 cells]
    assert ours.shape == (1, 9, 72)
    assert torch.allclose(ours.double(), reference_hog(img, 9, 2, 4, 4), atol=1e-5)
    assert torch.equal(hog.to_cells(ours, 4), hog.cells(img))


def test_gaussian_window_is_the_authors_bump_up_to_scale():
    """The authors' kernel: exp(-n^2 / 2) over n = (0..15 - 7.5) / 8, normalized to sum 1 (the L2
    normalization makes the scale irrelevant)."""
    n = (torch.arange(16.0) - 7.5) / 8
    theirs = torch.exp(-0.5 * n**2)[:, None] * torch.exp(-0.5 * n**2)[None, :]
    ours = gaussian_window(16)
    assert torch.allclose(ours / ours.sum(), theirs / theirs.sum())
    assert ours[7, 7] == ours.max() and torch.equal(ours, ours.flip(0)) and torch.equal(ours, ours.T)


def test_hog_runs_in_float32_under_autocast():
    hog = HOG(in_chans=3)
    img = torch.randn(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hog(img, patch_size=16)
    assert out.dtype == torch.float32 and torch.equal(out, hog(img, patch_size=16))


def test_the_loss_is_over_masked_patches_only():
    torch.manual_seed(0)
    model = create_maskfeat("vit_mini", **TINY)
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 5, 6, 10]] = True
    loss, pred, target = model(imgs, mask)
    assert pred.shape == target.shape == (2, 16, 3 * 9 * 2 * 2)
    expected = (pred - target).pow(2).mean(-1)[mask].mean()
    assert torch.allclose(loss, expected)
    changed = torch.where(mask[..., None], pred, pred + torch.randn_like(pred))  # visible patches only
    assert torch.allclose(model.forward_loss(changed, target, mask), loss)
    assert not torch.allclose(model.forward_loss(pred + 1, target, mask), loss)


def test_masked_pixels_do_not_reach_the_encoder_but_shape_the_target():
    torch.manual_seed(0)
    model = create_maskfeat("vit_mini", **TINY).eval()
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True  # the top-left 8x8 patch
    other = imgs.clone()
    other[..., :8, :8] = torch.randn(1, 3, 8, 8)
    assert torch.allclose(model.forward_features(imgs, mask), model.forward_features(other, mask), atol=1e-6)
    assert not torch.allclose(model.forward_features(imgs, ~mask), model.forward_features(other, ~mask))
    assert not torch.allclose(model.forward_target(imgs)[:, 0], model.forward_target(other)[:, 0])


def test_nothing_masked_the_encoder_is_timms_vit_and_each_patch_token_predicts_its_own_hog():
    """With no patch masked, the features are timm's forward of the encoder (position table added, final
    norm applied), and the head reads patch token i for patch i: the class token predicts nothing."""
    torch.manual_seed(0)
    model = create_maskfeat("vit_mini", **TINY).eval()
    with torch.no_grad():
        model.encoder.pos_embed.normal_(std=1.0)  # a position table that cannot go unnoticed
    imgs = torch.randn(2, 3, 32, 32)
    features = model.forward_features(imgs, torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(features, model.encoder.forward_features(imgs), atol=1e-5)
    _, pred, _ = model(imgs, torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(pred, model.head(features[:, 1:]), atol=1e-6)


def test_the_encoder_is_a_timm_vit_and_the_hog_has_no_weights():
    model = create_maskfeat("vit_mini", **TINY)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=0)
    vit.load_state_dict(model.encoder.state_dict(), strict=True)
    assert not any(k.startswith("hog.") for k in model.state_dict())
    assert set(model.state_dict()) - {"encoder." + k for k in vit.state_dict()} == {
        "mask_token", "head.weight", "head.bias"}



def test_init_is_the_authors_truncated_normal_for_tables_tokens_linears_and_the_patch_embedding():
    torch.manual_seed(0)
    model = create_maskfeat("vit_mini", **{**TINY, "embed_dim": 64})
    enc = model.encoder
    for name, weight in (("pos_embed", enc.pos_embed), ("cls_token", enc.cls_token),
                         ("mask", model.mask_token),
                         ("patch_embed", enc.patch_embed.proj.weight), ("qkv", enc.blocks[0].attn.qkv.weight),
                         ("head", model.head.weight)):
        assert weight.std().item() == pytest.approx(0.02, rel=0.3), name
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(not m.bias.any() for m in linears) and enc.patch_embed.proj.bias.any()  # PyTorch's, kept
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, torch.nn.LayerNorm))

@pytest.mark.parametrize("kwargs, message", [
    (dict(hog_cell=3), "the HOG cell size 3 does not divide the patch size 8"),
    (dict(hog_window=12), "the HOG Gaussian window 12 does not divide the image size 32"),
    (dict(hog_bins=0), "hog_bins=0"),
    (dict(num_heads=3), "not divisible by 3 attention heads"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(MimkitError, match=message):
        create_maskfeat("vit_mini", **{**TINY, **kwargs})


def test_a_hog_window_of_0_weighs_every_pixel_alike():
    model = create_maskfeat("vit_mini", img_size=16, patch_size=8, in_chans=1, depth=1, hog_cell=4,
                            hog_window=0)
    imgs = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.forward_target(imgs), HOG(1, 9, 4, 0)(imgs, 8))
    assert not torch.allclose(model.forward_target(imgs), HOG(1, 9, 4, 8)(imgs, 8))  # the patch's window


def test_to_cells_inverts_to_patches_with_several_channels():
    hog = HOG(3, 5, 4, 0)
    cells = torch.randn(2, 3, 5, 4, 4)  # 3 channels, 5 bins, 2x2 patches of 2x2 cells (8 px patches)
    torch.testing.assert_close(hog.to_cells(hog.to_patches(cells, 8), 8), cells)
