import pickle

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2

from mimkit.data.transforms import BEiTView, crop_view, denormalize, eval_view, mae_view, normalize
from mimkit.errors import MimkitError

MEAN, STD = (0.2860,), (0.3530,)


def random_image(channels=1, height=28, width=28, seed=0):
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_mae_view_shapes_and_dtypes():
    out = mae_view(32, MEAN, STD, patch_size=4)(random_image())
    assert set(out) == {"image", "noise"}
    assert out["image"].shape == (1, 32, 32) and out["image"].dtype == torch.float32
    assert out["noise"].shape == (64,) and out["noise"].dtype == torch.float32
    assert 0 <= out["noise"].min() and out["noise"].max() < 1
    rgb = mae_view(16, (0.5,) * 3, (0.5,) * 3, patch_size=8)(random_image(3, 20, 30))
    assert rgb["image"].shape == (3, 16, 16) and rgb["noise"].shape == (4,)


def test_mae_view_reproducible_under_manual_seed():
    view, image = mae_view(28, MEAN, STD, patch_size=4), random_image()
    torch.manual_seed(7)
    first = view(image)
    torch.manual_seed(7)
    again = view(image)
    other = view(image)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["noise"], other["noise"])
    assert not torch.equal(first["image"], other["image"])  # a different crop or flip


def test_mae_view_full_crop_keeps_content():
    image = random_image()
    view = mae_view(28, MEAN, STD, patch_size=4, scale=(1.0, 1.0))  # aspect ratio may still vary a bit
    flips = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = denormalize(view(image)["image"], MEAN, STD)
        flips.add(torch.allclose(out, image.flip(-1) / 255, atol=0.15))
    assert len(flips) == 2  # both orientations seen, not a noise image


def test_mae_view_rejects_indivisible_patch():
    with pytest.raises(MimkitError, match="img_size=30 is not a multiple of patch_size=4"):
        mae_view(30, MEAN, STD, patch_size=4)


def test_normalization_values():
    image = torch.full((3, 10, 10), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.1)
    out = eval_view(10, mean, std)(image)["image"]
    expected = torch.tensor([(0.2 - m) / s for m, s in zip(mean, std, strict=True)])
    assert torch.allclose(out.mean((1, 2)), expected, atol=1e-5) and out.std((1, 2)).max() < 1e-5
    assert torch.allclose(denormalize(out, mean, std), torch.full((3, 10, 10), 0.2), atol=1e-6)
    assert torch.allclose(normalize(mean, std)(image), out)


def test_eval_view_small_images_are_resized_whole():
    image = random_image()
    out = eval_view(28, MEAN, STD)(image)["image"]
    assert torch.allclose(denormalize(out, MEAN, STD), image / 255, atol=1e-6)  # identity at native size
    assert eval_view(32, MEAN, STD)(image)["image"].shape == (1, 32, 32)


def test_eval_view_imagenet_crop():
    image = torch.zeros((3, 256, 320), dtype=torch.uint8)
    image[:, 16:240, 48:272] = 255  # the central 224 x 224 of the short-side-256 image
    out = eval_view(224, (0.0,) * 3, (1.0,) * 3)(image)["image"]
    assert out.shape == (3, 224, 224) and out.min() > 0.99
    assert eval_view(224, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)(image)["image"].min() < 0.01


def test_eval_view_is_deterministic_and_picklable():
    view = pickle.loads(pickle.dumps(eval_view(32, MEAN, STD)))
    image = random_image()
    assert torch.equal(view(image)["image"], view(image)["image"])
    mae = pickle.loads(pickle.dumps(mae_view(32, MEAN, STD, patch_size=8)))
    assert mae(image)["noise"].shape == (16,)


def test_an_evaluation_views_repr_tells_its_settings_apart():
    """The feature cache is keyed by the view's repr (`mimkit.eval.features`): equal settings give one
    repr, any other size, crop or normalization another."""
    key = repr(eval_view(32, MEAN, STD))
    assert key == repr(eval_view(32, MEAN, STD)) and key.startswith("ImageView(")
    others = [eval_view(28, MEAN, STD), eval_view(32, MEAN, STD, crop_pct=0.875), eval_view(32, (0.5,), STD),
              eval_view(32, MEAN, (0.5,))]
    assert len({key, *map(repr, others)}) == 5


def test_denormalize_batch_and_clamp():
    x = torch.tensor([-100.0, 0.0, 100.0]).view(1, 1, 1, 3).expand(2, 1, 1, 3)
    out = denormalize(x, (0.5,), (0.1,))
    assert out.shape == (2, 1, 1, 3) and out.flatten().tolist() == [0.0, 0.5, 1.0] * 2
    # the statistics follow the images' dtype and device (the meta device stands in for a GPU here)
    assert denormalize(x.bfloat16(), (0.5,), (0.1,)).dtype == torch.bfloat16
    assert denormalize(x.to("meta"), (0.5,), (0.1,)).device.type == "meta"


def test_a_channel_last_crop_comes_out_contiguous_with_the_same_pixels():
    """A crop decode's pixels lie [h, w, C] in memory; the view hands over a contiguous image (normalizing
    the channel-last layout costs ~5x), and the pixels do not depend on the layout."""
    view, crop = mae_view(16, (0.5,) * 3, (0.5,) * 3, patch_size=8), random_image(3, 24, 20)
    channel_last = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    torch.manual_seed(3)
    expected = view.from_crop(crop)["image"]
    torch.manual_seed(3)
    handed_over = view.from_crop(channel_last)["image"]
    assert handed_over.is_contiguous()
    assert torch.equal(handed_over, expected)


@pytest.mark.parametrize("make", [lambda scale: crop_view(16, MEAN, STD, scale=scale),
                                  lambda scale: mae_view(16, MEAN, STD, patch_size=8, scale=scale)])
def test_the_crop_scale_reaches_the_crop(make):
    """A scale of (1, 1) on a square image leaves the whole image for every draw (an aspect ratio away from
    1 cannot fit: the crop falls back to the whole image); the default (0.2, 1) rarely does."""
    torch.manual_seed(0)
    assert {make((1.0, 1.0)).draw_box(20, 20) for _ in range(20)} == {(0, 0, 20, 20)}
    assert len({make((0.2, 1.0)).draw_box(20, 20) for _ in range(20)}) > 10


def test_beit_view_normalizes_each_resolution_with_its_own_statistics_and_jitters_only_when_asked():
    image = torch.full((3, 40, 40), 102, dtype=torch.uint8)  # 0.4 everywhere: every crop is the same
    view = BEiTView(16, 8, (0.2,) * 3, (0.5,) * 3, (0.3,) * 3, (0.5,) * 3, grid=4, num_masked=5,
                    color_jitter=0.0)
    out = view(image)
    assert out["image"].shape == (3, 16, 16) and torch.allclose(out["image"], torch.tensor(0.4), atol=1e-5)
    assert out["tokenizer_image"].shape == (3, 8, 8)
    assert torch.allclose(out["tokenizer_image"], torch.tensor(0.2), atol=1e-5)  # (0.4 - 0.3) / 0.5
    assert out["mask"].shape == (16,) and int(out["mask"].sum()) == 5
    jittered = BEiTView(16, 8, (0.2,) * 3, (0.5,) * 3, (0.3,) * 3, (0.5,) * 3, grid=4, num_masked=5)
    assert not torch.allclose(jittered(image)["image"], out["image"], atol=1e-3)


def test_beit_view_crop_scale_and_aspect_ratio():
    """A scale of (1, 1) keeps the whole image: a left-to-right ramp stays a full ramp at both sizes."""
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(3, 32, 32).contiguous()
    view = BEiTView(32, 16, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, grid=4, num_masked=1,
                    scale=(1.0, 1.0), color_jitter=0.0)
    for seed in range(5):
        torch.manual_seed(seed)
        out = view(ramp)["image"]
        assert any(torch.allclose(out, whole / 255, atol=1e-6) for whole in (ramp, ramp.flip(-1)))
    torch.manual_seed(0)
    cropping = BEiTView(32, 16, MEAN, STD, MEAN, STD, grid=4, num_masked=1, color_jitter=0.0)
    first_pixels = {tuple(cropping(ramp)["image"][0, 0, :2].tolist()) for _ in range(10)}
    assert len(first_pixels) > 5  # the default scale (0.08, 1) crops


@pytest.mark.parametrize("img_size, crop_pct", [(127, 1.0), (128, 0.875)])
def test_eval_view_takes_the_imagenet_crop_from_128_px_up(img_size, crop_pct):
    image = random_image(1, 150, 170)
    default = eval_view(img_size, MEAN, STD)(image)["image"]
    assert torch.equal(default, eval_view(img_size, MEAN, STD, crop_pct=crop_pct)(image)["image"])
    other = 1.0 if crop_pct < 1 else 0.875
    assert not torch.equal(default, eval_view(img_size, MEAN, STD, crop_pct=other)(image)["image"])


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.01])
def test_eval_view_refuses_a_crop_pct_outside_0_1(crop_pct):
    with pytest.raises(MimkitError, match=rf"crop_pct={crop_pct} must be in \(0, 1\]"):
        eval_view(32, MEAN, STD, crop_pct=crop_pct)


@pytest.mark.parametrize("height, width", [(12, 40), (40, 12), (17, 23)])
def test_a_crop_view_of_a_non_square_image_is_torchvisions_crop_and_flip(height, width):
    """On images taller or wider than square, the crop box the view draws (its top and left, its height and
    width) and cuts is the one torchvision's RandomResizedCrop cuts under the same seed: a box read in another
    order moves off the image or turns it, which a square image hides."""
    image = random_image(3, height, width, seed=height)
    view = crop_view(8, (0.0,) * 3, (1.0,) * 3, scale=(0.1, 0.5))
    crop = v2.RandomResizedCrop(8, (0.1, 0.5), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    reference = v2.Compose([crop, v2.RandomHorizontalFlip()])
    for seed in range(6):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(view(image)["image"], expected.float() / 255)


def test_crop_view_gives_the_image_alone():
    """No mask noise for a view that asks for none (the dVAE's)."""
    assert set(crop_view(16, MEAN, STD)(random_image())) == {"image"}


def checkerboard(side: int) -> torch.Tensor:
    """0 and 255 in alternate pixels: any downscaling that is not antialiased keeps extremes."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return ((rows + cols) % 2 * 255).to(torch.uint8).expand(3, side, side).contiguous()


def test_downscaling_views_are_antialiased():
    """A 1-pixel checkerboard shrunk 3.75x and 7.5x is a flat grey, in the BEiT view's two resolutions and
    the evaluation view (bicubic without antialiasing samples the pattern: values near 0 and 1 stay; at
    whole factors it samples half-way between pixels, grey too, hence 60 px)."""
    beit = BEiTView(16, 8, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, grid=4, num_masked=1,
                    scale=(1.0, 1.0), color_jitter=0.0)
    out = beit(checkerboard(60))
    evaluated = eval_view(16, (0.0,) * 3, (1.0,) * 3)(checkerboard(60))["image"]
    for image in (out["image"], out["tokenizer_image"], evaluated):
        assert (image - 0.5).abs().max() < 0.1


def test_beit_view_crops_within_its_aspect_ratio_range():
    """Channel 0 is the column and channel 1 the row: the spans of a view's values give its crop's width
    and height, whose ratio stays in BEiT's (3/4, 4/3) (with a margin for the resampling)."""
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    coordinates = torch.stack([cols * 4, rows * 4, rows * 0]).to(torch.uint8)
    view = BEiTView(32, 16, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, grid=4, num_masked=1,
                    color_jitter=0.0)
    torch.manual_seed(0)
    for _ in range(30):
        image = view(coordinates)["image"]
        width, height = (image[c].max() - image[c].min() for c in (0, 1))
        assert 0.6 < width / height < 1.6


def test_views_resample_bicubic():
    """An upscaled step from 50 to 200 overshoots on both sides with bicubic resampling (the papers' and
    timm's choice); bilinear stays within [50, 200]."""
    step = torch.full((3, 8, 8), 50, dtype=torch.uint8)
    step[..., 4:] = 200
    beit = BEiTView(32, 16, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, grid=4, num_masked=1,
                    scale=(1.0, 1.0), color_jitter=0.0)(step)
    crop = crop_view(32, (0.0,) * 3, (1.0,) * 3, scale=(1.0, 1.0))(step)["image"]
    evaluated = eval_view(32, (0.0,) * 3, (1.0,) * 3)(step)["image"]
    for image in (beit["image"], beit["tokenizer_image"], evaluated, crop):
        assert image.min() < 49 / 255 and image.max() > 201 / 255


def test_beit_view_crops_both_wider_and_taller_than_square(monkeypatch):
    """BEiT's aspect range (3/4, 4/3) reaches the crop: some boxes are wider than tall, some taller."""
    boxes, draw = [], RandomResizedCrop.get_params

    def recording(*args):
        boxes.append(draw(*args))
        return boxes[-1]

    monkeypatch.setattr(RandomResizedCrop, "get_params", recording)
    view = BEiTView(16, 8, MEAN * 3, STD * 3, MEAN * 3, STD * 3, grid=4, num_masked=1, scale=(0.25, 0.25),
                    color_jitter=0.0)
    for seed in range(30):
        torch.manual_seed(seed)
        view(random_image(3, 40, 40))
    assert {"wide", "tall"} <= {"wide" if w > h else "tall" if h > w else "square" for _, _, h, w in boxes}


def test_beit_views_color_jitter_reaches_saturation():
    """Brightness and contrast scale a colour pixel's chroma (R - G) and its grey level's distance from a grey
    pixel alike; saturation scales the chroma alone. On a float image (no rounding) their ratio moves only
    when saturation is jittered."""
    image = torch.full((3, 32, 32), 0.2)
    image[:, :, 16:] = torch.tensor([0.5, 0.25, 0.12])[:, None, None]

    def chroma_over_grey(out):
        grey, colour = out[:, 4, 2], out[:, 4, -3]  # far from the halves' border, whichever way it flipped
        if not torch.allclose(grey, grey[0].expand(3)):
            grey, colour = colour, grey
        weights = torch.tensor([0.2989, 0.587, 0.114])
        return float((colour[0] - colour[1]) / (weights @ colour - weights @ grey))

    ratios = {}
    for jitter in (0.0, 0.4):
        view = BEiTView(32, 16, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3, grid=4, num_masked=1,
                        scale=(1.0, 1.0), color_jitter=jitter)
        ratios[jitter] = []
        for seed in range(10):
            torch.manual_seed(seed)
            ratios[jitter].append(chroma_over_grey(view(image)["image"]))
    plain = chroma_over_grey(image)
    assert all(abs(r / plain - 1) < 1e-3 for r in ratios[0.0])
    assert max(abs(r / plain - 1) for r in ratios[0.4]) > 0.1
