"""The classifier built from a pretrained encoder, layer-wise lr decay, and finetune / linprobe / knn
through the command line on a tiny MAE run."""

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file, save_model

import mimkit.eval.finetune as finetune
from mimkit.cli import main
from mimkit.config import from_dict
from mimkit.data.loader import eval_loader
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval.augment import MixTargets
from mimkit.eval.config import FinetuneConfig
from mimkit.eval.finetune import (
    finetuned_encoder,
    finetuned_model,
    read_finetune,
    resolve_finetune,
    run_finetune,
    same_images,
)
from mimkit.eval.scores import classification_accuracy
from mimkit.eval.subsets import make_splits
from mimkit.kinds import kind_of
from mimkit.models.classifier import FineTuned, block_features, build_classifier, pooled_features
from mimkit.models.vit import build_vit
from mimkit.runs import latest_weights, load_encoder, saved_values
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import param_groups
from tests.conftest import TINY_MAE_KWARGS, perturb

QUICK_FT = ["--max-steps", "4", "--batch-size", "32", "--set", "data.num_workers=0",
            "--set", "eval_batch_size=128"]


def tiny_encoder(depth=3):
    return build_vit(dict(embed_dim=32, depth=depth, num_heads=2), img_size=16, patch_size=4, in_chans=1)


def test_layer_decay_scales_each_block():
    model = FineTuned(build_classifier(tiny_encoder(depth=3), 10, "avg", 0.1))
    scale = {name: g["lr_scale"] for g in param_groups(model, 0.05, 0.75, 3) for name in g["names"]}
    assert scale["classifier.cls_token"] == scale["classifier.pos_embed"] == 0.75 ** 4
    assert scale["classifier.patch_embed.proj.weight"] == 0.75 ** 4
    for i in range(3):
        assert scale[f"classifier.blocks.{i}.attn.qkv.weight"] == 0.75 ** (3 - i)
        assert scale[f"classifier.blocks.{i}.mlp.fc2.bias"] == 0.75 ** (3 - i)
    assert scale["classifier.head.weight"] == scale["classifier.fc_norm.weight"] == 1.0
    decay = {name: g["weight_decay"] for g in param_groups(model, 0.05, 0.75, 3) for name in g["names"]}
    assert decay["classifier.blocks.0.attn.qkv.weight"] == 0.05 and decay["classifier.pos_embed"] == 0.0


def test_stochastic_depth_grows_linearly_to_the_last_block():
    """Block i of n drops its residual branches at drop_path * i / (n - 1): none in the first block."""
    classifier = build_classifier(tiny_encoder(depth=3), 7, drop_path=0.2)
    rates = [getattr(getattr(block, branch), "drop_prob", 0.0) for block in classifier.blocks
             for branch in ("drop_path1", "drop_path2")]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_classifier_keeps_every_encoder_weight(pool):
    encoder = tiny_encoder()
    encoder.pos_embed.requires_grad_(False)  # as MAE's fixed sin-cos table: fine-tuning trains it all
    classifier = build_classifier(encoder, 7, pool, drop_path=0.2)
    assert 0 < classifier.head.weight.std() < 1e-4 and not classifier.head.bias.any()  # MAE's head init
    weights = classifier.state_dict()
    renamed = {(k.replace("norm.", "fc_norm.", 1) if pool == "avg" and k.startswith("norm.") else k): v
               for k, v in encoder.state_dict().items()}
    assert set(weights) - set(renamed) == {"head.weight", "head.bias"}
    for key, value in renamed.items():
        torch.testing.assert_close(weights[key], value)
    assert all(p.requires_grad for p in classifier.parameters())
    assert classifier(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    classifier.eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the probes' features are what the head reads
        expected = classifier.forward_head(classifier.forward_features(images), pre_logits=True)
        torch.testing.assert_close(pooled_features(classifier, images, pool), expected)


def test_a_classifier_rebuilt_with_the_other_pool_moves_the_final_norm_back_with_its_weights():
    """A fine-tuned ``avg`` classifier (its norm in ``fc_norm``) taken as the encoder of a ``cls`` one: the
    trained norm returns before the pooling, and the features are the normalized [CLS] token."""
    avg = build_classifier(perturb(tiny_encoder()), 7, "avg")
    cls = build_classifier(avg, 5, "cls")
    assert isinstance(cls.fc_norm, torch.nn.Identity) and isinstance(avg.norm, torch.nn.Identity)
    torch.testing.assert_close(cls.norm.weight, avg.fc_norm.weight)
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = cls.blocks(cls._pos_embed(cls.patch_embed(images)))
        torch.testing.assert_close(pooled_features(cls.eval(), images, "cls"), avg.fc_norm(tokens)[:, 0])


@pytest.mark.parametrize("num_classes", [0, -1])
def test_a_classifier_without_classes_is_a_one_line_error(num_classes):
    with pytest.raises(MimkitError, match=f"at least one class, got {num_classes}"):
        build_classifier(tiny_encoder(), num_classes)
    assert build_classifier(tiny_encoder(), 1)(torch.randn(2, 1, 16, 16)).shape == (2, 1)


def test_a_model_that_is_no_vit_encoder_or_an_unknown_pool_is_a_one_line_error():
    lacks = "blocks, norm, fc_norm, num_prefix_tokens, forward_features, reset_classifier"
    with pytest.raises(MimkitError, match=rf"^Linear is not a timm ViT-style encoder \(it lacks {lacks}\); "
                                          r"evaluation takes timm VisionTransformer or Beit"):
        build_classifier(torch.nn.Linear(2, 2), 3)
    images = torch.randn(1, 1, 16, 16)
    for read in (lambda: build_classifier(tiny_encoder(), 3, "max"),
                 lambda: pooled_features(tiny_encoder(), images, "max"),  # a probe's --set pool=max
                 lambda: block_features(tiny_encoder(), images, "max", [1])):
        with pytest.raises(MimkitError, match="^pool 'max' is not one of avg, cls$"):
            read()


def test_pretrained_encoder_loads_with_no_missing_key(mae_run):
    encoder = load_encoder(mae_run)
    saved = load_file(str(latest_weights(mae_run)))
    encoder_keys = {k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")}
    assert set(encoder.model.state_dict()) == set(encoder_keys)
    for key, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, encoder_keys[key])
    random = load_encoder(mae_run, init="random")
    assert not torch.equal(random.model.blocks[0].attn.qkv.weight, encoder.model.blocks[0].attn.qkv.weight)


def test_mixed_targets_are_distributions_with_smoothing():
    torch.manual_seed(0)
    images, targets = MixTargets(4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)(
        torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert images.shape == (6, 1, 8, 8)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert targets.min() >= 0.1 / 4 - 1e-6
    one_hot = MixTargets(4, mixup=0, cutmix=0, label_smoothing=0.0)
    _, plain = one_hot(torch.randn(2, 1, 8, 8), torch.tensor([2, 3]))
    assert plain.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


def test_the_runs_own_normalization_and_classes_win_over_the_encoders_and_the_datas(mae_run):
    """``data.mean``, ``data.std`` and ``classifier.num_classes`` set in the run are kept; unset, they come
    from the encoder and the data."""
    encoder, info = load_encoder(mae_run), SimpleNamespace(num_classes=10)
    spec = encoder.spec.data  # synthetic data's: mean 0.5, std 0.2
    own = from_dict(FinetuneConfig, {"data": {"mean": [0.1] * 3, "std": [0.3] * 3},
                                     "classifier": {"num_classes": 4}})
    resolved = resolve_finetune(own, encoder, info)
    assert (resolved.data.mean, resolved.data.std, resolved.classifier.num_classes) == (
        [0.1] * 3, [0.3] * 3, 4)
    default = resolve_finetune(FinetuneConfig(), encoder, info)
    assert (default.data.mean, default.data.std, default.classifier.num_classes) == (spec.mean, spec.std, 10)


@pytest.mark.slow
def test_finetune_cli_from_pretrained_random_and_finetuned(mae_run, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert main(["finetune", str(mae_run), "--data", "synthetic", "--out", str(ft), "--val-fraction", "0.2",
                 "--set", "ema_decay=0.9", *QUICK_FT]) == 0
    results = json.loads((ft / "results.json").read_text())
    assert results["steps"] == 4 and results["train_images"] == 206
    assert {"test_top1", "test_top5", "test_ema_top1", "test_best_top1", "best_val_ema_top1"} <= set(results)
    assert Checkpoints(ft).best()["metric"] == "val_ema_top1"
    # the EMA moved with training (past the pretrained weights and the first step's copy) ...
    last = load_file(str(latest_weights(ft)))
    qkv = "blocks.0.attn.qkv.weight"
    pretrained = load_encoder(mae_run).model.state_dict()[qkv]
    assert not torch.equal(last[f"ema.module.{qkv}"], pretrained)
    assert not torch.equal(last[f"ema.module.{qkv}"], last[f"classifier.{qkv}"])
    # ... and results.json's test_ema_top1 is the accuracy of those EMA weights on the test split
    config = from_dict(FinetuneConfig, saved_values(ft))
    model = finetuned_model(config)
    load_weights(model, latest_weights(ft))
    test = eval_loader(build_source("synthetic", "test"), eval_view(32, config.data.mean, config.data.std))
    ema = classification_accuracy(model.ema.module, test, torch.device("cpu"))
    assert results["test_ema_top1"] == ema["top1"] and results["test_ema_top5"] == ema["top5"]
    assert any("val_top1" in r for r in read_metrics(ft)) and any("loss" in r for r in read_metrics(ft))
    assert "test top-1" in capsys.readouterr().out

    again = tmp_path / "ft2"  # BEiT's intermediate fine-tuning: from a fine-tuned run
    assert main(["finetune", str(ft), "--data", "synthetic", "--out", str(again), "--label-fraction", "0.5",
                 "--pool", "cls", *QUICK_FT]) == 0
    results = json.loads((again / "results.json").read_text())
    assert results["encoder"].endswith("best.safetensors") and results["train_images"] == 126
    assert results["val_split"].startswith("the test split") and results["test_top1"] == results["val_top1"]

    scratch = tmp_path / "scratch"
    assert main(["finetune", str(mae_run), "--data", "synthetic", "--out", str(scratch), "--init", "random",
                 *QUICK_FT]) == 0
    assert json.loads((scratch / "results.json").read_text())["init"] == "random"


@pytest.mark.parametrize("command", ["linprobe", "knn"])
@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_probe_cli(mae_run, tmp_path, command, init):
    out = tmp_path / command
    extra = ["--epochs", "5"] if command == "linprobe" else []
    assert main([command, str(mae_run), "--data", "synthetic", "--out", str(out), "--label-fraction", "0.5",
                 "--init", init, "--num-workers", "0", *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    # 10 classes of stripes at class-specific angles and brightness: chance is 10%, these features give
    # 51-65% (measured), and a probe that mixes up images and labels falls back to chance
    assert results["train_images"] == 126 and results["test_top1"] > 30
    assert results["encoder"].startswith("random") == (init == "random")
    assert read_metrics(out)


@pytest.mark.parametrize("args, message", [
    (["finetune", "{run}", "--label-fraction", "1.5", "--max-steps", "1"], "label fraction"),
    (["finetune", "/no/such/run", "--max-steps", "1"], "not a mimkit run"),
    (["finetune", "{run}", "--set", "classifier.pool=max", "--max-steps", "1"], "pool"),
    (["finetune", "{run}", "--set", "data.img_size=64", "--max-steps", "1"], "differs from the encoder's 32"),
    (["linprobe", "{run}", "--val-fraction", "1.0"], "--val-fraction"),
    (["knn", "{run}/config.yaml"], "not a checkpoint"),
])
def test_bad_input_is_one_line_error(mae_run, tmp_path, capsys, args, message):
    args = [a.format(run=mae_run) for a in args]
    assert main([*args, "--data", "synthetic", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def three_split_folder(root: Path) -> Path:
    """32-px images of two classes in train/ (8 each), val/ (2 each) and test/ (3 each): a validation split
    that is not the test split."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name /
                                                                                        f"{i}.png")
    return root


def spy_accuracies(monkeypatch) -> list:
    """Record each accuracy the fine-tuning module computes: (what for, its weights, how many images)."""
    calls, real = [], finetune.classification_accuracy

    def spy(model, loader, device, desc="eval"):
        calls.append((desc, {k: v.clone() for k, v in model.state_dict().items()}, len(loader.dataset)))
        return real(model, loader, device, desc)

    monkeypatch.setattr(finetune, "classification_accuracy", spy)
    return calls


def finetune_job(monkeypatch, out: Path, **values):
    """The `Job` ``run_finetune`` hands the runner for a configuration of ``values`` (nothing trains)."""
    jobs = []
    monkeypatch.setattr(finetune, "run_job", lambda run, job: jobs.append(job) or {"interrupted": True})
    run_finetune(from_dict(FinetuneConfig, values), out)
    return jobs[0]


def test_an_evaluation_scores_the_data_val_split_and_leaves_the_model_training(mae_run, tmp_path,
                                                                              monkeypatch):
    """The loop evaluates the classifier and its EMA on val/ (not test/), then goes on training: the model
    is back in train mode (dropout, drop path)."""
    calls = spy_accuracies(monkeypatch)
    data = three_split_folder(tmp_path / "shapes")
    job = finetune_job(monkeypatch, tmp_path / "ft", encoder=str(mae_run), ema_decay=0.5, eval_batch_size=3,
                       train={"batch_size": 4}, data={"source": str(data), "num_workers": 0})
    results = job.evaluation.evaluate(job.model.train())
    assert set(results) == {"val_top1", "val_top5", "val_ema_top1", "val_ema_top5"}
    assert [(desc, images) for desc, _, images in calls] == [("val", 4), ("val ema", 4)]
    assert job.model.training and job.model.classifier.training


def test_named_data_comes_from_its_root_and_a_random_encoder_from_the_seed(mae_run, tmp_path, monkeypatch,
                                                                          tiny_mnist):
    """A data set by name is looked up in ``data.root`` (here the only place it is); ``--init random`` draws
    the encoder's weights from ``train.seed``."""
    def encoder_weights(seed: int) -> list[torch.Tensor]:
        job = finetune_job(monkeypatch, tmp_path / f"ft{seed}", encoder=str(mae_run),
                           train={"seed": seed, "batch_size": 4},
                           data={"source": "mnist", "root": str(tiny_mnist), "num_workers": 0},
                           classifier={"init": "random"})
        assert len(job.dataset) == 10
        return list(job.model.classifier.blocks.state_dict().values())

    first = encoder_weights(0)
    assert not all(torch.equal(a, b) for a, b in zip(first, encoder_weights(3), strict=True))


def test_colour_data_reaches_a_grey_encoder_grey_in_every_split(tmp_path, monkeypatch):
    """A 1-channel encoder fine-tuned on an RGB folder: its training, val and test images are read grey."""
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    grey = tmp_path / "grey"
    assert main(["pretrain", "mae", "--data", "synthetic:8", "--out", str(grey), "--max-steps", "1",
                 "--batch-size", "8", "--set", "data.num_workers=0", "--set", "data.channels=1", *tiny]) == 0
    calls = spy_accuracies(monkeypatch)
    ft = tmp_path / "ft"
    results = run_finetune(from_dict(FinetuneConfig, {
        "encoder": str(grey), "eval_batch_size": 4, "train": {"batch_size": 4, "max_steps": 1},
        "data": {"source": str(three_split_folder(tmp_path / "shapes")), "num_workers": 0}}), ft)
    assert [(desc, images) for desc, _, images in calls] == [("val", 4), ("test", 6)]
    assert results["data"].endswith("shapes") and read_finetune(saved_values(ft)).data.channels == 1


@pytest.mark.parametrize("bad_images, problem", [
    ({}, "cannot read image"),
    ({"skip_bad_images": True, "max_bad_images": 0}, "more than max_bad_images=0"),
    ({"skip_bad_images": True, "max_bad_images": 1}, None),
])
@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_an_unreadable_training_image_is_skipped_as_the_run_asks(mae_run, tmp_path, monkeypatch, bad_images,
                                                                 problem):
    """``--skip-bad-images`` (at most ``max_bad_images``) in a folder with val/ and test/ splits: those
    splits read train/ again (for its classes), so they too must skip its unreadable file."""
    data = three_split_folder(tmp_path / "shapes")
    (data / "train" / "a" / "0.png").write_bytes(b"not a png")
    values = {"encoder": str(mae_run), "train": {"batch_size": 4},
              "data": {"source": str(data), "num_workers": 0, **bad_images}}
    if problem:
        with pytest.raises(MimkitError, match=problem):
            finetune_job(monkeypatch, tmp_path / "ft", **values)
    else:
        train = finetune_job(monkeypatch, tmp_path / "ft", **values).dataset.source
        assert len([train[i] for i in range(len(train))]) == 16


def nudge_best_weights(monkeypatch) -> None:
    """Let the runner train, then move the kept best weights off the last ones (in a 3-step run both are the
    last step's): the test number of the best weights must be that of the file."""
    real = finetune.run_job

    def run_job(run, job):
        summary = real(run, job)
        path = run.checkpoints.best_path
        weights = load_file(str(path))
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(path))
        return summary

    monkeypatch.setattr(finetune, "run_job", run_job)


@pytest.mark.parametrize("data, val_fraction, ema, val_split, evaluated", [
    ("folder", 0.25, 0.5, "0.25 of train, held out",
     [("val", 4), ("val ema", 4), ("test", 6), ("test ema", 6), ("test best", 6)]),
    ("folder", 0.0, None, "the data's val split", [("val", 4), ("test", 6)]),
    ("synthetic:16", 0.0, None, "the test split (no validation split: for watching only)", [("val", 16)]),
])
def test_a_finetune_run_reports_its_splits_length_and_test_numbers(mae_run, tmp_path, monkeypatch, data,
                                                                   val_fraction, ema, val_split, evaluated):
    """results.json after 3 steps of batch 4: the validation split it watched, the steps and epochs, the test
    numbers (the last evaluation's when val is the test split), and, when the best weights were chosen on
    held-out training images, the test number of those weights (the EMA's when it keeps one)."""
    calls = spy_accuracies(monkeypatch)
    nudge_best_weights(monkeypatch)
    source = str(three_split_folder(tmp_path / "shapes")) if data == "folder" else data
    ft = tmp_path / "ft"
    config = from_dict(FinetuneConfig, {"encoder": str(mae_run), "eval_batch_size": 4, "ema_decay": ema,
                                        "data": {"source": source, "num_workers": 0},
                                        "labels": {"val_fraction": val_fraction},
                                        "train": {"batch_size": 4, "max_steps": 3}})
    results = run_finetune(config, ft)
    assert json.loads((ft / "results.json").read_text()) == results
    train_images = 16 - round(16 * val_fraction)
    assert results["val_split"] == val_split and results["train_images"] == train_images
    assert results["steps"] == 3 and results["epochs"] == round(3 / (train_images // 4), 2)
    assert [(desc, images) for desc, _, images in calls] == evaluated
    metric = "val_ema_top1" if ema else "val_top1"
    best = Checkpoints(ft).best()
    assert (results[f"best_{metric}"], results["best_step"]) == (best["value"], best["step"])
    assert (best["value"], best["step"]) == (results[metric], 3)
    if val_split.startswith("the test split"):
        assert (results["test_top1"], results["test_top5"]) == (results["val_top1"], results["val_top5"])
    if "test best" in dict(evaluated):
        kept = load_file(str(Checkpoints(ft).best_path))
        prefix = "ema.module." if ema else "classifier."
        weights = calls[-1][1]
        assert weights.keys() == {k.removeprefix(prefix) for k in kept if k.startswith(prefix)}
        assert all(torch.equal(kept[prefix + k], v) for k, v in weights.items())
        assert {"test_best_top1", "test_best_top5"} <= set(results)
    assert 0 < results["wall_s"] < 600


@pytest.mark.parametrize("val_fraction", [0.25, 0.0])
def test_a_finetune_run_scores_each_split_on_its_own_images(mae_run, tmp_path, monkeypatch, val_fraction):
    """Validation reads the part held out of train/ (never the training subset) or, without a hold-out, val/;
    the test number reads test/: each evaluation's images and labels, pixel by pixel, are its own split's."""
    scored, real = {}, finetune.classification_accuracy

    def spy(model, loader, device, desc="eval"):
        scored.setdefault(desc, list(loader.dataset.source))
        return real(model, loader, device, desc)

    monkeypatch.setattr(finetune, "classification_accuracy", spy)
    folder = str(three_split_folder(tmp_path / "shapes"))
    run_finetune(from_dict(FinetuneConfig, {"encoder": str(mae_run), "eval_batch_size": 4,
                                            "data": {"source": folder, "num_workers": 0},
                                            "labels": {"val_fraction": val_fraction},
                                            "train": {"batch_size": 4, "max_steps": 1}}), tmp_path / "ft")
    train = build_source(folder, "train")
    val = (torch.utils.data.Subset(train, make_splits(train, 1.0, val_fraction).val) if val_fraction
           else build_source(folder, "val"))
    for desc, source in (("val", val), ("test", build_source(folder, "test"))):
        expected = list(source)
        assert [label for _, label in scored[desc]] == [label for _, label in expected]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(scored[desc], expected, strict=True))


@pytest.fixture(scope="module")
def ft_run(mae_run, tmp_path_factory) -> Path:
    """A fine-tuning run of 2 steps on 16 synthetic images, a checkpoint at each step."""
    ft = tmp_path_factory.mktemp("ft") / "ft"
    assert main(["finetune", str(mae_run), "--data", "synthetic:16", "--out", str(ft), "--batch-size", "8",
                 "--max-steps", "2", "--set", "data.num_workers=0", "--set", "train.checkpoint_every=1"]) == 0
    return ft


def test_a_finetuned_encoder_comes_from_the_weights_asked_for_else_the_best(ft_run):
    config = read_finetune(saved_values(ft_run))
    assert finetuned_encoder(config, ft_run, None)[1] == Checkpoints(ft_run).best_path
    first = Checkpoints(ft_run).weights_path(1)  # (the best are step 2's: the one evaluation was at the end)
    model, weights = finetuned_encoder(config, ft_run, first)
    kept = load_file(str(first))
    assert weights == first
    assert all(torch.equal(kept[f"classifier.{k}"], v) for k, v in model.state_dict().items())
    encoder = load_encoder(ft_run)  # as predict and the probes take it: in eval mode (drop path off)
    assert not any(module.training for module in encoder.model.modules())


def test_a_finetuned_encoder_of_a_run_with_an_ema_is_the_emas_weights(ft_run, tmp_path):
    """What the probes, predict and export take from a run that kept an EMA: the EMA's classifier, not the
    raw weights (the EMA is what its accuracy and "best" were judged by)."""
    config = read_finetune({**saved_values(ft_run), "ema_decay": 0.9})
    model = finetuned_model(config)
    perturb(model.ema.module)
    save_model(model, str(tmp_path / "ema.safetensors"))
    encoder, _ = finetuned_encoder(config, ft_run, tmp_path / "ema.safetensors")
    ema, raw = model.ema.module.state_dict(), model.classifier.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in encoder.state_dict().items())
    assert not torch.equal(encoder.state_dict()["head.weight"], raw["head.weight"])


def test_a_classifier_predicts_the_top_classes_of_each_image(ft_run, tmp_path):
    """``mimkit predict FTRUN``: one row per image, the top 5 of the 10 classes by falling probability; with
    ``force``, into a folder that holds other files."""
    images = tmp_path / "images"
    images.mkdir()
    for i, shade in enumerate((20, 200)):
        Image.new("RGB", (40, 40), (shade, shade, shade)).save(images / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = read_finetune(saved_values(ft_run))
    said = finetune.predict_with_classifier(config, ft_run, str(images), str(out), None, 8, True)
    assert said == f"wrote {out / 'predictions.csv'}"
    header, *rows = list(csv.reader((out / "predictions.csv").open()))
    assert header == ["file"] + [f"{name}_{i}" for i in range(1, 6) for name in ("class", "prob")]
    assert [row[0] for row in rows] == [str(images / "0.png"), str(images / "1.png")]
    for row in rows:
        probs = [float(p) for p in row[2::2]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert len(set(row[1::2])) == 5 and set(row[1::2]) <= {f"class_{c}" for c in range(10)}


def test_a_classifier_refuses_test_time_augmentation(tmp_path):
    with pytest.raises(MimkitError, match="--tta is for segmentation runs"):
        finetune.predict_with_classifier(FinetuneConfig(), tmp_path, str(tmp_path), str(tmp_path / "out"),
                                         "flip", 8, False)


def test_a_saved_configuration_is_read_without_its_augmentation():
    """Older runs name augmentation fields this version lacks; the rest of the configuration is kept."""
    config = read_finetune({"encoder": "runs/mae", "eval_every": 3, "augment": {"rand_augment_ops": 2}})
    assert (config.encoder, config.eval_every) == ("runs/mae", 3)


class Images(torch.utils.data.Dataset):
    def __init__(self, values: list[float], labels: list[int]):
        self.values, self.labels = values, labels

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), self.values[i]), self.labels[i]


@pytest.mark.parametrize("other, same", [
    (Images([0.0, 1.0, 2.0], [0, 1, 0]), True),
    (Images([0.0, 1.0], [0, 1]), False),  # fewer images
    (Images([0.0, 1.0, 2.0], [0, 1, 1]), False),  # a label differs
    (Images([0.0, 1.0, 5.0], [0, 1, 0]), False),  # the last image differs
    (Images([5.0, 1.0, 2.0], [0, 1, 0]), False),  # the first image differs
])
def test_same_images_compares_length_labels_and_images(other, same):
    assert same_images(Images([0.0, 1.0, 2.0], [0, 1, 0]), other) is same


def test_same_images_looks_past_the_first_images_of_a_long_split():
    """Of 20 images, the few compared spread to the last: splits that differ in their last image differ."""
    first = [float(i) for i in range(20)]
    assert same_images(Images(first, [0] * 20), Images(first, [0] * 20))
    assert not same_images(Images(first, [0] * 20), Images(first[:-1] + [99.0], [0] * 20))


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_finetune_runs_module_is_rebuilt_with_its_pool_and_drop_path(ft_run, pool):
    """What the probes, predict, evaluate and export rebuild a fine-tuning run as: its own pooling (timm's
    ``token`` for ``cls``, with the final norm where that pooling reads it) and its stochastic depth."""
    values = saved_values(ft_run)
    config = read_finetune({**values, "classifier": {**values["classifier"], "pool": pool, "drop_path": 0.3}})
    classifier = finetuned_model(config).classifier
    assert classifier.global_pool == {"avg": "avg", "cls": "token"}[pool]
    assert isinstance(classifier.norm if pool == "avg" else classifier.fc_norm, torch.nn.Identity)
    assert classifier.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


SYNTHETIC = {"source": "synthetic:16", "num_workers": 0}


def test_a_library_call_resumes_only_under_the_runs_own_configuration_unless_forced(mae_run, monkeypatch,
                                                                                     tmp_path):
    """`run_finetune` opens the run with ``force_config`` False unless given (the runner then refuses a
    trained run's other configuration: `mimkit.runs.keep_config`), as `run_pretraining` does."""
    forced = []
    monkeypatch.setattr(finetune, "run_job",
                        lambda run, job, *rest: forced.append(run.force_config) or {"interrupted": True})
    config = from_dict(FinetuneConfig, {"encoder": str(mae_run), "data": SYNTHETIC,
                                        "train": {"batch_size": 4, "max_steps": 1}})
    run_finetune(config, tmp_path / "a")
    run_finetune(config, tmp_path / "b", force_config=True)
    assert forced == [False, True]


def test_the_heads_initialization_follows_the_training_seed_alone(mae_run, monkeypatch, tmp_path):
    """The head is drawn after seeding with train.seed (the same on every rank): the global stream before
    the run plays no part, another seed draws another head."""
    heads = []
    for i, (seed, noise) in enumerate([(0, 1), (0, 2), (1, 1)]):
        torch.manual_seed(noise)
        job = finetune_job(monkeypatch, tmp_path / str(i), encoder=str(mae_run), data=SYNTHETIC,
                           train={"batch_size": 4, "seed": seed})
        heads.append(job.model.classifier.head.weight)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_gradient_checkpointing_is_asked_of_the_classifier(mae_run, monkeypatch, tmp_path):
    job = finetune_job(monkeypatch, tmp_path / "ft", encoder=str(mae_run), data=SYNTHETIC,
                       train={"batch_size": 4})
    assert job.checkpointed is job.model.classifier


def test_a_finetune_run_records_its_settings_and_logs_each_evaluation_and_its_test_numbers(mae_run, tmp_path,
                                                                                          caplog):
    folder = str(three_split_folder(tmp_path / "shapes"))
    config = from_dict(FinetuneConfig, {"encoder": str(mae_run), "eval_batch_size": 4,
                                        "data": {"source": folder, "num_workers": 0},
                                        "labels": {"val_fraction": 0.25, "fraction": 0.5, "seed": 3},
                                        "classifier": {"pool": "cls"},
                                        "train": {"batch_size": 2, "max_steps": 2}})
    with caplog.at_level(logging.INFO, logger="mimkit.eval.finetune"):
        results = run_finetune(config, tmp_path / "ft")
    recorded = {k: results[k] for k in ("protocol", "encoder", "init", "data", "pool", "label_fraction",
                                        "val_fraction", "seed")}
    assert recorded == {"protocol": "finetune", "encoder": str(latest_weights(mae_run)), "init": "pretrained",
                        "data": folder, "pool": "cls", "label_fraction": 0.5, "val_fraction": 0.25, "seed": 3}
    assert results["wall_s"] == round(results["wall_s"], 1)
    logged = [r.getMessage() for r in caplog.records if r.name == "mimkit.eval.finetune"]
    val = f"val_top1 {results['val_top1']:.2f}  val_top5 {results['val_top5']:.2f}"
    final = "  ".join(f"{k} {results[k]:.2f}" for k in ("test_top1", "test_top5", "test_best_top1",
                                                          "test_best_top5"))
    assert logged[-2:] == [val, final]


def test_the_finetune_kind_reads_rebuilds_and_predicts_with_its_own_functions():
    """The run kind's record: an older run's configuration read without its augmentation, the classifier as
    its encoder, ``mimkit predict`` by the classifier."""
    kind = kind_of("finetune")
    assert (kind.read, kind.encoder, kind.predict) == (read_finetune, finetuned_encoder,
                                                       finetune.predict_with_classifier)
