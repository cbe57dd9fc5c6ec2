"""``mimkit segment``, ``predict`` and ``visualize`` on a tiny MAE run and tiny generated data sets in the
ADE20K, Pascal VOC and images + masks layouts: training, scores, exact resume, and each bad input."""

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import mimkit.eval.predict as predict
import mimkit.eval.seg_evaluate as seg_evaluate
import mimkit.eval.segment as segment
from mimkit.cli import main
from mimkit.config import DataConfig, from_dict, read_yaml
from mimkit.data.seg_transforms import PhotometricDistortion
from mimkit.data.segmentation import PROBE_SAMPLES, build_seg_source, spread
from mimkit.errors import MimkitError
from mimkit.eval.config import SegmentConfig
from mimkit.eval.segment import load_segmentation_run, optimizer_groups, segmentation_loss
from mimkit.models.segmentation import Segmenter, segmentation_encoder
from mimkit.models.vit import build_vit
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.metrics_log import read_metrics
from mimkit.train.schedule import poly_schedule
from tests.conftest import torchrun, voc_palette

TINY_MAE = [arg for kv in ("depth=2", "embed_dim=32", "num_heads=2", "decoder_depth=1",
                           "decoder_embed_dim=32", "decoder_num_heads=2")
            for arg in ("--set", f"model.kwargs.{kv}")] + ["--set", "data.num_workers=0"]
# the fmnist recipe, at the tiny MAE's 32 px, 4 images a step, the 6 validation images in one batch
QUICK = ["--config", "segment_fmnist", "--max-steps", "2", "--batch-size", "4", "--set", "seg.crop_size=32",
         "--set", "seg.scale=[32,32]", "--set", "data.num_workers=0", "--set", "eval_batch_size=8",
         "--set", "seg.channels=16", "--set", "seg.aux_channels=16"]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("seg") / "mae"
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(run), "--max-steps", "1",
                 "--batch-size", "32", *TINY_MAE]) == 0
    return run


def scene(seed: int, size: int = 32, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A grey image of bright rectangles on black, and its labels (class k where shade k)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint8)
    for k in range(1, classes):
        top, left = rng.integers(0, size - 10, 2)
        labels[top:top + 10, left:left + 10] = k
    return (labels * (250 // (classes - 1))).astype(np.uint8), labels


def write_layout(root: Path, layout: str, train: int = 8, val: int = 6) -> Path:
    """A tiny data set: ``ade`` (labels stored from 1), ``voc`` (palette PNGs, lists) or ``generic``."""
    for split, count, offset in (("train", train, 0), ("val", val, 100)):
        for i in range(count):
            image, labels = scene(offset + i)
            if layout == "ade":
                sub = {"train": "training", "val": "validation"}[split]
                paths = root / "images" / sub / f"{i}.jpg", root / "annotations" / sub / f"{i}.png"
                labels = labels + 1
            elif layout == "voc":
                stem = f"{split}{i}"
                paths = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
            else:
                paths = root / "images" / split / f"{i}.png", root / "masks" / split / f"{i}.png"
            masks = Image.fromarray(labels)
            if layout == "voc":  # Pascal VOC's own: palette PNGs whose indices are the labels, 255 borders
                labels[labels != np.roll(labels, 1, axis=1)] = 255
                masks = Image.fromarray(labels)
                masks.putpalette(voc_palette())  # an L image with a palette becomes a P one
            for path, picture in zip(paths, (Image.fromarray(image), masks), strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path)
        if layout == "voc":
            lists = root / "ImageSets" / "Segmentation"
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"{split}.txt").write_text("".join(f"{split}{i}\n" for i in range(count)))
    (root / "classes.txt").write_text("background\nsquare\nblock\n")
    return root


class FixedLogits(nn.Module):
    """A stand-in segmenter whose heads give fixed logits."""

    def __init__(self, *logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward_logits(self, images):
        return list(self.logits)


def test_segmentation_loss_leaves_ignored_pixels_out():
    """Cross-entropy over the three labelled pixels of a 2x2 mask (one is 255): the ignored pixel's logits,
    however wrong, change nothing; the auxiliary head's loss is added at its weight."""
    masks = torch.tensor([[[0, 255], [1, 1]]])
    log3 = math.log(3)
    # pixel (0, 0) truth 0: p = 3/4; (1, 0) truth 1: p = 1/2; (1, 1) truth 1: p = 3/4; (0, 1) ignored
    decode = torch.tensor([[[log3, -50.0], [0.0, 0.0]], [[0.0, 50.0], [0.0, log3]]])[None]
    aux = torch.zeros(1, 2, 2, 2)  # p = 1/2 everywhere
    images = torch.zeros(1, 3, 2, 2)
    loss, metrics = segmentation_loss(FixedLogits(decode, aux), images, masks, aux_weight=0.4)
    expected_decode = (2 * math.log(4 / 3) + math.log(2)) / 3
    assert metrics["decode_loss"].item() == pytest.approx(expected_decode)
    assert metrics["aux_loss"].item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(expected_decode + 0.4 * math.log(2))
    # the heads' logits at a coarser size are upsampled to the mask's first: a 1x1 map covers every pixel
    coarse, _ = segmentation_loss(FixedLogits(torch.tensor([0.0, log3])[None, :, None, None]), images, masks,
                                  aux_weight=0.4)
    assert coarse.item() == pytest.approx((math.log(4) + 2 * math.log(4 / 3)) / 3)


def test_segmentation_loss_upsamples_coarse_logits_bilinearly():
    """Logits 1x2 for a 1x4 mask (all class 1): bilinear upsampling (pixel centres, align_corners=False) gives
    class 1 the logits v0, 3/4 v0 + 1/4 v1, 1/4 v0 + 3/4 v1, v1 (class 0 stays 0)."""
    v0, v1 = -1.0, 3.0
    logits = torch.tensor([[0.0, 0.0], [v0, v1]])[None, :, None, :]  # [1, 2 classes, 1, 2]
    masks = torch.ones(1, 1, 4, dtype=torch.long)
    loss, _ = segmentation_loss(FixedLogits(logits), torch.zeros(1, 3, 1, 4), masks, aux_weight=0.4)
    upsampled = [v0, 0.75 * v0 + 0.25 * v1, 0.25 * v0 + 0.75 * v1, v1]
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-v)) for v in upsampled) / 4)


def test_poly_schedule_warms_up_then_decays_linearly():
    values = poly_schedule(1.0, 0.0, 6, warmup_steps=2)
    assert values == pytest.approx([0.0, 0.5, 1.0, 2 / 3, 1 / 3, 0.0])
    assert poly_schedule(1.0, 0.0, 3, power=2.0) == pytest.approx([1.0, 0.25, 0.0])


def test_layer_decay_covers_the_encoder_blocks_and_leaves_the_heads_at_scale_1():
    encoder = build_vit(dict(embed_dim=32, depth=3, num_heads=2), img_size=16, patch_size=4, in_chans=1)
    model = Segmenter(segmentation_encoder(encoder, 16), 3)
    scale = {name: g["lr_scale"] for g in optimizer_groups(model, 0.05, 0.5) for name in g["names"]}
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.5 ** 4
    assert [scale[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [0.5 ** 3, 0.5 ** 2, 0.5]
    # the pyramid pooling's own "blocks" are head parameters, not transformer blocks
    heads = [n for n in scale if not n.startswith(("blocks.", "pos_embed", "cls_token", "patch_embed"))]
    assert "1.psp_modules.blocks.0.conv.convolution.weight" in heads and all(scale[n] == 1.0 for n in heads)
    assert len(scale) == sum(1 for p in model.parameters() if p.requires_grad)
    # weight decay on the matrices of the encoder and of the heads; none on biases, norms and embeddings
    groups = optimizer_groups(model, 0.05, 0.5)
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    ndim = {name: p.ndim for g in groups for name, p in zip(g["names"], g["params"], strict=True)}
    assert decay["blocks.0.attn.qkv.weight"] == 0.05
    assert decay["pos_embed"] == decay["blocks.0.norm1.weight"] == decay["blocks.0.attn.qkv.bias"] == 0.0
    assert [decay[n] for n in heads if ndim[n] > 1] == [0.05] * sum(ndim[n] > 1 for n in heads) != []
    assert {decay[n] for n in heads if ndim[n] == 1} == {0.0}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ade", "voc", "generic"])
def test_segment_cli_in_each_layout(mae_run, tmp_path, capsys, layout):
    data = write_layout(tmp_path / layout, layout)
    out = tmp_path / "seg"
    assert main(["segment", str(mae_run), "--data", str(data), "--out", str(out), *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["train_images"] == 8 and results["val_images"] == 6
    assert all(0 <= results[k] <= 100 for k in ("aAcc", "mIoU", "mAcc"))
    assert [row["class"] for row in results["per_class"]] == ["background", "square", "block"]
    assert Checkpoints(out).best()["metric"] == "val_mIoU"
    assert any("val_mIoU" in r for r in read_metrics(out)) and any("aux_loss" in r for r in read_metrics(out))
    assert "mIoU" in capsys.readouterr().out
    model, config = load_segmentation_run(out)
    assert config.seg.num_classes == 3 and config.data.channels == 3  # the synthetic MAE reads RGB
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_a_random_encoder_is_drawn_from_the_runs_seed(mae_run, tmp_path, monkeypatch):
    """``--init random``: the encoder's initialization follows ``train.seed`` like the rest of the run (the
    command stops at the encoder: only what it asks for is read)."""
    asked = []

    def record(path, init="pretrained", seed=0):
        asked.append((init, seed))
        raise MimkitError("stop here")

    monkeypatch.setattr(segment, "load_encoder", record)
    data = write_layout(tmp_path / "generic", "generic")
    for seed in (0, 7):
        assert main(["segment", str(mae_run), "--data", str(data), "--out", str(tmp_path / f"s{seed}"),
                     "--init", "random", "--set", f"train.seed={seed}", *QUICK]) != 0
    assert asked == [("random", 0), ("random", 7)]


@pytest.mark.slow
def test_linear_random_frozen_predict_and_visualize(mae_run, tmp_path):
    data = write_layout(tmp_path / "generic", "generic")
    out = tmp_path / "lin"
    assert main(["segment", str(mae_run), "--data", str(data), "--out", str(out), "--head", "linear",
                 "--init", "random", "--set", "seg.freeze_encoder=true", "--label-fraction", "0.5",
                 *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["head"] == "linear" and results["init"] == "random" and results["frozen_encoder"]
    assert results["train_images"] == 4

    images = tmp_path / "new"
    images.mkdir()
    for i in range(3):
        Image.fromarray(scene(200 + i, size=40)[0]).save(images / f"x{i}.png")  # another size than trained
    assert main(["predict", str(out), "--images", str(images), "--out", str(tmp_path / "pred")]) == 0
    label_map = Image.open(tmp_path / "pred" / "x0.png")
    assert label_map.mode == "P" and label_map.size == (40, 40) and np.asarray(label_map).max() < 3
    assert (tmp_path / "pred" / "x2_overlay.png").is_file()

    assert main(["export", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2  # a ViT: not a Beit
    picture = tmp_path / "seg.png"
    assert main(["visualize", str(out), "--out", str(picture), "--n", "2"]) == 0
    assert Image.open(picture).size[0] > 3 * 32


@pytest.mark.slow
def test_segment_resumes_bit_identically(mae_run, tmp_path, capsys):
    data = write_layout(tmp_path / "generic", "generic")
    args = ["--data", str(data), *QUICK, "--max-steps", "4", "--set", "train.checkpoint_every=2",
            "--set", "train.keep_last=3", "--set", "eval_every=4"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["segment", str(mae_run), "--out", str(straight), *args]) == 0
    shutil.copytree(straight, cut)
    checkpoints = Checkpoints(cut)
    for path in (checkpoints.weights_path(4), checkpoints.state_path(4), cut / "results.json"):
        path.unlink()
    capsys.readouterr()
    assert main(["segment", str(mae_run), "--out", str(cut), *args]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    a, b = (torch.load(Checkpoints(run).state_path(4), weights_only=True) for run in (straight, cut))
    assert a["step"] == b["step"] == 4
    wa, wb = (load_file(str(Checkpoints(run).weights_path(4))) for run in (straight, cut))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (straight, cut))
    assert ra["mIoU"] == rb["mIoU"] and ra["per_class"] == rb["per_class"]


@pytest.mark.slow
def test_predict_on_a_finetuned_classifier_writes_top5(mae_run, tmp_path):
    ft = tmp_path / "ft"
    assert main(["finetune", str(mae_run), "--data", "synthetic", "--out", str(ft), "--max-steps", "1",
                 "--batch-size", "32", "--set", "data.num_workers=0", "--set", "eval_batch_size=256"]) == 0
    images = tmp_path / "new"
    images.mkdir()
    for i in range(2):
        Image.fromarray(scene(i)[0]).save(images / f"x{i}.png")
    assert main(["predict", str(ft), "--images", str(images), "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.reader((tmp_path / "pred" / "predictions.csv").open()))
    assert rows[0][:3] == ["file", "class_1", "prob_1"] and len(rows) == 3 and len(rows[1]) == 11
    probs = [float(p) for p in rows[1][2::2]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001


def _bad_generic(root: Path, problem: str) -> Path:
    write_layout(root, "generic", train=2, val=1)
    train_mask = root / "masks" / "train" / "0.png"
    if problem == "size":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(train_mask)
    elif problem == "label":
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(train_mask)
    elif problem == "no mask":
        train_mask.unlink()
    elif problem == "empty":
        shutil.rmtree(root / "images" / "val")
        shutil.rmtree(root / "masks" / "val")
        (root / "images" / "val").mkdir()
        (root / "masks" / "val").mkdir()
    return root


@pytest.mark.parametrize("problem, args, message", [
    ("size", [], "must have its image's size"),
    ("label", [], "holds label 7"),
    ("no mask", [], "0.png"),
    ("empty", [], "val"),
    (None, ["--set", "seg.head=fcn"], "seg.head"),
    (None, ["--set", "seg.eval_mode=tiles"], "seg.eval_mode"),
    (None, ["--label-fraction", "1.5"], "label fraction"),
    (None, ["--set", "seg.blocks=[0,1]"], "4 blocks"),
])
def test_bad_input_is_one_line_error(mae_run, tmp_path, capsys, problem, args, message):
    data = _bad_generic(tmp_path / "data", problem) if problem else write_layout(tmp_path / "data", "generic")
    out = tmp_path / "bad"
    assert main(["segment", str(mae_run), "--data", str(data), "--out", str(out), *QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_predict_and_visualize_refuse_what_they_cannot_use(mae_run, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(scene(0)[0]).save(images / "a.png")
    assert main(["predict", str(mae_run), "--images", str(images), "--out", str(tmp_path / "p")]) == 2
    assert "pretraining run" in capsys.readouterr().err
    missing = tmp_path / "nothing"
    assert main(["predict", str(missing), "--images", str(images), "--out", str(tmp_path / "p")]) == 2
    assert "not a mimkit run" in capsys.readouterr().err
    assert read_yaml(mae_run / "config.yaml")["method"] == "mae"


@pytest.mark.slow
def test_beit_segmentation_run_exports_to_transformers(tmp_path):
    from timm.models.beit import Beit
    from transformers import BeitForSemanticSegmentation

    torch.manual_seed(0)
    beit = Beit(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=32, depth=6, num_heads=2,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token")
    torch.save(beit.state_dict(), tmp_path / "beit.pth")
    run, out = tmp_path / "beit", tmp_path / "seg"
    assert main(["import", str(tmp_path / "beit.pth"), "--format", "timm", "--out", str(run),
                 "--set", "model.kwargs.num_heads=2", "--set", "data.source=synthetic:64"]) == 0
    data = write_layout(tmp_path / "generic", "generic")
    assert main(["segment", str(run), "--data", str(data), "--out", str(out), *QUICK,
                 "--set", "seg.blocks=[0,1,2,4]", "--set", "seg.channels=null"]) == 0
    assert main(["export", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf, info = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model, _ = load_segmentation_run(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf.eval()(pixel_values=x).logits
        torch.testing.assert_close(model.forward_logits(x)[0], theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_score_the_validation_set_as_one(mae_run, tmp_path):
    """Under torchrun each process scores its share of the images and the matrices are summed: the scores
    of a finished run, taken again by 2 gloo processes, are those one process took."""
    data = write_layout(tmp_path / "generic", "generic", val=5)
    args = ["segment", str(mae_run), "--data", str(data), *QUICK]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    shutil.copytree(one, two)
    (two / "results.json").unlink()
    torchrun(*args, "--force-config", "--out", str(two))
    a, b = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert b["val_images"] == 5 and a["per_class"] == b["per_class"]
    assert a["mIoU"] == pytest.approx(b["mIoU"]) and a["aAcc"] == pytest.approx(b["aAcc"])


class ShadeSegmenter(nn.Module):
    """A stand-in segmenter of `scene` images: class k where the shade is nearest shade k (k x 125), under
    a normalization by mean 0.5 and std 0.5. Records the size of each input it is given."""

    def __init__(self):
        super().__init__()
        self.centers = ((torch.arange(3) * 125 / 255 - 0.5) / 0.5).view(1, 3, 1, 1)
        self.inputs = []

    def forward(self, images):
        self.inputs.append(tuple(images.shape))
        return -(images[:, :1] - self.centers).abs()


CLASSES = ["background", "square", "block"]


def resolved_seg_config(data: Path, **seg) -> SegmentConfig:
    """The configuration a segmentation run of `ShadeSegmenter` on ``data`` would have saved."""
    return from_dict(SegmentConfig, {"data": {"source": str(data), "channels": 3, "mean": [0.5] * 3,
                                              "std": [0.5] * 3, "num_workers": 0},
                                     "seg": {"num_classes": 3, "classes": CLASSES, "crop_size": 32, **seg}})


def spy_scoring(monkeypatch, module) -> list:
    """Record the arguments of each ``evaluate_segmentation`` call of ``module`` (and the sizes of the images
    its loader gives), then score as it would."""
    calls, real = [], module.evaluate_segmentation

    def spy(model, loader, device, num_classes, crop, mode="whole", stride=None, flip=False, classes=None,
            desc="eval", scales=()):
        calls.append({"images": len(loader.dataset), "batch": loader.batch_size, "num_classes": num_classes,
                      "crop": crop, "mode": mode, "stride": stride, "flip": flip, "classes": classes,
                      "scales": list(scales),
                      "sizes": {tuple(batch["image"].shape[-2:]) for batch in loader}})
        return real(model, loader, device, num_classes, crop, mode, stride, flip, classes, desc, scales)

    monkeypatch.setattr(module, "evaluate_segmentation", spy)
    return calls


@pytest.mark.parametrize("split, other, tta, batch, images, flip, scales", [
    ("val", False, None, None, 3, True, [1.0, 0.5]),  # as the run evaluates (flipped), one image at a time
    ("train", True, "flip", 2, 2, True, []),
    ("val", True, "ms", 2, 5, True, [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]),  # BEiT's multi-scale test, flipped
])
def test_evaluate_scores_a_split_of_the_runs_data_or_another_folder(tmp_path, monkeypatch, split, other, tta,
                                                                    batch, images, flip, scales):
    """``mimkit evaluate RUN``: the split asked for, of the run's data or another folder's, scored with the
    run's evaluation settings (or a test-time augmentation's), written to ``out``; a run of a grey encoder
    reads colour images grey."""
    data = write_layout(tmp_path / "scenes", "generic", train=4, val=3)
    config = resolved_seg_config(data, eval_mode="slide", eval_stride=16, eval_scales=[1.0, 0.5],
                                 eval_scale=[64, 64], eval_flip=True)
    config.data.channels, config.data.mean, config.data.std = 1, [0.5], [0.5]
    model = ShadeSegmenter()
    monkeypatch.setattr(seg_evaluate, "load_segmentation_run", lambda run: (model, config))
    calls = spy_scoring(monkeypatch, seg_evaluate)
    elsewhere = None
    if other:
        elsewhere = str(write_layout(tmp_path / "other", "generic", train=2, val=5))
        for path in (tmp_path / "other" / "images").rglob("*.png"):
            Image.open(path).convert("RGB").save(path)
    out = tmp_path / "out"
    sizes = {} if batch is None else {"batch_size": batch}
    results = seg_evaluate.evaluate_run("runs/seg", out, split, elsewhere, tta, **sizes)
    assert calls == [{"images": images, "batch": batch or 1, "num_classes": 3, "crop": 32, "mode": "slide",
                      "stride": 16, "flip": flip, "classes": CLASSES, "scales": scales,
                      "sizes": {(64, 64)}}]  # the 32-px images fitted to the run's eval_scale
    assert {size[1] for size in model.inputs} == {1}
    assert (results["run"], results["data"], results["split"], results["images"]) == (
        "runs/seg", elsewhere or str(data), split, images)
    assert results["eval"] == {"mode": "slide", "stride": 16, "flip": flip, "scales": scales}
    assert max(size[-1] for size in model.inputs) == 32  # 64-px images (eval_scale) in 32-px windows
    assert results["aAcc"] > 95 and [row["class"] for row in results["per_class"]] == CLASSES
    assert json.loads((out / "results.json").read_text()) == results and (out / "confusion.json").is_file()
    assert 0 <= results["wall_s"] < 600


def test_evaluate_refuses_a_bad_tta_mask_or_folder_and_another_kind(tmp_path, monkeypatch,
                                                                                  mae_run):
    """Every mask is checked before the first image is scored: also one the source's few samples miss."""
    data = write_layout(tmp_path / "scenes", "generic", train=2, val=PROBE_SAMPLES + 2)
    unsampled = min(set(range(PROBE_SAMPLES + 2)) - set(spread(PROBE_SAMPLES + 2, PROBE_SAMPLES)))
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(build_seg_source(str(data), "val").masks[unsampled])
    monkeypatch.setattr(seg_evaluate, "load_segmentation_run",
                        lambda run: (ShadeSegmenter(), resolved_seg_config(data)))
    calls = spy_scoring(monkeypatch, seg_evaluate)
    with pytest.raises(MimkitError, match="--tta 'big' is not one of flip, ms"):
        seg_evaluate.evaluate_run("runs/seg", tmp_path / "out", tta="big")
    with pytest.raises(MimkitError, match="holds label 7"):
        seg_evaluate.evaluate_run("runs/seg", tmp_path / "out")
    assert calls == []
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(MimkitError, match="did not write"):
        seg_evaluate.evaluate_run("runs/seg", used, split="train")
    with pytest.raises(MimkitError, match="is a pretraining run, not a segmentation run"):
        load_segmentation_run(mae_run)
    limited = resolved_seg_config(write_layout(tmp_path / "limited", "generic", train=2, val=2))
    limited.data.max_image_pixels = 1000  # the run's limit: its 32 x 32 images are 1024 pixels
    monkeypatch.setattr(seg_evaluate, "load_segmentation_run", lambda run: (ShadeSegmenter(), limited))
    with pytest.raises(MimkitError, match="above data.max_image_pixels=1000"):
        seg_evaluate.evaluate_run("runs/seg", tmp_path / "out-limited")


def test_visualize_shows_seeded_validation_images_with_their_masks_and_predictions(tmp_path, monkeypatch):
    """``mimkit visualize SEGRUN``: ``n`` validation images picked by the seed, each beside its mask and the
    run's prediction at the mask's size, inferred as the run evaluates."""
    data = write_layout(tmp_path / "scenes", "generic", train=2, val=6)
    truths = [np.asarray(Image.open(data / "masks" / "val" / f"{i}.png")) for i in range(6)]
    model = ShadeSegmenter()
    monkeypatch.setattr(segment, "load_segmenter", lambda config, run_dir: model)
    shown = []
    monkeypatch.setattr(segment, "segmentation_figure", lambda rows, classes: shown.append((rows, classes)))
    monkeypatch.setattr(segment, "save_picture", lambda figure, out: out)
    real, asked = segment.predict_logits, []

    def spy(model, images, crop, mode, stride, flip, scales):
        asked.append((images.shape[-1], crop, mode, stride, flip, tuple(scales)))
        return real(model, images, crop, mode, stride, flip, scales)

    monkeypatch.setattr(segment, "predict_logits", spy)
    config = resolved_seg_config(data, eval_scale=[64, 64], eval_flip=True, eval_mode="slide", eval_stride=16,
                                 eval_scales=[1.0, 0.5])

    def picked(seed: int) -> list[int]:
        shown.clear()
        assert segment.visualize_segmentation(config, tmp_path, tmp_path / "seg.png", 2, seed) == [
            tmp_path / "seg.png"]
        (rows, classes), = shown
        assert classes == CLASSES and len(rows) == 2
        found = []
        for image, truth, prediction in rows:
            assert image.shape == (3, 32, 32) and prediction.shape == truth.shape == (32, 32)
            assert (prediction == truth).float().mean() > 0.95
            found.append(next(i for i, t in enumerate(truths) if np.array_equal(t, truth.numpy())))
        return found

    first = picked(0)
    assert picked(0) == first and len(set(first)) == 2
    assert any(picked(seed) != first for seed in (1, 2, 3))
    assert set(asked) == {(64, 32, "slide", 16, True, (1.0, 0.5))}  # the 64-px view (eval_scale), as run
    assert {size[-1] for size in model.inputs} == {32}  # in 32-px windows


def quick_segment_config(encoder: Path, data: Path, **values) -> SegmentConfig:
    """A segmentation run of 2 steps of 4 images at 32 px with narrow heads, as QUICK makes from the CLI."""
    return from_dict(SegmentConfig, {"encoder": str(encoder), "data": {"source": str(data), "num_workers": 0},
                                     "train": {"batch_size": 4, "max_steps": 2}, "eval_batch_size": 8,
                                     "seg": {"crop_size": 32, "channels": 16, "aux_channels": 16}, **values})


def test_a_finished_run_is_scored_again_and_left_training(mae_run, tmp_path, monkeypatch):
    """A run that had already finished (the runner trains and evaluates nothing) scores its weights once more
    for results.json, on the ``eval_images`` it evaluates, and leaves its model in train mode."""
    jobs = []
    finished = {"interrupted": False, "step": 2}
    monkeypatch.setattr(segment, "run_job", lambda run, job: jobs.append(job) or finished)
    data = write_layout(tmp_path / "scenes", "generic", train=8, val=6)
    config = quick_segment_config(mae_run, data, eval_images=4, labels={"fraction": 0.5, "seed": 2},
                                  seg={"crop_size": 32, "channels": 16, "aux_channels": 16, "head": "linear",
                                       "init": "random", "freeze_encoder": True, "eval_flip": True})
    results = segment.run_segment(config, tmp_path / "seg")
    assert jobs[0].model.training
    assert (results["steps"], results["epochs"], results["val_images"]) == (2, 2.0, 4)  # 4 images, 2 a step
    assert {k: results[k] for k in ("protocol", "init", "head", "frozen_encoder", "data", "label_fraction",
                                    "seed", "train_images", "crop_size", "eval")} == {
        "protocol": "segment", "init": "random", "head": "linear", "frozen_encoder": True, "data": str(data),
        "label_fraction": 0.5, "seed": 2, "train_images": 4, "crop_size": 32,
        "eval": {"mode": "whole", "stride": None, "flip": True, "scales": []}}
    assert 0 <= results["mIoU"] <= 100 and results["best_val_mIoU"] is None
    assert json.loads((tmp_path / "seg" / "results.json").read_text())["mIoU"] == results["mIoU"]


def test_a_segmentation_run_decays_its_lr_by_the_papers_poly_schedule(mae_run, tmp_path, monkeypatch):
    """BEiT's and MAE's segmentation recipes warm up, then decay the lr linearly (poly, power 1), not by
    the cosine of pretraining and fine-tuning."""
    jobs = []
    monkeypatch.setattr(segment, "run_job", lambda run, job: jobs.append(job) or {"interrupted": True})
    data = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    config = quick_segment_config(mae_run, data, train={"batch_size": 4, "max_steps": 10})
    segment.run_segment(config, tmp_path / "seg")
    plan = jobs[0].plan
    expected = poly_schedule(plan.lr, config.optim.min_lr, 10, plan.warmup_steps)
    assert plan.schedule.lr == pytest.approx(expected)


def test_the_training_view_takes_the_runs_scale_rescale_crop_balance_photometry_and_std(mae_run, tmp_path,
                                                                                       monkeypatch):
    """Every non-default setting of the training view reaches it (the encoder's mean, the run's own std)."""
    jobs = []
    monkeypatch.setattr(segment, "run_job", lambda run, job: jobs.append(job) or {"interrupted": True})
    data = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    config = quick_segment_config(mae_run, data, seg={"crop_size": 32, "channels": 16, "aux_channels": 16,
                                                      "scale": [48, 40], "ratio_range": [0.75, 1.5],
                                                      "cat_max_ratio": 0.9, "photometric": False})
    config.data.std = [0.2, 0.3, 0.4]
    segment.run_segment(config, tmp_path / "seg")
    view = jobs[0].dataset.view
    assert (view.scale, tuple(view.ratio_range), view.cat_max_ratio) == ((48, 40), (0.75, 1.5), 0.9)
    assert not isinstance(view.photometric, PhotometricDistortion)
    assert view.normalize.std == [0.2, 0.3, 0.4]


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_pixel_limit_reaches_the_images_of_both_splits(mae_run, tmp_path, monkeypatch, split):
    """``data.max_image_pixels`` refuses a train image and a val image alike (one 40x40 image among 32x32
    ones, a limit of 32x32), before anything trains."""
    monkeypatch.setattr(segment, "run_job", lambda run, job: {"interrupted": True})
    data = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    for picture, folder in zip(scene(0, size=40), ("images", "masks"), strict=True):
        Image.fromarray(picture).save(data / folder / split / "1.png")
    config = quick_segment_config(mae_run, data)
    config.data.max_image_pixels = 32 * 32
    with pytest.raises(MimkitError, match=f"{split}/1.png.*above data.max_image_pixels"):
        segment.run_segment(config, tmp_path / "seg")
    config.data.max_image_pixels = 40 * 40
    segment.run_segment(config, tmp_path / "seg")


def test_a_segmentation_run_loads_its_best_weights_in_eval_mode(mae_run, tmp_path, monkeypatch):
    jobs = []
    monkeypatch.setattr(segment, "run_job", lambda run, job: jobs.append(job) or {"interrupted": True})
    data = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    run = tmp_path / "seg"
    segment.run_segment(quick_segment_config(mae_run, data), run)
    model, config = jobs[0].model, jobs[0].config
    checkpoints = Checkpoints(run)
    checkpoints.save(2, model, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpoints.save_best(1, model, "val_mIoU", 50.0)
    loaded = segment.load_segmenter(config, run)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                  strict=True))


def test_predict_writes_each_images_label_map_batched_by_size_as_the_run_evaluates(tmp_path, monkeypatch):
    """``mimkit predict SEGRUN`` on a segmentation folder: the images of both splits (not the masks), each
    label map at its image's size and path (a palette PNG of the class ids) beside its overlay, images of
    one size predicted together up to the batch size, with the run's evaluation settings or ``--tta``
    (the images rescaled to the run's eval_scale, the label maps at the images' own size)."""
    data = write_layout(tmp_path / "scenes", "generic", train=3, val=2)
    for picture, folder in zip(scene(9, size=40), ("images", "masks"), strict=True):  # one of another size
        Image.fromarray(picture).save(data / folder / "val" / "9.png")
    real, asked = predict.predict_logits, []

    def spy(model, images, crop, mode, stride, flip, scales):
        asked.append((len(images), images.shape[-1], crop, mode, stride, flip, list(scales)))
        return real(model, images, crop, mode, stride, flip, scales)

    monkeypatch.setattr(predict, "predict_logits", spy)
    config = resolved_seg_config(data, eval_mode="slide", eval_stride=16, eval_scales=[1.0],
                                 eval_scale=[64, 64], eval_flip=True)
    out = tmp_path / "out"
    written, _ = predict.predict_masks(ShadeSegmenter(), config, data, out, tta="flip", batch_size=2,
                                       workers=0)
    assert asked == [(2, 64, 32, "slide", 16, True, []), (2, 64, 32, "slide", 16, True, []),
                     (1, 64, 32, "slide", 16, True, []), (1, 64, 32, "slide", 16, True, [])]  # (eval_scale)
    names = ["train/0.png", "train/1.png", "train/2.png", "val/0.png", "val/1.png", "val/9.png"]
    assert sorted(str(path.relative_to(out / "images")) for path in written) == names
    for name in names:
        label_map = Image.open(out / "images" / name)
        truth = np.asarray(Image.open(data / "masks" / name))
        assert label_map.mode == "P" and label_map.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        assert (np.asarray(label_map) == truth).mean() > 0.95
        image = np.asarray(Image.open(data / "images" / name).convert("RGB")).astype(float)
        overlaid = np.asarray(Image.open(out / "images" / name.replace(".png", "_overlay.png"))).astype(float)
        colours = np.asarray(label_map.convert("RGB")).astype(float)  # the overlay: half image, half colour
        assert np.abs(overlaid - (image + colours) / 2).max() <= 0.5
    assert not (out / "masks").exists()
    asked.clear()
    predict.predict_masks(ShadeSegmenter(), config, data / "images" / "val", tmp_path / "again",
                          batch_size=4, workers=0)
    assert [(n, flip, scales) for n, _, _, _, _, flip, scales in asked] == [(2, True, [1.0]),
                                                                            (1, True, [1.0])]


@pytest.mark.parametrize("sizes, batch_size, runs", [
    ([(8, 8), (8, 12), (8, 12)], 4, [1, 2]),  # one height, another width: not stacked together
    ([(8, 8), (12, 8), (8, 8)], 4, [1, 1, 1]),
    ([(8, 8)] * 3, 2, [2, 1]),
])
def test_predict_batches_consecutive_images_of_one_size(sizes, batch_size, runs):
    images = [(torch.zeros(1, *size),) for size in sizes]
    batches = list(predict._same_size_batches(images, batch_size, workers=0))
    assert [len(batch) for batch in batches] == runs
    assert [index for batch in batches for index, _ in batch] == list(range(len(sizes)))


@pytest.mark.parametrize("files, names, kept", [
    (["a.jpg", "b.png"], ["a.png", "b.png"], 0),
    (["a.jpg", "a.PNG", "b.png"], ["a_jpg.png", "a_png.png", "b.png"], 2),  # a pair keeps its extensions
    (["s/a.jpg", "s/a.png", "s/a.tif", "a.png"], ["s/a_jpg.png", "s/a_png.png", "s/a_tif.png", "a.png"], 3),
])
def test_predict_names_the_label_maps_after_the_images(tmp_path, files, names, kept):
    """Images whose names differ only by extension keep it in their label map's name, and are counted."""
    paths = [str(tmp_path / f) for f in files]
    assert predict.output_names(paths, tmp_path) == ([Path(n) for n in names], kept)


def test_predict_refuses_an_unknown_tta_a_missing_folder_and_a_pretraining_run(tmp_path, mae_run):
    config = resolved_seg_config(tmp_path)
    with pytest.raises(MimkitError, match="--tta 'big' is not one of flip, ms"):
        predict.predict_masks(ShadeSegmenter(), config, tmp_path, tmp_path / "out", tta="big")
    with pytest.raises(MimkitError, match="is not a folder of images"):
        predict.predict_masks(ShadeSegmenter(), config, tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(MimkitError, match="is a pretraining run: predict needs a segmentation run"):
        predict.predict_classes(mae_run, tmp_path, tmp_path / "out")


def test_a_classifier_of_fewer_classes_than_the_top_asked_ranks_them_all(tmp_path, monkeypatch):
    """``top`` 5 of a 3-class classifier: each image's 3 classes by falling probability, named from the
    run's training split."""
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    data = DataConfig(img_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    classifier = SimpleNamespace(kind="finetune", config=SimpleNamespace(data=data),
                                 model=lambda images: logits.expand(len(images), 3))
    splits = []
    monkeypatch.setattr(predict, "load_encoder", lambda run: classifier)
    monkeypatch.setattr(predict, "build_source", lambda source, split, **kwargs: splits.append(split)
                        or SimpleNamespace(info=SimpleNamespace(classes=["sky", "road", "car"])))
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    header, row = csv.reader(predict.predict_classes("run", tmp_path, tmp_path / "out").open())
    assert splits == ["train"]
    assert header == ["file", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert row[1::2] == ["road", "car", "sky"] and row[2] == f"{logits.softmax(-1).max():.4f}"


class ColumnClasses(nn.Module):
    """Class 1 right of x = 2.3 (in input pixels), else 0, whatever the image; passes the image through a
    1x1 convolution on the way and keeps that output's dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.dtypes = []

    def forward(self, images):
        seen = self.conv(images)
        self.dtypes.append(seen.dtype)
        x = (torch.arange(images.shape[-1], dtype=torch.float32) - 2.3).expand_as(images[:, 0])
        return torch.stack([-x, x], 1) + 0 * seen


def test_predict_brings_the_logits_to_the_image_size_by_pixel_centres_in_full_precision(tmp_path):
    """An 8-px image evaluated at 16 px (eval_scale): label map column j reads logit column 2j + 1/2, so class
    1 starts at column 1 (corner-aligned, 15j/7, it would start at 2); float32 on the CPU; a folder holding
    other files is refused without ``force``."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "gray").save(images / "a.png")
    model = ColumnClasses()
    config = resolved_seg_config(tmp_path, crop_size=16, eval_scale=[16, 16])
    predict.predict_masks(model, config, images, tmp_path / "out", workers=0)
    assert np.asarray(Image.open(tmp_path / "out" / "a.png"))[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert model.dtypes == [torch.float32]
    with pytest.raises(MimkitError, match="did not write"):
        predict.predict_masks(model, config, images, images, workers=0)
