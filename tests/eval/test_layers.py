"""Probes at any block: the features of block N, ``--layer N`` and ``--layer all`` for linprobe and knn."""

import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.eval.features import ProbeData, probe_layers
from mimkit.models.classifier import block_features, build_classifier, pooled_features
from mimkit.models.vit import build_vit
from mimkit.train.metrics_log import read_metrics
from tests.conftest import perturb

TINY_KWARGS = ("depth=3", "embed_dim=32", "num_heads=2", "decoder_depth=1", "decoder_embed_dim=32",
               "decoder_num_heads=2")
TINY_MAE = [arg for kv in TINY_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("layers") / "mae"
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "32", "--set", "data.num_workers=0", *TINY_MAE]) == 0
    return run


@pytest.mark.parametrize("pool", ["avg", "cls"])
@pytest.mark.parametrize("kind", ["vit", "classifier", "beit"])
def test_block_features(kind, pool):
    torch.manual_seed(0)
    encoder = build_vit(dict(embed_dim=32, depth=3, num_heads=2), img_size=16, patch_size=4, in_chans=1)
    if kind == "classifier":  # a fine-tuned model: its final norm moved after the pooling for avg
        encoder = build_classifier(encoder, 4, pool=pool)
    elif kind == "beit":
        encoder = Beit(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2,
                       num_classes=0, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                       global_pool="token")
    encoder = perturb(encoder)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        features = block_features(encoder, x, pool, [1, 2, 3])
        assert features.shape == (2, 3, 32)
        # the last block: exactly the usual features
        torch.testing.assert_close(features[:, 2], pooled_features(encoder, x, pool))
        # block 1 by hand: its raw output pooled, then a LayerNorm without parameters
        tokens = encoder.forward_intermediates(x, indices=[0], norm=False, output_fmt="NLC",
                                               intermediates_only=True, return_prefix_tokens=True)[0]
        pooled = tokens[0].mean(1) if pool == "avg" else tokens[1][:, 0]
        torch.testing.assert_close(features[:, 0], F.layer_norm(pooled, (32,), eps=1e-6))
        for alone in (1, 2, 3):  # one block asked for alone: the same features as among the others
            alone_features = block_features(encoder, x, pool, [alone])
            torch.testing.assert_close(alone_features[:, 0], features[:, alone - 1])


def test_avg_pooling_leaves_out_the_class_and_register_tokens():
    encoder = perturb(build_vit(dict(embed_dim=32, depth=2, num_heads=2), img_size=16, patch_size=4,
                                in_chans=1, reg_tokens=2))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = encoder.forward_features(x)  # [B, 1 + 2 + 16, D]: [CLS], the registers, the patches
        assert tokens.shape[1] == 19
        torch.testing.assert_close(pooled_features(encoder, x, "avg"), tokens[:, 3:].mean(1))
        torch.testing.assert_close(block_features(encoder, x, "avg", [2])[:, 0], tokens[:, 3:].mean(1))


@pytest.mark.parametrize("layers", [[2, 1], [1, 1], [0, 1], [1, 4]])
def test_block_features_refuses_layers_out_of_order_or_outside_the_blocks(layers):
    encoder = build_vit(dict(embed_dim=32, depth=3, num_heads=2), img_size=16, patch_size=4, in_chans=1)
    with pytest.raises(MimkitError, match=r"layers \[.*\] must be increasing block numbers in 1\.\.3"):
        block_features(encoder, torch.randn(1, 1, 16, 16), "avg", layers)


def test_probe_layers():
    assert probe_layers(None, 12) is None and probe_layers("all", 3) == (1, 2, 3)
    assert probe_layers(9, 12) == (9,) and probe_layers(1, 12) == (1,) and probe_layers(12, 12) == (12,)
    assert probe_layers("9", 12) == (9,)  # a number read back as text
    for outside in (0, 13):
        with pytest.raises(Exception, match="block number in 1..12"):
            probe_layers(outside, 12)


def test_each_blocks_part_holds_that_blocks_train_val_and_test_features():
    features = torch.arange(12.0).reshape(2, 3, 2)  # 2 images, 3 blocks, 2 wide
    labels = torch.tensor([0, 1])
    data = ProbeData(train=(features, labels), val=(features + 100, labels), test=(features + 200, labels),
                     num_classes=2, layers=(1, 2, 3))
    for k, (block, one) in enumerate(data.per_layer()):
        assert block == k + 1 and one.layers == (block,)
        for whole, picked in ((data.train, one.train), (data.val, one.val), (data.test, one.test)):
            assert torch.equal(picked[0], whole[0][:, k]) and picked[1] is whole[1]


@pytest.mark.parametrize("command", ["linprobe", "knn"])
def test_layer_all_and_one_block(mae_run, tmp_path, capsys, command):
    extra = ["--epochs", "3"] if command == "linprobe" else []
    common = ["--data", "synthetic", "--label-fraction", "0.5", "--num-workers", "0", *extra]
    assert main([command, str(mae_run), "--out", str(tmp_path / "all"), "--layer", "all", *common]) == 0
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["layer"] == "all" and [r["layer"] for r in results["by_layer"]] == [1, 2, 3]
    assert all(0 <= r["test_top1"] <= 100 for r in results["by_layer"])
    assert (tmp_path / "all" / results["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in read_metrics(tmp_path / "all")] == [1, 2, 3]
    out = capsys.readouterr().out
    assert "block  2: test top-1" in out and "accuracy_by_depth.png" in out

    # one block alone gives that block's row; the last block gives the default features' number
    assert main([command, str(mae_run), "--out", str(tmp_path / "b2"), "--layer", "2", *common]) == 0
    block2 = json.loads((tmp_path / "b2" / "results.json").read_text())
    assert block2["layer"] == 2 and block2["test_top1"] == pytest.approx(results["by_layer"][1]["test_top1"])
    if command == "linprobe":  # the width of one block's features, not the number of blocks read (3)
        assert results["feature_dim"] == block2["feature_dim"] == 32
    assert main([command, str(mae_run), "--out", str(tmp_path / "final"), *common]) == 0
    final = json.loads((tmp_path / "final" / "results.json").read_text())
    assert final["layer"] is None and final["test_top1"] == pytest.approx(results["by_layer"][2]["test_top1"])
    assert results["test_top1"] == results["by_layer"][2]["test_top1"]


def test_bad_layer_is_one_line_error(mae_run, tmp_path, capsys):
    assert main(["knn", str(mae_run), "--data", "synthetic", "--out", str(tmp_path / "k"), "--layer", "4",
                 "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--layer 4: pass a block number in 1..3 or 'all'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["knn", str(mae_run), "--data", "synthetic", "--out", str(tmp_path / "k"), "--layer", "last"])
