"""MaskFeat through the command line: pretraining, resume, pictures, exports, every evaluation command on its
runs, one-line errors; its view, its pictures' glyphs and its recipes."""

import json
import math

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTModel

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.methods.maskfeat import GLYPH_SCALE, MaskFeatView, hog_glyphs, hog_strokes
from mimkit.registry import method_of, read_config
from mimkit.runs import latest_weights, load_run
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import grid_size, perturb

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY = [arg for kv in ("depth=2", "embed_dim=32", "num_heads=2") for arg in ("--set", f"model.kwargs.{kv}")]
QUICK = [*COMMON, *TINY, "--set", "model.patch_size=8"]  # a 4x4 grid of 8-px patches, 2x2 cells of 4 px each


def maskfeat(out, *extra):
    return main(["pretrain", "maskfeat", "--out", str(out), *QUICK, *extra])


@pytest.fixture(scope="module")
def maskfeat_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("maskfeat") / "run"
    assert maskfeat(run, "--max-steps", "2", "--set", "maskfeat.hog_cell=4") == 0
    return run


def test_a_run_predicts_hog_and_its_encoder_exports_to_timm_and_transformers(maskfeat_run, tmp_path):
    model, config = load_run(maskfeat_run)
    assert config.method == "maskfeat" and config.settings.hog_cell == 4
    assert model.head.out_features == 3 * 9 * 2 * 2  # RGB, 9 bins, 2x2 cells a patch
    assert main(["export", str(maskfeat_run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    vit = timm.create_model(timm_config["architecture"], pretrained=False, **timm_config["model_args"])
    vit.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    assert main(["export", str(maskfeat_run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        assert torch.allclose(vit.forward_features(x), ours, atol=1e-5)
        assert torch.allclose(hf(pixel_values=x).last_hidden_state, ours, atol=1e-5)


def test_visualize_draws_the_hog_and_its_prediction(maskfeat_run, tmp_path):
    assert main(["visualize", str(maskfeat_run), "--out", str(tmp_path / "hog.png"), "--n", "2"]) == 0
    # original, masked, HOG, prediction
    assert Image.open(tmp_path / "hog.png").size == grid_size(4, 2, 32)


def test_the_pictures_draw_the_hog_and_the_prediction_at_the_hidden_patches_only(maskfeat_run):
    """The HOG panel is the image's; the prediction panel the same but for the model's features at the patches
    it was shown masked (a perturbed head makes them differ visibly)."""
    model, config = load_run(maskfeat_run)
    perturb(model.head)
    torch.manual_seed(0)
    shown = torch.randn(2, 3, 32, 32)
    panels = method_of("maskfeat").pictures(model, config, lambda size, mean, std: shown,
                                            torch.Generator().manual_seed(0))
    hidden = (panels["masked"] == 0).all(1)[:, ::8, ::8]  # [2, 4, 4]: the 8-px patches it masked
    assert hidden.any() and not hidden.all()
    with torch.no_grad():
        _, pred, target = model(shown, hidden)
    predicted = torch.where(hidden.flatten(1)[..., None], pred, target)
    glyph, norm = GLYPH_SCALE * model.hog.cell_size, (3, config.data.mean, config.data.std)
    for panel, features in (("HOG", target), ("prediction", predicted)):
        torch.testing.assert_close(panels[panel], hog_glyphs(model.hog.to_cells(features, 8), glyph, *norm))
    assert not torch.equal(panels["prediction"], panels["HOG"])


def test_glyphs_draw_each_bin_along_its_edge():
    strokes = hog_strokes(9, 8)
    assert strokes.shape == (9, 8, 8)
    # bin 4 (horizontal gradients: a vertical edge) is a vertical stroke, bin 0 nearly a horizontal one
    assert torch.equal(strokes[4].sum(0) > 0, torch.tensor([False] * 3 + [True] * 2 + [False] * 3))
    assert strokes[0].sum(1).argmax() in (3, 4) and (strokes[0].sum(1) > 0).sum() <= 4
    cells = torch.zeros(1, 1, 9, 2, 2)
    cells[0, 0, 4, 1, 0] = 1.0  # one vertical glyph in the bottom-left cell
    drawn = hog_glyphs(cells, 8, 3, [0.5] * 3, [0.25] * 3) * 0.25 + 0.5  # back to [0, 1]
    assert drawn.shape == (1, 3, 16, 16) and torch.equal(drawn[0, 0], drawn[0, 2])
    assert drawn[0, 0, 8:, :8].sum() > 0 and drawn[0, 0, :8].sum() == drawn[0, 0, 8:, 8:].sum() == 0
    two = torch.zeros(1, 2, 9, 1, 1)
    two[0, 1, 4] = 1.0  # a vertical glyph in the second channel only: the channels' mean draws it half bright
    half = hog_glyphs(two[:, 1:], 8, 1, [0.0], [1.0]) / 2
    torch.testing.assert_close(hog_glyphs(two, 8, 1, [0.0], [1.0]), half)



@pytest.mark.parametrize("nbins, side", [(2, 8), (4, 8), (9, 12)])
def test_each_stroke_is_a_line_through_the_centre_at_its_bins_angle_half_the_glyph_long(nbins, side):
    """Bin b's stroke: the pixels within one pixel of the line through the glyph's centre that rises at
    (b + 0.5) * 180 / nbins degrees (counter-clockwise from the horizontal, y up), as bright as they are
    near it, cut at half the glyph's side from the centre (the diagonal strokes do not reach the corners)."""
    strokes = hog_strokes(nbins, side)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x, y = cols - (side - 1) / 2, (side - 1) / 2 - rows  # from the centre, y up
    for b in range(nbins):
        angle = (b + 0.5) * math.pi / nbins
        across = (x * math.sin(angle) - y * math.cos(angle)).abs()
        along = (x * math.cos(angle) + y * math.sin(angle)).abs()
        torch.testing.assert_close(strokes[b], (1 - across).clamp(min=0) * (along <= side / 2))
        torch.testing.assert_close(strokes[nbins - 1 - b], strokes[b].flip(1))  # mirrored angles
    if nbins == 2:  # 45 degrees: the diagonal, its corner pixels (5 px from the centre) left out
        assert strokes[0][0, -1] == strokes[0][-1, 0] == 0 and strokes[0][1, -2] == 1


def test_a_glyph_saturates_at_white_where_strokes_cross_and_a_negative_bin_draws_nothing():
    cells = torch.ones(1, 1, 9, 1, 1) * 2.0  # every bin lit twice over: the centre sums nine strokes
    drawn = hog_glyphs(cells, 8, 1, [0.5], [0.25]) * 0.25 + 0.5  # back to [0, 1]
    assert drawn.max() == 1.0 and drawn[0, 0, 3:5, 3:5].eq(1.0).all()
    negative = -torch.ones(1, 1, 9, 1, 1)  # a prediction below zero: no stroke, not a dark one
    assert torch.equal(hog_glyphs(negative, 8, 1, [0.0], [1.0]), torch.zeros(1, 1, 8, 8))

def test_the_view_masks_blocks_of_the_run_and_follows_the_seed():
    view = MaskFeatView(32, [0.5] * 3, [0.5] * 3, grid=4, num_masked=6, min_block=2, scale=(0.5, 1.0))
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    one = view(image)
    torch.manual_seed(3)
    two = view(image)
    assert one["image"].shape == (3, 32, 32) and one["mask"].shape == (16,) and one["mask"].sum() == 6
    assert torch.equal(one["mask"], two["mask"]) and torch.equal(one["image"], two["image"])


def test_maskfeat_resumes_bit_for_bit(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert maskfeat(straight, "--max-steps", "4") == 0
    assert maskfeat(resumed, "--max-steps", "4", "--set", "train.checkpoint_every=2") == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    capsys.readouterr()
    assert maskfeat(resumed, "--max-steps", "4") == 0
    assert "resuming from step 2" in "".join(capsys.readouterr())
    one, two = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_every_evaluation_command_takes_a_maskfeat_run(maskfeat_run, tmp_path):
    from tests.eval.test_segment import QUICK as QUICK_SEG
    from tests.eval.test_segment import write_layout

    probe = ["--data", "synthetic", "--label-fraction", "0.5", "--num-workers", "0"]
    assert main(["finetune", str(maskfeat_run), "--data", "synthetic", "--out", str(tmp_path / "ft"),
                 "--max-steps", "2", "--batch-size", "16", "--set", "data.num_workers=0"]) == 0
    assert main(["linprobe", str(maskfeat_run), "--out", str(tmp_path / "lp"), "--epochs", "1", *probe]) == 0
    assert main(["knn", str(maskfeat_run), "--out", str(tmp_path / "knn"), "--layer", "all", *probe]) == 0
    layers = json.loads((tmp_path / "knn" / "results.json").read_text())["by_layer"]
    assert [r["layer"] for r in layers] == [1, 2]
    data = write_layout(tmp_path / "scenes", "generic")
    assert main(["segment", str(maskfeat_run), "--data", str(data), "--out", str(tmp_path / "seg"),
                 *QUICK_SEG]) == 0
    images = data / "images" / "val"
    for run, out in (("seg", "pred"), ("ft", "cls")):  # a segmentation run's and a fine-tuning run's
        assert main(["predict", str(tmp_path / run), "--images", str(images),
                     "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "cls" / "predictions.csv").exists()


@pytest.mark.parametrize("extra, message", [
    (["--set", "maskfeat.mask_ratio=1.0"], "config 'maskfeat.mask_ratio' must be in (0, 1), got 1.0"),
    (["--set", "maskfeat.mask_ratio=0.01"], "maskfeat.mask_ratio=0.01 masks 0 of the 16 patches"),
    (["--set", "maskfeat.hog_cell=3"], "the HOG cell size 3 does not divide the patch size 8"),
    (["--set", "maskfeat.hog_window=12"], "the HOG Gaussian window 12 does not divide the image size 32"),
    (["--set", "maskfeat.min_block=9"], "maskfeat.min_block=9 is more than the 6 patches masked"),
    (["--set", "maskfeat.crop_scale=[0.5,2.0]"], "maskfeat.crop_scale' must be 0 < low <= high <= 1"),
])
def test_bad_maskfeat_settings_are_one_line_errors(tmp_path, capsys, extra, message):
    assert maskfeat(tmp_path / "bad", "--max-steps", "1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_recipes_read_and_the_in1k_one_is_the_authors_setting():
    fmnist = read_config(load_recipe("maskfeat_fmnist"))
    assert (fmnist.model.patch_size, fmnist.settings.hog_cell, fmnist.settings.mask_ratio) == (4, 4, 0.4)
    in1k = read_config(load_recipe("maskfeat_in1k"))
    s = in1k.settings
    assert (in1k.model.name, in1k.model.patch_size, in1k.data.img_size) == ("vit_base", 16, 224)
    assert (s.hog_bins, s.hog_cell, s.hog_window, s.min_block, s.crop_scale) == (9, 8, 16, 15, (0.5, 1.0))
    assert round(196 * s.mask_ratio) == 78
    assert (in1k.optim.base_lr, in1k.optim.clip_grad, in1k.train.epochs) == (2e-4, 0.02, 300)


def test_the_start_up_summary_tells_the_masking_and_the_hog():
    config = read_config({"method": "maskfeat",
                          "maskfeat": {"mask_ratio": 0.5, "hog_bins": 6, "hog_cell": 4}})
    expected = ", 50% masked block-wise, HOG targets (6 bins, 4-px cells)"
    assert method_of("maskfeat").describe(config) == expected
