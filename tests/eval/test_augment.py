"""Fine-tuning augmentation is timm's (RandAugment policy string, pixel-noise erasing, Mixup with its switch
probability), with every RNG it draws from decided by the per-sample torch seed."""

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.functional import resized_crop
from torchvision.transforms.v2.functional import to_pil_image

from mimkit.cli import main
from mimkit.data.loader import SeededViews
from mimkit.errors import MimkitError
from mimkit.eval.augment import FinetuneView, MixTargets, python_seed
from mimkit.train.checkpoint_files import Checkpoints

POLICY = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def image(channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, 32, 32), dtype=torch.uint8, generator=generator)


def seed_python_from_torch() -> None:
    python = python_seed()
    random.seed(python)
    np.random.seed(python)


def timm_reference(img, seed):
    """timm's training transform in the stages of its GPU prefetcher (crop and flip, RandAugment to uint8;
    then normalize and erase), its RNGs set as the view sets them from torch seed `seed`: Python's and
    NumPy's seeded from torch before the crop box, before RandAugment and before the erasing."""
    crop_and_flip, augment, to_tensor = create_transform(
        32, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=None, auto_augment=POLICY,
        interpolation="bicubic", mean=MEAN, std=STD, use_prefetcher=True, separate=True)
    crop, flip = crop_and_flip.transforms
    picture = to_pil_image(img)
    torch.manual_seed(seed)
    seed_python_from_torch()
    box = crop.get_params(picture, crop.scale, crop.ratio)
    picture = flip(resized_crop(picture, *box, list(crop.size), crop.interpolation))
    seed_python_from_torch()
    uint8 = to_tensor(augment(picture))
    normalized = (uint8.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    seed_python_from_torch()
    return uint8, RandomErasing(0.25, mode="pixel", device="cpu")(normalized)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_view_equals_timm_transform_with_the_same_policy_and_rng(seed):
    view = FinetuneView(32, MEAN, STD, auto_augment=POLICY, reprob=0.25, remode="pixel")
    text = repr(view)
    assert "RandAugment(n=2" in text and "m=9, mstd=0.5" in text and "Increasing" in text
    assert "RandomErasing(p=0.25, mode=pixel" in text
    uint8, expected = timm_reference(image(), seed)
    torch.manual_seed(seed)
    handed_over = view.from_image(image())["image"]
    assert handed_over.dtype == torch.uint8 and torch.equal(handed_over, uint8)
    torch.testing.assert_close(view.on_device({"image": handed_over})["image"], expected)


def test_workers_hand_over_uint8_and_the_batch_is_finished_where_it_lies():
    """With a uint8 hand-over the items are the augmented uint8 images of the float path, and `on_device`
    normalizes and erases a whole batch: about `reprob` of its images get one erased rectangle."""
    source = [(image(seed=i), i % 3) for i in range(32)]
    plain = FinetuneView(32, MEAN, STD, reprob=0.0)
    floats, uint8 = SeededViews(source, plain), SeededViews(source, plain).handing_over_uint8()
    items = [uint8[(i, 7 + i)] for i in range(32)]
    assert all(item["image"].dtype == torch.uint8 for item in items)
    batch = plain.on_device({"image": torch.stack([item["image"] for item in items])})["image"]
    assert torch.equal(batch, torch.stack([floats[(i, 7 + i)]["image"] for i in range(32)]))
    erasing = FinetuneView(32, MEAN, STD, reprob=0.5, remode="const")
    torch.manual_seed(0)
    erased = erasing.on_device({"image": torch.stack([item["image"] for item in items])})["image"]
    zeroed = [(row == 0).all(0).sum().item() for row in erased]  # "const" erasing writes 0 in every channel
    assert 8 <= sum(n > 0 for n in zeroed) <= 24
    assert all(n == 0 or n >= 0.02 * 32 * 32 - 1 for n in zeroed)  # a rectangle of at least 2% of the image
    torch.manual_seed(0)
    again = erasing.on_device({"image": torch.stack([item["image"] for item in items])})["image"]
    assert torch.equal(erased, again)


def test_erasing_paints_one_rectangle_per_image_as_the_papers():
    """MAE's and BEiT's random erasing (``max_count=1``): at ``reprob=1`` every image gets exactly one
    rectangle, so its erased pixels fill their own bounding box."""
    erasing = FinetuneView(32, MEAN, STD, reprob=1.0, remode="const")
    torch.manual_seed(0)
    batch = torch.full((32, 3, 32, 32), 200, dtype=torch.uint8)  # no pixel is 0 after normalization
    for erased in erasing.on_device({"image": batch})["image"]:
        rows, cols = (erased == 0).all(0).nonzero().unbind(1)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(rows) == box


@pytest.mark.parametrize("remode", ["pixel", "rand", "const"])
def test_each_erasing_mode_paints_what_it_names(remode):
    """``pixel``: noise per pixel; ``rand``: one random value per channel over the rectangle; ``const``: 0."""
    torch.manual_seed(0)
    batch = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    images = FinetuneView(32, MEAN, STD, reprob=1.0, remode=remode).on_device({"image": batch})["image"]
    untouched = FinetuneView(32, MEAN, STD, reprob=0.0).on_device({"image": batch[0]})["image"][:, 0, 0]
    for erased in images:
        painted = erased[:, (erased != untouched[:, None, None]).any(0)]  # (C, pixels of the rectangle)
        assert painted.shape[1] > 0
        one_value_per_channel = all(len(channel.unique()) == 1 for channel in painted)
        assert one_value_per_channel == (remode != "pixel")
        assert (painted == 0).all() == (remode == "const")


def test_seeded_views_are_reproducible_and_leave_global_rngs_alone():
    view = FinetuneView(32, MEAN, STD)
    source = [(image(seed=i), i % 3) for i in range(4)]
    views = SeededViews(source, view)
    random.seed(5)
    np.random.seed(5)
    before = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    first = [views[(i, 100 + i)]["image"] for i in range(4)]
    assert (random.random(), np.random.rand()) == before  # the view restored Python's and NumPy's state
    again = [views[(i, 100 + i)]["image"] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = views[(0, 999)]["image"]
    assert not torch.equal(other, first[0])


def test_the_crop_scale_reaches_the_crop_box():
    """A crop area of exactly the whole image leaves timm one box: the image itself, whatever the seed."""
    whole = FinetuneView(32, MEAN, STD, crop_scale=(1.0, 1.0))
    default = FinetuneView(32, MEAN, STD)
    boxes = []
    for seed in range(8):
        torch.manual_seed(seed)
        assert whole.draw_box(32, 32) == (0, 0, 32, 32)
        boxes.append(default.draw_box(32, 32))
    assert len(set(boxes)) > 1


def test_without_a_policy_the_view_only_crops_and_flips():
    """``auto_augment: null`` leaves RandAugment out and puts nothing in its place (timm's colour jitter,
    which `create_transform` adds when no policy is given, stays off): a whole-image crop comes back as the
    image or its mirror, pixel for pixel. With the policy, some seeds change the pixels."""
    plain = FinetuneView(32, MEAN, STD, crop_scale=(1.0, 1.0), auto_augment=None, reprob=0.0)
    augmented = FinetuneView(32, MEAN, STD, crop_scale=(1.0, 1.0), reprob=0.0)
    original = image()
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = plain.from_image(original)["image"]
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
        torch.manual_seed(seed)
        out = augmented.from_image(original)["image"]
        changed += not (torch.equal(out, original) or torch.equal(out, original.flip(-1)))
    assert changed > 0


def test_gray_images_and_bad_policies():
    view = FinetuneView(32, (0.3,), (0.35,))
    for seed in range(40):  # every operation of the policy works on one channel
        torch.manual_seed(seed)
        assert view(image(channels=1, seed=seed))["image"].shape == (1, 32, 32)
    with pytest.raises(MimkitError, match="not a timm policy"):
        FinetuneView(32, MEAN, STD, auto_augment="bogus-m9")
    with pytest.raises(MimkitError, match="remode"):
        FinetuneView(32, MEAN, STD, remode="zeros")


@pytest.mark.parametrize("crop_scale", [(0.0, 1.0), (0.5, 0.4), (0.5, 1.5)])
def test_a_crop_scale_outside_0_to_1_or_upside_down_is_refused(crop_scale):
    with pytest.raises(MimkitError, match=r"'augment.crop_scale' must be 0 < low <= high <= 1"):
        FinetuneView(32, MEAN, STD, crop_scale=crop_scale)


# the papers' settings, and others that must reach timm too
MIX_SETTINGS = [dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1, switch_prob=0.5, prob=1.0),
                dict(mixup=0.3, cutmix=0.6, label_smoothing=0.0, switch_prob=0.9, prob=0.6),
                dict(mixup=0.0, cutmix=1.0, label_smoothing=0.1, switch_prob=0.5, prob=1.0),  # cutmix alone
                dict(mixup=0.8, cutmix=0.0, label_smoothing=0.1, switch_prob=0.5, prob=1.0)]  # mixup alone


@pytest.mark.parametrize("settings", MIX_SETTINGS)
def test_mix_is_timm_mixup_decided_by_the_torch_rng(settings):
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    given = images.clone()
    mix = MixTargets(4, **settings)
    outputs = []
    for seed in range(16):  # enough batches that each setting decides some
        torch.manual_seed(seed)
        mixed, targets = mix(images, labels)
        torch.manual_seed(seed)
        python = python_seed()
        np.random.seed(python)
        random.seed(python)
        expected = Mixup(mixup_alpha=settings["mixup"], cutmix_alpha=settings["cutmix"],
                         switch_prob=settings["switch_prob"], prob=settings["prob"],
                         label_smoothing=settings["label_smoothing"], num_classes=4)(images.clone(), labels)
        assert torch.equal(mixed, expected[0]) and torch.equal(targets, expected[1])
        outputs.append(mixed)
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])
    assert torch.equal(images, given)  # timm mixes in place: the caller's batch must be left as it was
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    with pytest.raises(MimkitError, match="even batch"):
        mix(images[:7], labels[:7])


def test_with_mixup_and_cutmix_off_the_batch_passes_and_the_targets_are_smoothed_one_hot():
    """Any batch size, odd included; every image as it came; target ``1 - eps + eps / C`` at the label."""
    images, labels = torch.randn(7, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    torch.manual_seed(0)
    mixed, targets = MixTargets(4, mixup=0.0, cutmix=0.0, label_smoothing=0.2)(images, labels)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(labels, 4) * 0.8 + 0.05)


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=1.0), dict(label_smoothing=-0.1), dict(mixup=-1.0),
                                    dict(switch_prob=1.5)])
def test_mix_refuses_settings_out_of_range(kwargs):
    """A label smoothing of 1 makes every target uniform (nothing left to learn): refused like the others."""
    with pytest.raises(MimkitError, match="must be"):
        MixTargets(4, **kwargs)
    MixTargets(4, label_smoothing=0.99)


@pytest.mark.slow
def test_finetune_with_the_papers_augmentation_resumes_exactly(tmp_path):
    """RandAugment, pixel erasing, mixup/cutmix on: a run cut at step 2 and resumed ends bit-identical."""
    tiny = [a for kv in ("depth=2", "embed_dim=32", "num_heads=2", "decoder_depth=1", "decoder_embed_dim=32",
                         "decoder_num_heads=2") for a in ("--set", f"model.kwargs.{kv}")]
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(tmp_path / "mae"), "--max-steps", "1",
                 "--batch-size", "16", "--set", "data.num_workers=0", *tiny]) == 0
    papers = ["--set", f"augment.auto_augment={POLICY}", "--set", "augment.remode=pixel", "--set",
              "augment.mixup=0.8", "--set", "augment.cutmix=1.0", "--set", "data.num_workers=0",
              "--set", "train.checkpoint_every=2", "--set", "train.keep_last=3", "--set", "eval_every=100"]
    for name in ("straight", "cut"):
        assert main(["finetune", str(tmp_path / "mae"), "--data", "synthetic", "--out", str(tmp_path / name),
                     "--max-steps", "4", "--batch-size", "16", *papers]) == 0
    cut = Checkpoints(tmp_path / "cut")
    cut.weights_path(4).unlink()
    cut.state_path(4).unlink()
    assert main(["finetune", str(tmp_path / "mae"), "--data", "synthetic", "--out", str(tmp_path / "cut"),
                 "--max-steps", "4", "--batch-size", "16", *papers]) == 0
    straight = load_file(Checkpoints(tmp_path / "straight").weights_path(4))
    resumed = load_file(cut.weights_path(4))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
