"""Pictures say what they claim: the MAE reconstruction is in pixel space (norm-pix undone with each
hidden patch's statistics), the pasted panel is the original on visible patches, BEiT's prediction panel
decodes the ids the model predicts, and the grid draws each panel in its column."""

import pytest
import torch

from mimkit.data.transforms import denormalize
from mimkit.models.beit import BEiT
from mimkit.models.mae import MAE
from mimkit.tokenizers.dvae import dvae_for
from mimkit.viz import beit_predictions, image_grid, mae_reconstructions
from tests.conftest import grid_size

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_mae(norm_pix_loss: bool) -> MAE:
    torch.manual_seed(0)
    return MAE(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss).eval()


def with_perfect_decoder(model: MAE) -> MAE:
    """The model predicting exactly its training target (per-patch normalized pixels under norm-pix)."""
    forward = model.forward

    def perfect(imgs, mask_ratio=0.75, noise=None):
        loss, _, mask = forward(imgs, mask_ratio, noise)
        return loss, model.target_norm(model.patchify(imgs)), mask

    model.forward = perfect
    return model


def images_and_noise():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g) * 2 + 1  # every patch with its own mean and spread
    return images, torch.rand(2, 16, generator=g)


def hidden_pixels(model: MAE, noise: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) 1 where the patch is hidden: the 75% of patches with the highest noise."""
    mask = torch.zeros_like(noise)
    mask.scatter_(1, noise.argsort(1)[:, 4:], 1.0)
    return model.unpatchify(mask[..., None].expand(-1, -1, model.patch_size ** 2 * 3))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_reconstructs_the_image_in_pixels(norm_pix_loss):
    model = with_perfect_decoder(tiny_mae(norm_pix_loss))
    images, noise = images_and_noise()
    panels = mae_reconstructions(model, images, 0.75, noise)
    torch.testing.assert_close(panels["reconstruction"], images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(panels["pasted"], images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(panels["reconstruction"].std(), images.std(), rtol=1e-5, atol=0)


def test_panels_show_the_mask_and_paste_only_hidden_patches():
    model = tiny_mae(norm_pix_loss=True)
    images, noise = images_and_noise()
    panels = mae_reconstructions(model, images, 0.75, noise)
    hidden = hidden_pixels(model, noise)
    visible = 1 - hidden
    assert hidden.mean() == 0.75
    assert torch.equal(panels["original"], images)
    assert torch.equal(panels["masked"], images * visible)
    assert torch.equal(panels["pasted"] * visible, images * visible)
    assert torch.equal(panels["pasted"] * hidden, panels["reconstruction"] * hidden)
    # an untrained decoder's guess, mapped to each patch's own mean and spread, has the pixel statistics
    # of the image (mean 1.1, std 2.1 here; measured 0.85 and 1.4), not those of normalized patches
    # (about 0 and 0.7): and its patch means follow the image's (correlation 0.83 measured; about 0
    # for a guess left normalized)
    shown, hidden_truth = panels["reconstruction"][hidden.bool()], images[hidden.bool()]
    assert abs(shown.mean() - hidden_truth.mean()) < 0.5
    assert 0.5 < shown.std() / hidden_truth.std() < 2
    patch_means = torch.stack([model.patchify(panels["reconstruction"]).mean(-1).flatten(),
                               model.patchify(images).mean(-1).flatten()])
    assert torch.corrcoef(patch_means)[0, 1] > 0.6
    assert not torch.allclose(panels["reconstruction"] * hidden, images * hidden, atol=0.1)


def test_beit_prediction_panel_decodes_the_predicted_ids():
    torch.manual_seed(0)
    vocab = 16
    model = BEiT(img_size=16, patch_size=4, in_chans=3, vocab_size=vocab, embed_dim=32, depth=1,
                 num_heads=2).eval()
    tokenizer = dvae_for(16, 4, 3, vocab_size=vocab, hidden=4).eval()
    images, _ = images_and_noise()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    ids = tokenizer.tokenize(images)
    wanted = (ids[mask] + 1) % vocab  # ids the model "predicts": never the tokenizer's own
    model.forward_head = lambda x, bool_masked_pos: torch.nn.functional.one_hot(wanted, vocab).float()
    panels = beit_predictions(model, tokenizer, images, images, mask)
    expected = ids.clone()
    expected[mask] = wanted
    torch.testing.assert_close(panels["prediction"], tokenizer.decode(expected))
    torch.testing.assert_close(panels["tokens"], tokenizer.decode(ids))
    assert not torch.allclose(panels["prediction"], panels["tokens"])
    hidden = mask.float().repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert torch.equal(panels["masked"], images * (1 - hidden))


def test_grid_draws_each_panel_in_its_column():
    """Three columns of flat tiles: each tile's pixels are its panel's denormalized colour."""
    shades = torch.tensor([-1.0, 0.0, 1.0])
    panels = {name: torch.full((2, 3, 8, 8), float(s)) for name, s in zip("abc", shades, strict=True)}
    picture = image_grid(panels, MEAN, STD)
    scale, pad, header = 112 // 8, 4, 18
    tile = 8 * scale
    assert picture.size == grid_size(3, 2, 8)
    for column, shade in enumerate(shades):
        colour = (denormalize(torch.full((3, 1, 1), float(shade)), MEAN, STD).flatten() * 255).round()
        for row in range(2):
            x = pad + column * (tile + pad) + tile // 2
            y = header + pad + row * (tile + pad) + tile // 2
            assert picture.getpixel((x, y)) == tuple(int(v) for v in colour)
