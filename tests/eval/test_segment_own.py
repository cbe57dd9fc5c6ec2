"""Segmentation on one's own data: a VOC folder (palette masks, the 255 ring) met as a newcomer meets it.
Pretraining reads its train split only; ``segment`` sizes itself and says so, checks masks before training,
keeps its final checkpoint when the final evaluation fails, and stops an evaluation when asked; ``predict``
and ``evaluate`` use a trained run."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from mimkit.cli import main
from mimkit.data.segmentation import MaskCheck, SegSource, build_seg_source
from mimkit.errors import MimkitError
from mimkit.eval import segment as segment_module
from mimkit.eval.seg_metrics import predict_logits
from mimkit.eval.seg_sizing import SegDataFacts, label_hint, seg_size_hint, survey_seg_data
from mimkit.runs import saved_values
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.metrics_log import read_metrics
from tests.conftest import TINY_MAE_KWARGS

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (768 - 12)
TINY = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
QUICK = ["--max-steps", "2", "--batch-size", "4", "--set", "data.num_workers=0", "--set", "seg.channels=16",
         "--set", "seg.aux_channels=16"]


def write_voc(root: Path, train: int = 8, val: int = 6, size: int = 32) -> Path:
    """A Pascal VOC folder: RGB JPEGs, palette masks of labels 0-2 whose colours are not their values, a 255
    ring around each object, ImageSets lists."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        names = [f"{split}_{i}" for i in range(count)]
        for name in names:
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            labels = np.zeros((size, size), np.uint8)
            for k in (1, 2):
                top, left = rng.integers(1, size - 12, 2)
                image[top:top + 10, left:left + 10] = 110 * k
                labels[top - 1:top + 11, left - 1:left + 11] = 255
                labels[top:top + 10, left:left + 10] = k
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            mask = Image.fromarray(labels, "P")
            mask.putpalette(VOC_PALETTE)
            mask.save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("own") / "voc")


@pytest.fixture(scope="module")
def voc_mae(voc, tmp_path_factory):
    """A tiny MAE pretrained on the VOC folder (its train split) at its own 32 px."""
    run = tmp_path_factory.mktemp("own") / "mae"
    assert main(["pretrain", "mae", "--data", str(voc), "--out", str(run), "--max-steps", "1", "--batch-size",
                 "4", "--set", "data.img_size=32", "--set", "model.patch_size=8",
                 "--set", "data.num_workers=0", *TINY]) == 0
    return run


def test_pretraining_on_a_voc_folder_reads_its_train_images_only(voc, voc_mae, capsys):
    listed = (voc_mae / "files.txt").read_text().splitlines()[1:]
    assert len(listed) == 8 and all("\tJPEGImages/train_" in line for line in listed)
    facts = json.loads((voc_mae / "data.json").read_text())
    assert facts["train_images"] == 8 and facts["held_out_images"] == 6
    assert "masks not read" in facts["data"] and "train.txt" in facts["data"]


def test_summary_reports_classes_found_recipe_engine_and_a_size_hint(voc, mae_run, tmp_path, caplog):
    out = tmp_path / "seg"
    caplog.set_level("INFO", logger="mimkit")
    # mae_run was pretrained at 32 px; a crop of 64 makes the 32 px images "much smaller than the crop"
    assert main(["segment", str(mae_run), "--data", str(voc), "--out", str(out), *QUICK,
                 "--set", "seg.crop_size=64"]) == 0
    text = caplog.text
    assert "recipe    segment_small: 8 training images" in text
    assert "masks     14 checked" in text and "labels 0-2 found" in text
    assert "labels 0-2 found, but the data set has 21 classes: --set seg.num_classes=3?" in text
    assert "engine    cpu, 1 process, fp32" in text and "0 data workers" in text
    assert "crop 64 px (16x16 patches)" in text
    assert "--auto-size fits the run to them (--set seg.crop_size=32" in text
    assert "warmup 2 steps (!) more than a tenth of the run" in text  # segment_small's 1 epoch of 2 steps


def test_auto_size_fits_the_crop_to_the_images(voc, mae_run, tmp_path, caplog):
    out = tmp_path / "seg"
    caplog.set_level("INFO", logger="mimkit")
    assert main(["segment", str(mae_run), "--data", str(voc), "--out", str(out), *QUICK, "--auto-size",
                 "--set", "seg.crop_size=128", "--set", "seg.class_names=[bg,dark,light]",
                 "--set", "labels.seed=3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["crop_size"] == 32 and results["eval"]["mode"] == "whole"
    assert results["seed"] == 3  # the labels' seed, which picked the images (not train.seed, 0)
    assert [row["class"] for row in results["per_class"]] == ["bg", "dark", "light"]
    assert "auto-size seg.crop_size=32 seg.scale=[32, 32]" in caplog.text
    assert "train.batch_size=2" in caplog.text  # 8 images would give one step an epoch: the floor of 2
    assert saved_values(out)["seg"]["channels"] == 16  # a quarter of the 32-wide encoder, at least 16


def test_size_hint_values():
    facts = SegDataFacts(100, 10, 100, (96, 64), (0, 1, 2), 0.1)
    hint = seg_size_hint(facts, crop=512, patch_size=16, embed_dim=192, batch_size=16, train_images=100)
    assert hint == {"seg.crop_size": 64, "seg.scale": [96, 64], "seg.eval_mode": "whole",
                    "seg.eval_scale": [96, 64], "seg.channels": 48, "seg.aux_channels": 96,
                    "train.batch_size": 12}
    # images that fit the crop: only the heads and the batch of a small crop
    assert seg_size_hint(facts, crop=96, patch_size=16, embed_dim=192, batch_size=16, train_images=100) == {
        "seg.channels": 48, "seg.aux_channels": 96, "train.batch_size": 12}
    large = SegDataFacts(100, 10, 100, (400, 300), (0, 1), 0.1)
    assert seg_size_hint(large, crop=512, patch_size=16, embed_dim=768, batch_size=16,
                         train_images=100) is None
    assert label_hint(facts, 3) == "" and "seg.num_classes=3?" in label_hint(facts, 21)
    odd = SegDataFacts(100, 10, 100, (75, 50), (0, 1), 0.1)  # sides that are no multiple of the patch
    assert seg_size_hint(odd, crop=224, patch_size=16, embed_dim=192, batch_size=16,
                         train_images=100)["seg.crop_size"] == 48  # whole patches within the 50 px side


def test_the_mask_line_and_the_hints_at_their_edges():
    """The masks line: a run of labels as a range, others listed, none; all train masks or k of n. The size
    hint starts at images of exactly half the crop, the narrow heads at a crop of 256 px, never below 16
    channels, the batch never below 2 nor above the run's; the label hint once the largest label is below
    the last class."""
    assert SegDataFacts(10, 4, 10, (32, 32), (0, 1, 2), 1.5).describe_masks() == (
        "14 checked in 1.5 s (every val mask, all train): labels 0-2 found (255 ignored)")
    assert SegDataFacts(700, 4, 500, (32, 32), (0, 2, 5), 0.26).describe_masks() == (
        "504 checked in 0.3 s (every val mask, 500 of 700 train): labels 0, 2, 5 found (255 ignored)")
    assert "labels none found" in SegDataFacts(1, 1, 1, (8, 8), (), 0.0).describe_masks()
    assert "labels 1-3 found" in SegDataFacts(1, 1, 1, (8, 8), (1, 2, 3), 0.0).describe_masks()
    half = SegDataFacts(100, 10, 100, (64, 64), (0, 1), 0.1)
    assert seg_size_hint(half, 128, 16, 32, 16, 100) == {
        "seg.crop_size": 64, "seg.scale": [64, 64], "seg.eval_mode": "whole", "seg.eval_scale": [64, 64],
        "seg.channels": 16, "seg.aux_channels": 16, "train.batch_size": 12}
    assert seg_size_hint(half, 126, 16, 40, 16, 800) == {"seg.channels": 16, "seg.aux_channels": 20,
                                                         "train.batch_size": 16}
    large = SegDataFacts(100, 10, 100, (400, 300), (0, 1), 0.1)
    assert seg_size_hint(large, 256, 16, 768, 16, 8) == {"seg.channels": 192, "seg.aux_channels": 384,
                                                         "train.batch_size": 2}
    assert seg_size_hint(large, 257, 16, 768, 16, 8) is None
    tiny = SegDataFacts(100, 10, 100, (12, 10), (0, 1), 0.1)  # smaller than a patch: a crop of one patch
    assert seg_size_hint(tiny, 64, 16, 32, 16, 100)["seg.scale"] == [19, 16]
    facts = SegDataFacts(100, 10, 100, (32, 32), (0, 1, 2), 0.1)
    assert label_hint(facts, 3) == ""
    assert label_hint(facts, 4).startswith("labels 0-2 found, but the data set has 4 classes: "
                                           "--set seg.num_classes=3?")


class _Masks:
    """A source whose mask checks record what was asked: image i is (10 + i) x (20 + i) px, its mask holds
    label ``labels(i)``."""

    def __init__(self, n: int, labels):
        self.n, self.labels, self.checked = n, labels, []

    def __len__(self) -> int:
        return self.n

    def check_masks(self, indices, desc=""):
        self.checked += list(indices)
        return MaskCheck({self.labels(i) for i in indices}, [(10 + i, 20 + i) for i in indices])


def test_the_survey_checks_the_evaluated_val_masks_and_a_spread_of_train_masks():
    """Every val mask the run evaluates (the subset's), ``train_samples`` train masks first to last; the
    labels of both splits; the median image of the train sample, per side."""
    train, val = _Masks(20, lambda i: i % 3), _Masks(10, lambda i: 7)
    facts = survey_seg_data(train, Subset(val, [2, 3, 4]), train_samples=5)
    assert val.checked == [2, 3, 4] and train.checked == [0, 5, 10, 14, 19]
    assert (facts.train_images, facts.val_images, facts.train_checked) == (20, 3, 5)
    assert facts.labels == (0, 1, 2, 7) and facts.median == (20, 30) and 0 <= facts.seconds < 60


def test_the_size_hint_sizes_the_batch_to_the_images_trained_on():
    """At a label fraction the batch fits the images kept (40 of 100: 5 a step), not all of the split's."""
    facts = SegDataFacts(100, 10, 100, (32, 32), (0, 1), 0.1)
    assert seg_size_hint(facts, crop=64, patch_size=16, embed_dim=64, batch_size=16,
                         train_images=40)["train.batch_size"] == 5


def _voc_with(tmp_path: Path, voc: Path, name: str, change) -> Path:
    copy = tmp_path / "voc"
    for path in voc.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(voc)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    change(copy / "SegmentationClass" / f"{name}.png")
    return copy


@pytest.mark.parametrize("problem, message", [
    ("rgb", "val_7.png' is stored as RGB"),
    ("label", "val_7.png' holds label 7"),
    ("jpeg", "val_7.png' is a JPEG"),
])
def test_a_bad_val_mask_stops_segment_before_training(mae_run, tmp_path, capsys, problem, message):
    def change(path: Path) -> None:
        labels = np.asarray(Image.open(path))
        if problem == "rgb":
            Image.open(path).convert("RGB").save(path)
        elif problem == "label":
            Image.fromarray(np.where(labels == 1, 7, labels).astype(np.uint8)).save(path)
        else:
            Image.fromarray(labels).save(path, format="JPEG")  # a JPEG under a .png name

    # 20 val pairs: a source decodes 16 spread-out pairs when it is made, and val_7 is not among them, so
    # only the start-up check of every val mask finds it
    data = write_voc(tmp_path / "voc", val=20)
    change(data / "SegmentationClass" / "val_7.png")
    out = tmp_path / "seg"
    assert main(["segment", str(mae_run), "--data", str(data), "--out", str(out), *QUICK,
                 "--set", "seg.num_classes=3"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert Checkpoints(out).latest() is None and not (out / "metrics.jsonl").exists()


class _Built(Exception):
    """Stops a run where a test has seen what it asks about."""


def test_the_seed_decides_the_heads_initialisation_whatever_ran_before(voc, mae_run, tmp_path, monkeypatch):
    """The heads are drawn from ``train.seed`` (the same on every rank, and in a resumed process), not from
    whatever state the RNG was left in: one seed after different draws builds the same heads."""
    draws = []

    def built(config, encoder):
        draws.append(torch.rand(3))
        raise _Built

    monkeypatch.setattr(segment_module, "build_segmenter", built)
    for seed, noise in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(noise)
        with pytest.raises(_Built):
            main(["segment", str(mae_run), "--data", str(voc), "--out", str(tmp_path / f"{seed}_{noise}"),
                  *QUICK, "--set", "seg.num_classes=3", "--set", f"train.seed={seed}"])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_the_labels_seed_picks_the_images_and_the_eval_scales_reach_the_evaluation(voc, mae_run, tmp_path,
                                                                                   monkeypatch):
    """At a label fraction, ``labels.seed`` picks which training images the run trains on; the evaluation
    during training uses the run's multi-scale setting."""
    trained, asked = [], []
    real_views = segment_module.SeededViews

    def views(train_set, view):
        trained.append(list(train_set.indices))
        return real_views(train_set, view)

    def evaluated(*args, scales: list[float]):
        asked.append(scales)
        raise _Built

    monkeypatch.setattr(segment_module, "SeededViews", views)
    monkeypatch.setattr(segment_module, "evaluate_segmentation", evaluated)
    for seed in (0, 1):
        with pytest.raises(_Built):
            main(["segment", str(mae_run), "--data", str(voc), "--out", str(tmp_path / str(seed)), *QUICK,
                  "--set", "seg.num_classes=3", "--set", "labels.fraction=0.5", "--set",
                  f"labels.seed={seed}", "--set", "seg.eval_scales=[0.5,1.0]"])
    assert len(trained[0]) == len(trained[1]) and trained[0] != trained[1]
    assert asked == [[0.5, 1.0]] * 2


def test_masks_are_checked_without_decoding_images(voc):
    source = build_seg_source(str(voc), "val", num_classes=3)
    assert source.check_masks(range(len(source))).labels == {0, 1, 2}
    assert source.image_size(0) == (32, 32)


def test_empty_split_names_its_list(voc, tmp_path):
    data = _voc_with(tmp_path, voc, "val_0", lambda path: None)
    (data / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(MimkitError, match="val.txt' is empty"):
        build_seg_source(str(data), "val", num_classes=3)


def test_final_checkpoint_is_kept_when_the_final_evaluation_fails(voc, mae_run, tmp_path, monkeypatch,
                                                                  capsys):
    def broken(*args, **kwargs):
        raise MimkitError("the evaluation broke")

    monkeypatch.setattr(segment_module, "evaluate_segmentation", broken)
    out = tmp_path / "seg"
    assert main(["segment", str(mae_run), "--data", str(voc), "--out", str(out), *QUICK]) == 2
    assert "the evaluation broke" in capsys.readouterr().err
    assert Checkpoints(out).latest() == 2


def test_a_stop_request_ends_an_evaluation_at_once(voc, mae_run, tmp_path, monkeypatch):
    scored = []

    def slow_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the request arrives while the evaluation runs
        for batch in range(1000):
            scored.append(batch)
            torch.ones(200, 200) @ torch.ones(200, 200)  # python between ops: where signals are handled
        raise AssertionError("the evaluation was not stopped")

    monkeypatch.setattr(segment_module, "evaluate_segmentation", slow_evaluation)
    out = tmp_path / "seg"
    assert main(["segment", str(mae_run), "--data", str(voc), "--out", str(out), *QUICK,
                 "--set", "eval_every=1"]) == 130
    assert len(scored) < 5 and Checkpoints(out).latest() == 1  # stopped in the first step's evaluation
    assert not any("val_mIoU" in record for record in read_metrics(out))


def test_multi_scale_logits_average_each_scale_resized_back():
    torch.manual_seed(0)

    def model(x):  # not scale-equivariant: depends on the absolute pixel position
        rows = torch.arange(x.shape[2], dtype=torch.float32)[:, None].expand(x.shape[2], x.shape[3])
        return torch.stack([x[:, 0] * rows, x[:, 0] - rows], 1)

    images = torch.rand(2, 3, 8, 8)
    plain = predict_logits(model, images, 8)
    assert torch.equal(predict_logits(model, images, 8, scales=(1.0,)), plain)
    resize = torch.nn.functional.interpolate
    half = resize(images, size=(4, 4), mode="bilinear", align_corners=False)
    # whole-image mode: the scaled image to the crop, its logits back to the scaled size, then to the image's
    half_logits = resize(resize(model(resize(half, size=(8, 8), mode="bilinear", align_corners=False)),
                                size=(4, 4), mode="bilinear", align_corners=False),
                         size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict_logits(model, images, 8, scales=(1.0, 0.5)), (plain + half_logits) / 2)
    assert not torch.allclose(half_logits, plain)  # the two scales differ: the average is not either one


@pytest.mark.slow
def test_predict_and_evaluate_on_a_trained_run(voc, mae_run, tmp_path, capsys):
    run = tmp_path / "seg"
    assert main(["segment", str(mae_run), "--data", str(voc), "--out", str(run), *QUICK,
                 "--set", "seg.num_classes=3"]) == 0
    trained = json.loads((run / "results.json").read_text())
    assert (run / "confusion.png").is_file()
    matrix = json.loads((run / "confusion.json").read_text())["rows_truth_columns_prediction"]
    labelled = sum(int((np.asarray(Image.open(path)) != 255).sum())
                   for path in (voc / "SegmentationClass").glob("val_*.png"))
    assert sum(map(sum, matrix)) == labelled  # every labelled val pixel, the ring left out

    evaluation = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(evaluation)]) == 0
    scored = json.loads((evaluation / "results.json").read_text())
    assert scored["mIoU"] == pytest.approx(trained["mIoU"]) and scored["images"] == 6
    assert main(["evaluate", str(run), "--out", str(evaluation)]) == 0  # its own folder: written again
    assert main(["evaluate", str(run), "--out", str(run)]) == 2  # a run's folder: refused
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval-ms"), "--tta", "ms"]) == 0

    images = tmp_path / "images"
    for name, size in (("s1/x.jpg", 32), ("s2/x.jpg", 40), ("x.jpg", 32), ("x.png", 24)):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(images / name)
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", str(run), "--images", str(images), "--out", str(out), "--tta", "flip"]) == 0
    assert "x.jpg -> x_jpg.png" in capsys.readouterr().out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if "_overlay" not in p.name)
    assert written == ["s1/x.png", "s2/x.png", "x_jpg.png", "x_png.png"]
    label_map = Image.open(out / "x_png.png")
    assert label_map.mode == "P" and label_map.size == (24, 24)
    assert label_map.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC's colours for 0, 1, 2
    assert main(["predict", str(run), "--images", str(images), "--out", str(out)]) == 0  # its own folder

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ok0.png").write_bytes(b"mine")
    assert main(["predict", str(run), "--images", str(images), "--out", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err and (foreign / "ok0.png").read_bytes() == b"mine"
    assert main(["predict", str(run), "--images", str(voc), "--out", str(tmp_path / "whole")]) == 0
    assert len(list((tmp_path / "whole" / "JPEGImages").glob("*_overlay.png"))) == 14  # both splits, no masks
    assert main(["predict", str(run), "--images", str(images), "--out", str(images / "x.jpg")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_segsource_refuses_a_jpeg_mask_by_content(tmp_path):
    image, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask, format="JPEG")
    with pytest.raises(MimkitError, match="is a JPEG"):
        SegSource("x", [image], [mask], ["a", "b"], reduce_zero_label=False)


@pytest.mark.parametrize("method, lr, decay, drop_path, rel_pos_bias", [
    ("mae", 1e-4, 0.65, 0.1, True), ("beit", 7e-4, 0.65, 0.1, False), ("beitv2", 5e-5, 0.75, 0.15, False)])
def test_ade20k_recipe_takes_each_methods_released_values(tmp_path, method, lr, decay, drop_path,
                                                          rel_pos_bias):
    from mimkit.cli import build_parser, segment_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"method: {method}\n")
    args = build_parser().parse_args(["segment", str(run), "--data", str(tmp_path),
                                      "--out", str(tmp_path / "o"), "--config", "segment_ade20k"])
    config, _ = segment_config(args)
    assert config.optim.base_lr * 16 / 256 == pytest.approx(lr)  # the released configs' lr at batch 16
    assert (config.optim.layer_decay, config.seg.drop_path, config.seg.rel_pos_bias) == (decay, drop_path,
                                                                                         rel_pos_bias)


@pytest.mark.slow
def test_a_run_stopped_during_an_evaluation_resumes_exactly(voc, mae_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    args = ["--data", str(voc), *QUICK, "--max-steps", "4", "--set", "eval_every=2",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_last=3", "--set", "seg.num_classes=3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["segment", str(mae_run), "--out", str(straight), *args]) == 0
    real = segment_module.evaluate_segmentation

    def stopped(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(segment_module, "evaluate_segmentation", stopped)
    assert main(["segment", str(mae_run), "--out", str(cut), *args]) == 130
    assert Checkpoints(cut).latest() == 2
    monkeypatch.setattr(segment_module, "evaluate_segmentation", real)
    assert main(["segment", str(mae_run), "--out", str(cut), *args]) == 0
    a, b = (load_file(str(Checkpoints(run).weights_path(4))) for run in (straight, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_segmentation_images_are_decoded_as_pretraining_decodes_them(tmp_path):
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :4] = 200  # a bright left band: after a 90-degree turn it is the top or bottom band
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    Image.fromarray(stored).save(root / "images" / "a.jpg", exif=exif, quality=100)
    Image.fromarray(np.zeros((12, 8), np.uint8)).save(root / "masks" / "a.png")  # drawn on the turned image
    source = build_seg_source(str(root), "train", num_classes=2)
    image, mask = source[0]
    assert tuple(image.shape[1:]) == tuple(mask.shape) == (12, 8)
    assert image[:, :4].float().mean() > 150 and image[:, -4:].float().mean() < 50  # turned as displayed
    assert source.check_masks([0]).labels == {0}  # the start-up check reads the turned size
    with pytest.raises(MimkitError, match="a.jpg.*above data.max_image_pixels"):  # 96 pixels, refused
        build_seg_source(str(root), "train", num_classes=2, max_image_pixels=50)
