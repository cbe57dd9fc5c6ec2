"""Pictures say what they claim: the MAE reconstruction is in pixel space (norm-pix undone with each
hidden patch's statistics), the pasted panel is the original on visible patches, BEiT's prediction panel
decodes the ids the model predicts, and the grid draws each panel in its column."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageColor, ImageDraw

from mimkit.data.transforms import denormalize, eval_view
from mimkit.errors import MimkitError
from mimkit.models.beit import BEiT, BEiTv2
from mimkit.models.mae import MAE
from mimkit.tokenizers.dvae import dvae_for
from mimkit.tokenizers.vqkd import VQKD
from mimkit.viz import (
    _plot,
    accuracy_by_depth_plot,
    beit_predictions,
    beitv2_predictions,
    block_masks,
    codebook_usage_plot,
    colorize,
    confusion_plot,
    image_grid,
    mae_reconstructions,
    overlay,
    picture_path,
    run_panels,
    save_picture,
    seg_palette,
    segmentation_figure,
    token_maps,
    vqkd_tokens,
)
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


@pytest.mark.parametrize("tokenizer_size", [16, 8], ids=["tokenizer-at-the-vits-size", "tokenizer-at-half"])
def test_beit_prediction_panel_decodes_the_predicted_ids(tokenizer_size):
    """The tokens come from the tokenizer's view (BEiT's DALL-E sees 112 px of a 224 px ViT); the masked
    panel is the ViT's view with the hidden patches (4 px each, whatever the tokenizer's size) blanked."""
    torch.manual_seed(0)
    vocab = 16
    model = BEiT(img_size=16, patch_size=4, in_chans=3, vocab_size=vocab, embed_dim=32, depth=1,
                 num_heads=2).eval()
    tokenizer = dvae_for(16, 4, 3, vocab_size=vocab, hidden=4, tokenizer_size=tokenizer_size).eval()
    images, _ = images_and_noise()
    tokenizer_images = torch.nn.functional.interpolate(images, size=tokenizer_size, mode="area")
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    ids = tokenizer.tokenize(tokenizer_images)
    wanted = (ids[mask] + 1) % vocab  # ids the model "predicts": never the tokenizer's own
    model.forward_head = lambda x, bool_masked_pos: torch.nn.functional.one_hot(wanted, vocab).float()
    panels = beit_predictions(model, tokenizer, images, tokenizer_images, mask)
    expected = ids.clone()
    expected[mask] = wanted
    torch.testing.assert_close(panels["prediction"], tokenizer.decode(expected))
    torch.testing.assert_close(panels["tokens"], tokenizer.decode(ids))
    assert not torch.allclose(panels["prediction"], panels["tokens"])
    hidden = mask.float().repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert torch.equal(panels["masked"], images * (1 - hidden))


@pytest.mark.parametrize("side, channels", [(8, 3), (60, 3), (64, 3), (8, 1)])
def test_grid_draws_each_panel_in_its_column(side, channels):
    """Three columns of flat tiles (the last at half size: tiles take the first column's size), upscaled
    to at least 112 px below 64 px and 4x from 64 px, gray for one channel: each tile's pixels, corner to
    corner, are its panel's denormalized colour, and 4 px of white part them."""
    shades = torch.tensor([-1.0, 0.0, 1.0])
    mean, std = MEAN[:channels], STD[:channels]
    panels = {name: torch.full((2, channels) + (side // (1 + (name == "c")),) * 2, float(s))
              for name, s in zip("abc", shades, strict=True)}
    picture = image_grid(panels, mean, std)
    pad, header = 4, 18
    tile = side * {8: 14, 60: 1, 64: 4}[side]
    assert picture.size == grid_size(3, 2, side)
    white = (255, 255, 255)
    for column, shade in enumerate(shades):
        colour = denormalize(torch.full((channels, 1, 1), float(shade)), mean, std).flatten() * 255
        colour = tuple(int(v) for v in colour.round().expand(3))
        for row in range(2):
            left, top = pad + column * (tile + pad), header + pad + row * (tile + pad)
            for x, y in ((left, top), (left + tile // 2, top + tile // 2), (left + tile - 1, top + tile - 1)):
                assert picture.getpixel((x, y)) == colour
            assert picture.getpixel((left - 1, top)) == picture.getpixel((left, top - 1)) == white


def test_token_maps_draw_one_fixed_shade_per_code_normalized_like_the_images():
    ids = torch.tensor([[[0, 1], [1, 2]]])
    maps = token_maps(ids, 3, 3, 3, MEAN, STD)
    assert maps.shape == (1, 3, 6, 6)
    shades = denormalize(maps, MEAN, STD)[0]
    patches = shades.unfold(1, 3, 3).unfold(2, 3, 3)  # (C, 2, 2, 3, 3): one patch per id
    assert torch.equal(patches, patches[..., :1, :1].expand_as(patches))  # each patch is one shade
    colour = patches[..., 0, 0]  # (C, 2, 2)
    assert torch.equal(colour[:, 0, 1], colour[:, 1, 0])  # same code, same shade
    assert not torch.equal(colour[:, 0, 0], colour[:, 0, 1])
    assert not torch.equal(colour[:, 0, 1], colour[:, 1, 1])
    assert torch.equal(token_maps(ids, 3, 3, 3, MEAN, STD), maps)  # the palette does not change per call
    gray = token_maps(ids, 3, 3, 1, [0.5], [0.25])
    assert gray.shape == (1, 1, 6, 6)


def test_token_maps_show_the_palettes_colours_whatever_the_images_normalization():
    """De-normalized as the picture de-normalizes the images beside them, a token map shows the same colours,
    each in [0, 1], under any normalization: a map left unnormalized would show them shifted and scaled."""
    ids = torch.tensor([[[0, 1], [2, 3]]])
    shown = denormalize(token_maps(ids, 4, 2, 3, MEAN, STD), MEAN, STD)
    torch.testing.assert_close(shown, token_maps(ids, 4, 2, 3, [0.0] * 3, [1.0] * 3))
    assert 0 <= shown.min() and shown.max() <= 1


def test_token_maps_put_each_code_at_its_own_patch_of_a_wide_map():
    """A 2 x 3 map of six codes (no symmetry): the patch in row i, column j has the shade of code ids[i, j]
    alone, so a transposed or flipped map shows."""
    ids = torch.tensor([[[0, 1, 2], [3, 4, 5]]])
    maps = token_maps(ids, 6, 2, 3, MEAN, STD)
    assert maps.shape == (1, 3, 4, 6)
    shade = [token_maps(torch.full((1, 1, 1), code), 6, 2, 3, MEAN, STD)[0, :, 0, 0] for code in range(6)]
    for i in range(2):
        for j in range(3):
            patch = maps[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert torch.equal(patch, shade[ids[0, i, j]].view(3, 1, 1).expand(3, 2, 2)), (i, j)


def test_grid_keeps_a_wide_tiles_orientation():
    """A wide (8 x 12) tile with bright pixels in no symmetric pattern (a corner, inner points): the picture
    shows each pixel where it is, upscaled, not mirrored, transposed or stretched."""
    tile = torch.zeros(1, 1, 8, 12)
    tile[0, 0, 0, 11] = tile[0, 0, 1, 9] = tile[0, 0, 6, 2] = 1.0
    picture = image_grid({"wide": tile}, [0.0], [1.0])
    scale, pad, header = 112 // 8, 4, 18
    assert picture.size == (12 * scale + 2 * pad, header + 8 * scale + 2 * pad)

    def at(x, y):  # a tile pixel's centre in the picture
        return picture.getpixel((pad + x * scale + scale // 2, header + pad + y * scale + scale // 2))

    for y in range(8):
        for x in range(12):
            assert at(x, y) == ((255, 255, 255) if tile[0, 0, y, x] else (0, 0, 0)), (x, y)


def tiny_vqkd() -> VQKD:
    torch.manual_seed(0)
    return VQKD(img_size=16, patch_size=4, teacher_dim=8, vocab_size=6, code_dim=4, embed_dim=16, depth=1,
                num_heads=2, decoder_depth=1).eval()


def test_vqkd_panel_draws_the_tokenizers_ids_as_token_maps():
    model = tiny_vqkd()
    images, _ = images_and_noise()
    panels = vqkd_tokens(model, images, MEAN, STD)
    assert torch.equal(panels["original"], images)
    torch.testing.assert_close(panels["tokens"], token_maps(model.tokenize(images), 6, 4, 3, MEAN, STD))


def test_beitv2_prediction_panel_puts_the_models_codes_at_hidden_patches_only():
    torch.manual_seed(0)
    tokenizer = tiny_vqkd()
    model = BEiTv2(img_size=16, patch_size=4, in_chans=3, vocab_size=6, embed_dim=32, depth=2,
                   num_heads=2, agg_layer=1).eval()
    images, _ = images_and_noise()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    ids = tokenizer.tokenize(images)
    wanted = (ids[mask] + 1) % 6
    model.forward_head = lambda x, bool_masked_pos: torch.nn.functional.one_hot(wanted, 6).float()
    panels = beitv2_predictions(model, tokenizer, images, images * 0.5, mask, MEAN, STD)
    expected = tokenizer.tokenize(images * 0.5)  # the tokenizer reads its own view of the images
    torch.testing.assert_close(panels["tokens"], token_maps(expected, 6, 4, 3, MEAN, STD))
    expected[mask] = wanted
    torch.testing.assert_close(panels["prediction"], token_maps(expected, 6, 4, 3, MEAN, STD))
    hidden = mask.float().repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert torch.equal(panels["masked"], images * (1 - hidden))
    assert torch.equal(panels["original"], images)


@pytest.mark.parametrize("img_size, crop_pct", [(127, 1.0), (128, 0.875)])
def test_run_panels_draw_the_picked_images_in_the_vit_views_crop(monkeypatch, img_size, crop_pct):
    """Every column's images (here one at 16 px, as a tokenizer's) are cut with the crop of the ViT's own
    evaluation view: ImageNet's from 128 px, the whole image below."""
    g = torch.Generator().manual_seed(0)
    source = [(torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), 0) for _ in range(3)]
    seen = {}

    def pictures(model, config, images, generator):
        seen.update(model=model, seed=generator.initial_seed())
        return {"small": images(16, MEAN, STD)}

    monkeypatch.setattr("mimkit.viz.method_of", lambda method: SimpleNamespace(pictures=pictures))
    config = SimpleNamespace(method="fake", data=SimpleNamespace(img_size=img_size))
    panels = run_panels("the model", config, source, [2, 0], seed=4)
    view = eval_view(16, MEAN, STD, crop_pct)
    assert torch.equal(panels["small"], torch.stack([view(source[i][0])["image"] for i in (2, 0)]))
    assert seen == {"model": "the model", "seed": 4}
    monkeypatch.setattr("mimkit.viz.method_of", lambda method: SimpleNamespace(pictures=None))
    with pytest.raises(MimkitError, match="no pictures for fake runs"):
        run_panels("the model", config, source, [0])


def test_run_panels_without_a_seed_draw_from_seed_0(monkeypatch):
    """`run_panels`' documented default: the pictures' generator (their masks) seeded with 0."""
    seen = []
    monkeypatch.setattr("mimkit.viz.method_of", lambda method: SimpleNamespace(
        pictures=lambda model, config, images, generator: seen.append(generator.initial_seed()) or {}))
    run_panels("the model", SimpleNamespace(method="fake", data=SimpleNamespace(img_size=16)), [], [])
    assert seen == [0]


def test_block_masks_hide_the_sections_share_of_each_grid():
    section = SimpleNamespace(mask_ratio=0.4, min_block=4)
    masks = block_masks(section, 6, 3, torch.Generator().manual_seed(0))
    assert masks.shape == (3, 6, 6) and masks.dtype == torch.bool
    assert masks.flatten(1).sum(1).tolist() == [14, 14, 14]  # 40% of 36, rounded
    assert not torch.equal(masks[0], masks[1])  # each image its own draw
    assert torch.equal(block_masks(section, 6, 3, torch.Generator().manual_seed(0)), masks)


def test_picture_path_names_a_picture_in_a_folder_and_adds_png(tmp_path):
    for name in ("a.jpg", "b.PNG"):  # an extension in capitals is a picture's too
        assert picture_path(tmp_path / name, "recon.png") == (tmp_path / name, "")
    path, note = picture_path(tmp_path / "recon", "recon.png")
    assert path == tmp_path / "recon.png" and ".png added" in note
    path, note = picture_path(tmp_path / "run.v2", "recon.png")  # a dot, but no picture's extension: kept
    assert path == tmp_path / "run.v2.png"
    assert note == f"--out '{tmp_path / 'run.v2'}' has no picture extension: .png added"
    path, note = picture_path(tmp_path, "recon.png")
    assert path == tmp_path / "recon.png" and "recon.png" in note
    save_picture(Image.new("RGB", (2, 2)), path)
    assert picture_path(tmp_path, "recon.png")[0] == tmp_path / "recon-2.png"
    save_picture(Image.new("RGB", (2, 2)), tmp_path / "recon-2.png")
    assert picture_path(tmp_path, "recon.png")[0] == tmp_path / "recon-3.png"


def test_save_picture_writes_the_format_its_extension_names_into_a_new_folder(tmp_path):
    written = save_picture(Image.new("RGB", (3, 2), "red"), str(tmp_path / "new" / "deeper" / "x.jpg"))
    assert written == tmp_path / "new" / "deeper" / "x.jpg"
    with Image.open(written) as picture:
        assert picture.format == "JPEG" and picture.size == (3, 2)


def colour_count(picture: Image.Image, colour: str) -> int:
    wanted = ImageColor.getrgb(colour)
    return sum(n for n, c in picture.getcolors(1 << 20) if c == wanted)


def test_codebook_plot_draws_held_out_lines_only_where_logged():
    batches = [{"step": s, "usage": 0.1 * s, "perplexity": 2.0 * s} for s in range(1, 6)]
    plot = codebook_usage_plot(batches + [{"step": 3, "loss": 1.0}])
    assert plot.size == (720, 300)
    assert colour_count(plot, "steelblue") > 0 and colour_count(plot, "darkorange") == 0
    held_out = [{"step": s, "val_usage": 0.5, "val_perplexity": 3.0} for s in (2, 5)]
    assert colour_count(codebook_usage_plot(batches + held_out), "darkorange") > 0
    with pytest.raises(MimkitError, match="no codebook usage"):
        codebook_usage_plot([{"step": 1, "loss": 1.0}])


def line_extent(picture: Image.Image, colour: str, box: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels of ``colour`` inside ``box`` (a panel's frame, its legend
    in the top left corner excluded)."""
    wanted = ImageColor.getrgb(colour)
    left, top, right, bottom = box
    found = [(x, y) for x in range(left, right + 3) for y in range(top - 3, bottom + 3)
             if picture.getpixel((x, y)) == wanted and not (x < left + 40 and y < top + 18)]
    xs, ys = [x for x, _ in found], [y for _, y in found]
    return min(xs), min(ys), max(xs), max(ys)


def test_a_plotted_line_spans_its_steps_and_stays_below_the_top():
    """Accuracy by block, 1..4 rising to 80: the line reaches the right edge at the last block and 1/1.05
    of the frame's height at its largest value (the y axis runs from 0)."""
    rows = [{"layer": b, "test_top1": 20.0 * b} for b in range(1, 5)]
    plot = accuracy_by_depth_plot(rows, "linprobe top-1 (%) by block")
    assert plot.size == (400, 300)
    left, top, right, bottom = line_extent(plot, "steelblue", (60, 30, 380, 270))
    assert right >= 376 and left <= 60 + 320 // 4 + 4
    assert abs((270 - top) - 240 / 1.05) <= 3 and abs((270 - bottom) - 240 / 1.05 / 4) <= 3
    assert colour_count(plot, "darkorange") == 0
    held_out = accuracy_by_depth_plot([r | {"val_top1": 10.0} for r in rows], "t")
    assert colour_count(held_out, "darkorange") > 0
    some = accuracy_by_depth_plot([r | {"val_top1": 10.0} if r["layer"] < 3 else r for r in rows], "t")
    assert colour_count(some, "darkorange") == 0  # a held-out line only where every block has one


def test_seg_palette_is_pascal_vocs_colour_map():
    palette = seg_palette(256)
    assert palette.dtype == torch.uint8 and palette.shape == (256, 3)
    voc = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 7: (128, 128, 128),
           8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for label, colour in voc.items():
        assert tuple(palette[label].tolist()) == colour
    assert torch.equal(seg_palette(5), palette[:5])


def test_colorize_and_overlay_paint_each_label_and_leave_ignored_pixels_white():
    palette = seg_palette(3)
    mask = torch.tensor([[0, 1], [2, 255]])
    coloured = colorize(mask, palette)
    assert coloured.dtype == torch.uint8 and coloured.shape == (3, 2, 2)
    assert coloured[:, 0, 0].tolist() == [0, 0, 0]
    assert coloured[:, 0, 1].tolist() == [128, 0, 0] and coloured[:, 1, 0].tolist() == [0, 128, 0]
    assert coloured[:, 1, 1].tolist() == [255, 255, 255]
    assert colorize(torch.tensor([[7]]), palette)[:, 0, 0].tolist() == [255, 255, 255]  # beyond the classes
    gray = torch.full((1, 2, 2), 100, dtype=torch.uint8)
    blended = overlay(gray, mask, palette, alpha=0.25)
    assert blended.dtype == torch.uint8 and blended.shape == (3, 2, 2)
    assert blended[:, 0, 1].tolist() == [107, 75, 75]  # 0.75 * 100 + 0.25 * (128, 0, 0)
    assert overlay(gray, mask, palette)[:, 1, 1].tolist() == [178, 178, 178]  # half and half, rounded


def inked(picture: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """Whether text (a dark pixel) is drawn in ``box`` (left, top, right, bottom, inclusive)."""
    left, top, right, bottom = box
    return any(sum(picture.getpixel((x, y))) < 300 for x in range(max(left, 0), right + 1)
               for y in range(top, bottom + 1))


def test_segmentation_figure_draws_image_truth_and_prediction_per_row_and_a_legend():
    """Rows of any size: the tallest sets the upscaling (to at least 224 px below 64 px, 4x from 64 px) and
    the row height, the widest the column width; ignored pixels are white and the legend lists the classes
    shown (three to a row), not all."""
    image = torch.full((3, 8, 8), 90, dtype=torch.uint8)
    truth = torch.zeros(8, 8, dtype=torch.long)
    truth[4:] = 1
    prediction = torch.full((8, 8), 2)
    wide = torch.full((3, 4, 12), 30, dtype=torch.uint8)
    rows = [(image, truth, prediction), (image[:1], prediction, truth),
            (wide, torch.full((4, 12), 255), torch.zeros(4, 12, dtype=torch.long))]
    figure = segmentation_figure(rows, ["sky", "road", "car", "tree"])
    scale = 224 // 8
    h, w, pad, header = 8 * scale, 12 * scale, 4, 18
    assert figure.size == (3 * (w + pad) + pad, header + 3 * (h + pad) + pad + 16 + 8)  # 3 classes: 1 row
    palette = seg_palette(4)
    white = (255, 255, 255)

    def at(row, column, x, y):
        return figure.getpixel((pad + column * (w + pad) + x, header + pad + row * (h + pad) + y))

    assert at(0, 0, 10, 10) == (90, 90, 90) and at(1, 0, 10, 10) == (90, 90, 90)  # a gray image shown in gray
    assert at(0, 1, 10, 10) == tuple(palette[0].tolist())
    assert at(0, 1, 10, h - 10) == tuple(palette[1].tolist())
    assert at(0, 2, 10, 10) == tuple(palette[2].tolist()) and at(1, 1, 10, 10) == tuple(palette[2].tolist())
    assert at(1, 2, 10, h - 10) == tuple(palette[1].tolist())
    assert at(2, 0, w - 5, 10) == (30, 30, 30) and at(0, 0, w - 5, 10) == white  # tiles keep their own size
    assert at(2, 1, 10, 10) == white and at(2, 2, 10, 10) == tuple(palette[0].tolist())
    for row in range(2):  # each tile from its corner, white gaps before and above it
        for column in range(3):
            assert at(row, column, 0, 0) != white
            assert at(row, column, -1, 0) == at(row, column, 0, -1) == white
    for column in range(3):  # its name above each column, none in the gap before it
        left = pad + column * (w + pad)
        assert inked(figure, (left, 3, left + 12, 15)) and not inked(figure, (left - 4, 3, left - 1, 15))
    legend = header + 3 * (h + pad) + pad
    swatch = [figure.getpixel((pad + k * (w + pad) + 5, legend + 7)) for k in range(3)]
    assert swatch == [tuple(palette[c].tolist()) for c in range(3)]  # the classes shown, not "tree"
    many = segmentation_figure(rows, [f"c{i}" for i in range(4)] + ["x"] * 3)
    assert many.size == figure.size
    four = segmentation_figure([(image, truth, torch.arange(64).view(8, 8) % 4)], ["a", "b", "c", "d"])
    assert four.size[1] == header + (8 * scale + pad) + pad + 2 * 16 + 8  # 4 classes shown: 2 legend rows
    large = segmentation_figure([(torch.zeros(3, 64, 64, dtype=torch.uint8), truth.repeat(8, 8),
                                  truth.repeat(8, 8))], ["a", "b"])
    assert large.size == (3 * (256 + pad) + pad, header + 256 + 2 * pad + 16 + 8)


def test_confusion_plot_shades_each_cell_by_its_share_of_the_row():
    """Cells right of a margin as wide as the longest name (cut at 16 characters) and the ids, labelled rows
    and columns, each cell's share of its row as its shade and, where it is not 0, as a number."""
    matrix = [[10, 0, 0, 0], [5, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    plot = confusion_plot(matrix, ["a", "b" * 24, "c", "d"])
    cell, top = 24, 36
    margin = 8 + 6 * (16 + 1 + 1)
    assert plot.size == (340, top + 4 * cell + 8)

    def shade(i, j):
        """The cell's fill, the same at its inner top-left and bottom-right corners (inside the outline)."""
        x, y = margin + j * cell, top + i * cell
        fill = plot.getpixel((x + 1, y + 1))
        assert plot.getpixel((x + cell - 2, y + cell - 2)) == fill
        assert plot.getpixel((x, y)) == (220, 220, 220)
        return fill

    assert shade(0, 0) == (40, 40, 255)  # all of row 0: darkest
    assert shade(0, 1) == (255, 255, 255)
    assert shade(1, 0) == shade(1, 1) == (147, 147, 255)  # half of row 1 each: 255 - round(107.5)
    assert shade(2, 2) == (255, 255, 255)  # a row with no pixels stays white
    assert shade(3, 3) == (40, 40, 255)  # a row of one pixel
    assert inked(plot, (margin + 2, top + cell + 4, margin + 14, top + 2 * cell - 6))  # "50" in black
    assert not inked(plot, (margin + cell + 2, top + 4, margin + 2 * cell - 3, top + cell - 4))  # 0: none
    for i in range(4):
        assert inked(plot, (4, top + i * cell + 4, 12, top + (i + 1) * cell - 4))  # the row's "i name"
        assert inked(plot, (margin + i * cell + 2, top - 14, margin + i * cell + 8, top - 4))  # column's id
    assert confusion_plot(torch.eye(24).tolist(), ["a"] * 24).size[1] == top + 24 * 24 + 8  # 24: full cells
    names = [f"class{i}" for i in range(30)]
    big = confusion_plot([[1] * 30 for _ in range(30)], names)
    assert big.size == (8 + 6 * (7 + 2 + 1) + 30 * 20 + 8, top + 30 * 20 + 8)  # smaller cells: 600 // 30 px
    assert inked(big, (70, top + 4, 80, top + 15))  # 20 px cells still hold their number ("3")
    fifty = confusion_plot(torch.eye(50).tolist(), ["a"] * 50)  # 12 px cells: still labelled
    assert inked(fifty, (4, top, 10, top + 11)) and inked(fifty, (32 + 2, top - 14, 32 + 8, top - 4))
    many = confusion_plot(torch.eye(200, dtype=torch.long).tolist(), [f"c{i}" for i in range(200)])
    assert many.size == (8 + 6 * (4 + 3 + 1) + 200 * 4 + 8, top + 200 * 4 + 8)  # 4 px cells at least


class Drawing:
    """Records what is drawn: (method, arguments, keyword arguments) per call; each call is passed on to
    ``draw`` when one is given (a real drawing, whose picture then holds what was drawn)."""

    def __init__(self, draw=None):
        self.draw, self.calls = draw, []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return None if self.draw is None else getattr(self.draw, name)(*args, **kwargs)
        return call

    def of(self, name: str) -> list:
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


def test_a_plots_axes_run_from_zero_to_its_largest_step_and_value():
    """The y axis ends 5% above the largest value (ticks at 0, half and the end), the x axis at the largest
    step; points are placed on that scale, with dots below 30 points and no line for a single point."""
    draw = Drawing()
    series = {"a": ([2, 4], [1.0, 2.0], "red"), "b": ([3], [0.5], "blue")}
    _plot(draw, (60, 30, 380, 270), "title", series, ".2f", x_label="block")
    texts = {args[1]: args[0] for args, _ in draw.of("text")}
    assert texts == {"title": (60, 16), "0.00": (14, 264), "1.05": (14, 144), "2.10": (14, 24),
                     "0": (60, 273), "block 4": (340, 273), "a": (66, 34), "b": (66, 46)}
    ticks = [args[0] for args, kwargs in draw.of("line") if kwargs["fill"] == "black"]
    assert ticks == [[(57, y), (60, y)] for y in (270, 150, 30)]
    lines = [(args[0], kwargs["fill"]) for args, kwargs in draw.of("line") if kwargs["fill"] != "black"]
    assert len(lines) == 1 and lines[0][1] == "red"
    torch.testing.assert_close(torch.tensor(lines[0][0]), torch.tensor([(220, 270 - 240 / 2.1),
                                                                        (380, 270 - 480 / 2.1)]))
    dots = [(args[0][0][0] + 2, args[0][0][1] + 2, kwargs["fill"]) for args, kwargs in draw.of("ellipse")]
    assert all(b[0] == a[0] + 4 and b[1] == a[1] + 4 for ((a, b),), _ in draw.of("ellipse"))  # 4 px across
    assert [(round(x), round(y), c) for x, y, c in dots] == [(220, 156, "red"), (380, 41, "red"),
                                                             (300, 213, "blue")]
    assert draw.of("rectangle") == [(((60, 30, 380, 270),), {"outline": "black"})]
    many = Drawing()
    _plot(many, (60, 30, 380, 270), "t", {"a": (list(range(30)), [1.0] * 30, "red")}, ".1f")
    assert not many.of("ellipse") and "step 29" in {args[1] for args, _ in many.of("text")}


def test_a_one_block_plot_puts_its_point_at_the_right_edge():
    """A single step 1 (a depth-1 encoder's one block) ends the x axis at 1, its dot at the frame's right."""
    draw = Drawing()
    _plot(draw, (60, 30, 380, 270), "t", {"a": ([1], [2.0], "red")}, ".1f", x_label="block")
    assert "block 1" in {args[1] for args, _ in draw.of("text")}
    ((corner, _),), _ = draw.of("ellipse")[0]
    assert (round(corner[0] + 2), round(corner[1] + 2)) == (380, round(270 - 240 / 1.05))


def test_mae_panels_hide_the_ratio_asked_for_not_the_models_default():
    """The picture's ratio is the run's (`mask_ratio`), not the forward's default 0.75."""
    model = tiny_mae(norm_pix_loss=False)
    images, noise = images_and_noise()
    panels = mae_reconstructions(model, images, 0.5, noise)
    hidden = torch.zeros_like(noise)
    hidden.scatter_(1, noise.argsort(1)[:, 8:], 1.0)
    hidden = model.unpatchify(hidden[..., None].expand(-1, -1, model.patch_size ** 2 * 3))
    assert hidden.mean() == 0.5
    assert torch.equal(panels["masked"], images * (1 - hidden))


@pytest.fixture
def drawings(monkeypatch):
    """The drawings made during a test, each recorded."""
    made, real = [], ImageDraw.Draw

    def draw(image, *args, **kwargs):
        made.append(Drawing(real(image, *args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(ImageDraw, "Draw", draw)
    return made


def test_segmentation_legend_runs_down_in_rows_of_three_and_skips_labels_beyond_the_names(drawings):
    """Each shown class: a 10 px swatch from 2 px below its row's top, its "id name" 14 px right and 1 px
    down, rows of three 16 px apart going down; a label beyond the names (not 255) gets no entry."""
    image = torch.full((3, 8, 8), 90, dtype=torch.uint8)
    truth = torch.arange(64).view(8, 8) % 5  # 0..4, with 4 beyond the four names
    figure = segmentation_figure([(image, truth, truth)], ["a", "b", "c", "d"])
    scale, pad, header = 224 // 8, 4, 18
    w = h = 8 * scale
    top, column = header + (h + pad) + pad, w + pad
    assert figure.size == (3 * column + pad, top + 2 * 16 + 8)
    (draw,) = drawings
    corners = [(pad + (k % 3) * column, top + 16 * (k // 3)) for k in range(4)]
    palette = seg_palette(4)
    assert draw.of("rectangle") == [(([x, y + 2, x + 10, y + 12],),
                                     {"fill": tuple(palette[c].tolist()), "outline": "black"})
                                    for c, (x, y) in enumerate(corners)]
    legend = draw.of("text")[3:]
    assert legend == [(((x + 14, y + 1), f"{c} {name}"), {"fill": "black"})
                      for c, ((x, y), name) in enumerate(zip(corners, "abcd", strict=True))]


def test_segmentation_figure_keeps_a_wide_tiles_height_and_scale_1_from_64_px():
    """An 8 x 16 image is drawn 8 high (the gap below it white), and `scale=1` is kept for 64 px rows."""
    wide = torch.full((3, 8, 16), 30, dtype=torch.uint8)
    labels = torch.zeros(8, 16, dtype=torch.long)
    figure = segmentation_figure([(wide, labels, labels)], ["a"])
    scale, pad, header = 224 // 8, 4, 18
    below = header + pad + 8 * scale
    assert figure.getpixel((pad + 5, below - 1)) == (30, 30, 30)
    assert figure.getpixel((pad + 5, below)) == (255, 255, 255)
    assert figure.size == (3 * (16 * scale + pad) + pad, below + pad + 16 + 8)
    big = torch.zeros(3, 64, 64, dtype=torch.uint8)
    unscaled = segmentation_figure([(big, torch.zeros(64, 64), torch.zeros(64, 64))], ["a"], scale=1)
    assert unscaled.size == (3 * (64 + pad) + pad, header + 64 + 2 * pad + 16 + 8)


def test_confusion_cells_are_boxed_shaded_and_labelled_by_their_rows_share(drawings):
    """Rows of unequal totals: each cell a box of `cell` px less its last pixel, shaded 255 - 215 * share
    (the share of its own row), its percent 2 px in and 6 px above the middle, white on a shade below 140;
    a share of exactly 0.5% still gets its "0", an empty cell no number."""
    matrix = [[3, 1, 0], [115, 100, 0], [1, 199, 0]]
    confusion_plot(matrix, ["a", "b", "c"])
    (draw,) = drawings
    cell, top, margin = 24, 36, 8 + 6 * (1 + 1 + 1)
    shades = [[94, 201, 255], [140, 155, 255], [254, 41, 255]]
    boxes = [(args[0], kwargs["fill"]) for args, kwargs in draw.of("rectangle")]
    assert boxes == [([margin + j * cell, top + i * cell, margin + (j + 1) * cell - 1,
                       top + (i + 1) * cell - 1], (shades[i][j],) * 2 + (255,))
                     for i in range(3) for j in range(3)]
    numbers = [(args[0], args[1], kwargs["fill"]) for args, kwargs in draw.of("text")
               if args[0][1] == top + (args[0][1] - top) // cell * cell + 6 and args[0][0] >= margin]
    expected = {(0, 0): ("75", "white"), (0, 1): ("25", "black"), (1, 0): ("53", "black"),
                (1, 1): ("47", "black"), (2, 0): ("0", "black"), (2, 1): ("100", "white")}
    assert numbers == [((margin + j * cell + 2, top + i * cell + 6), text, fill)
                       for (i, j), (text, fill) in expected.items()]


def test_grid_names_each_column_in_black_above_it(drawings):
    panels = {name: torch.zeros(1, 3, 8, 8) for name in ("original", "masked", "pasted")}
    image_grid(panels, MEAN, STD)
    (draw,) = drawings
    tile, pad = 8 * 14, 4
    assert [(args, kwargs) for args, kwargs in draw.of("text")] == [
        (((pad + j * (tile + pad), 3), name), {"fill": "black"}) for j, name in enumerate(panels)]


def test_a_plots_words_are_black_and_each_series_drawn_in_its_colour_2_px_wide():
    draw = Drawing()
    series = {"a": ([1, 2], [1.0, 2.0], "red"), "b": ([2], [1.0], "blue")}
    _plot(draw, (60, 30, 380, 270), "title", series, ".1f")
    fills = {args[1]: kwargs for args, kwargs in draw.of("text")}
    assert fills == {"title": {"fill": "black"}, "0.0": {"fill": "black"}, "1.1": {"fill": "black"},
                     "2.1": {"fill": "black"}, "0": {"fill": "black"}, "step 2": {"fill": "black"},
                     "a": {"fill": "red"}, "b": {"fill": "blue"}}
    lines = [kwargs for _, kwargs in draw.of("line")]
    assert lines == [{"fill": "black"}] * 3 + [{"fill": "red", "width": 2}]
    assert [kwargs for _, kwargs in draw.of("ellipse")] == [{"fill": "red"}] * 2 + [{"fill": "blue"}]


def test_accuracy_by_depth_labels_its_x_axis_by_block(drawings):
    accuracy_by_depth_plot([{"layer": b, "test_top1": 10.0 * b} for b in (1, 2)], "t")
    (draw,) = drawings
    assert "block 2" in [args[1] for args, _ in draw.of("text")]


def test_a_confusion_plot_is_titled_in_black(drawings):
    confusion_plot([[1, 0], [0, 1]], ["a", "b"])
    (draw,) = drawings
    assert draw.of("text")[0] == (((8, 2), "true class (rows) vs predicted (columns), % of each row"),
                                  {"fill": "black"})
