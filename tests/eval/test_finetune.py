"""The classifier built from a pretrained encoder, layer-wise lr decay, and finetune / linprobe / knn
through the command line on a tiny MAE run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.config import from_dict
from mimkit.data.loader import eval_loader
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.eval.augment import MixTargets
from mimkit.eval.config import FinetuneConfig
from mimkit.eval.finetune import finetuned_model
from mimkit.eval.scores import classification_accuracy
from mimkit.models.classifier import FineTuned, build_classifier, pooled_features
from mimkit.models.vit import build_vit
from mimkit.runs import latest_weights, load_encoder, saved_values
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import param_groups

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
    classifier = build_classifier(encoder, 7, pool, drop_path=0.2)
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
    (["linprobe", "{run}", "--val-fraction", "1.0"], "--val-fraction"),
    (["knn", "{run}/config.yaml"], "not a checkpoint"),
])
def test_bad_input_is_one_line_error(mae_run, tmp_path, capsys, args, message):
    args = [a.format(run=mae_run) for a in args]
    assert main([*args, "--data", "synthetic", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
