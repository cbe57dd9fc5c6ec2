"""Promises the README makes about the command line, one test each: ``--resume``, ``--skip-bad-images``
and its cap, ``--config FILE.yaml``, folders picking the ``_in1k`` recipes, a fine-tuning run resuming,
TensorBoard events, and the import flags (``--img-size``, ``--allow-mismatch``, ``--set``)."""

import sys
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mimkit.cli import build_parser, finetune_config, main, pretrain_config
from mimkit.config import PretrainConfig, load_recipe, recipe_names
from mimkit.eval.config import FinetuneConfig
from mimkit.interop.keymaps import to_foreign
from mimkit.interop.mae import OFFICIAL_MAE
from mimkit.models.mae import MAE
from mimkit.registry import read_config
from mimkit.runs import latest_weights, load_config
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.metrics_log import MetricsLog
from tests.conftest import IMPORT_SETS, TINY

TINY_MAE = ["--set", "model.kwargs.depth=1", "--set", "model.kwargs.decoder_depth=1", "--set",
            "model.kwargs.embed_dim=32", "--set", "model.kwargs.num_heads=2", "--set",
            "model.kwargs.decoder_embed_dim=16", "--set", "model.kwargs.decoder_num_heads=2",
            "--set", "data.num_workers=0", "--batch-size", "4"]


def test_resume_insists_on_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["pretrain", "mae", "--data", "synthetic", "--out", str(run), *TINY_MAE]
    assert main([*common, "--max-steps", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "no checkpoint" in err
    assert Checkpoints(run).latest() is None
    assert main([*common, "--max-steps", "1"]) == 0
    assert main([*common, "--max-steps", "2", "--resume"]) == 0
    assert "resuming from step 1" in "".join(capsys.readouterr())
    assert Checkpoints(run).latest() == 2


def image_folder(folder, good: int, bad: list[str]):
    """``good`` random 16x16 gray PNGs and unreadable files named ``bad``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    for name in bad:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_skip_bad_images_through_the_cli_and_its_cap(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", good=8, bad=["3.png.bad.png", "7.png.bad.png"])
    common = ["pretrain", "mae", "--data", str(folder), "--config", "mae_fmnist", "--max-steps", "1",
              "--set", "model.patch_size=4", *TINY_MAE]
    assert main([*common, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and ".bad.png" in err and "Traceback" not in err

    with pytest.warns(UserWarning, match=r"\.bad\.png") as warned:
        assert main([*common, "--out", str(tmp_path / "skip"), "--skip-bad-images",
                     "--set", "data.max_bad_images=2"]) == 0
    assert len([w for w in warned if ".bad.png" in str(w.message)]) == 2
    assert Checkpoints(tmp_path / "skip").latest() == 1

    with pytest.warns(UserWarning):
        assert main([*common, "--out", str(tmp_path / "cap"), "--skip-bad-images",
                     "--set", "data.max_bad_images=1"]) == 2
    assert "more than max_bad_images=1" in capsys.readouterr().err


def test_config_file_is_the_recipe(tmp_path):
    recipe = {"method": "mae", "data": {"source": "synthetic", "num_workers": 0},
              "model": {"name": "vit_mini", "patch_size": 8,
                        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "decoder_depth": 1,
                                   "decoder_embed_dim": 16, "decoder_num_heads": 2}},
              "mae": {"mask_ratio": 0.5}, "train": {"batch_size": 4}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--config", str(path), "--out", str(run), "--max-steps", "1"]) == 0
    config = load_config(run)
    assert (config.data.source, config.model.patch_size, config.settings.mask_ratio) == ("synthetic", 8, 0.5)
    assert config.model.kwargs["depth"] == 1 and config.train.batch_size == 4
    assert Checkpoints(run).latest() == 1
    assert len(load_file(str(latest_weights(run)))["encoder.pos_embed"][0]) == 1 + (32 // 8) ** 2


@pytest.mark.parametrize("command, method", [("pretrain", "mae"), ("pretrain", "beit"),
                                             ("pretrain", "beitv2"), ("tokenizer train", "dvae"),
                                             ("tokenizer train", "vqkd")])
def test_folders_pick_the_in1k_recipe_and_builtin_data_the_fmnist_one(tmp_path, command, method):
    """A folder gets the method's small-data recipe when it has one (an empty folder is small), else the
    paper's ImageNet one; the built-in data sets get the Fashion-MNIST one."""
    def resolved(data: str) -> PretrainConfig:
        return pretrain_config(build_parser().parse_args([*command.split(), method, "--data", data,
                                                          "--out", str(tmp_path / "run")]))[0]

    def recipe(name: str) -> PretrainConfig:
        return read_config(load_recipe(name) | {"method": method})

    folder = f"{method}_small" if f"{method}_small" in recipe_names() else f"{method}_in1k"
    in1k, fmnist = recipe(folder), recipe(f"{method}_fmnist")
    assert (in1k.model, in1k.optim) != (fmnist.model, fmnist.optim)
    for data, expected in ((str(tmp_path), in1k), ("synthetic", fmnist), ("fashion-mnist:100", fmnist)):
        config = resolved(data)
        assert (config.model, config.optim, config.train) == (expected.model, expected.optim, expected.train)


def test_finetune_on_a_folder_picks_the_in1k_recipe(tmp_path):
    def resolved(data: str) -> FinetuneConfig:
        return finetune_config(build_parser().parse_args(["finetune", "runs/x", "--data", data,
                                                          "--out", str(tmp_path / "ft")]))

    assert resolved(str(tmp_path)).optim.layer_decay == 0.65  # finetune_in1k: MAE's ViT-B recipe
    assert resolved(str(tmp_path)).augment.mixup == 0.8
    assert resolved("fashion-mnist").optim.layer_decay == 0.75 and resolved("synthetic").augment.mixup == 0


@pytest.mark.slow
def test_an_interrupted_fine_tuning_run_resumes_bit_for_bit(mae_run, tmp_path, capsys):
    common = ["finetune", str(mae_run), "--data", "synthetic", "--max-steps", "4", "--batch-size", "16",
              "--set", "data.num_workers=0", "--set", "eval_batch_size=256", "--set", "ema_decay=0.9",
              "--set", "augment.auto_augment=rand-m9-mstd0.5-inc1", "--set", "augment.remode=pixel"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    cut = tmp_path / "cut"
    assert main([*common, "--out", str(cut), "--set", "train.checkpoint_every=2"]) == 0
    checkpoints = Checkpoints(cut)
    checkpoints.weights_path(4).unlink()  # as if stopped after step 2
    checkpoints.state_path(4).unlink()
    (cut / "results.json").unlink()
    capsys.readouterr()
    assert main([*common, "--out", str(cut)]) == 0
    assert "resuming from step 2" in "".join(capsys.readouterr())
    straight = load_file(str(latest_weights(tmp_path / "straight")))
    resumed = load_file(str(latest_weights(cut)))
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_metrics_reach_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    """A stand-in for ``torch.utils.tensorboard`` records what the log sends it."""
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(tmp_path)
    assert written == []  # opened at the first record: a run refused at start-up leaves no folder
    log.write(3, loss=0.5, lr=1e-3)
    log.close()
    assert written == [("dir", str(tmp_path / "tensorboard")), ("loss", 0.5, 3), ("lr", 1e-3, 3), "closed"]


def test_tensorboard_events_from_a_run(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(run), "--max-steps", "2",
                 "--set", "train.log_every=1", *TINY_MAE]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def reference_checkpoint(path, extra: dict | None = None) -> dict:
    """An MAE reference-code checkpoint of `TINY` (32 px, patch 8), plus ``extra`` tensors; its weights."""
    torch.manual_seed(0)
    weights = MAE(**TINY).state_dict()
    state, _ = to_foreign(weights, OFFICIAL_MAE)
    torch.save({"model": state | (extra or {})}, path)
    return weights


def test_import_img_size_resizes_the_position_tables(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run),
                 "--img-size", "64", *IMPORT_SETS]) == 0
    assert "from 4x4 to 8x8" in capsys.readouterr().out
    assert load_config(run).data.img_size == 64
    weights = load_file(str(latest_weights(run)))
    assert weights["encoder.pos_embed"].shape == (1, 1 + 8 * 8, 32)
    assert weights["decoder_pos_embed"].shape == (1, 1 + 8 * 8, 16)


def test_import_allow_mismatch_loads_the_rest(tmp_path, capsys):
    extra = {"head.weight": torch.ones(5, 32)}
    weights = reference_checkpoint(tmp_path / "mae.pth", extra)
    argv = ["import", str(tmp_path / "mae.pth"), "--format", "mae", *IMPORT_SETS]
    assert main([*argv, "--out", str(tmp_path / "strict")]) == 2
    assert "unexpected 1: head.weight" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "run"), "--allow-mismatch"]) == 0
    assert "skipped 1 unexpected keys: head.weight" in capsys.readouterr().out
    imported = load_file(str(latest_weights(tmp_path / "run")))
    for name in ("encoder.blocks.1.mlp.fc2.weight", "decoder_pred.weight", "mask_token"):
        assert torch.equal(imported[name], weights[name]), name


def test_import_refuses_a_folder_that_is_not_a_run_unless_forced(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine\n")
    args = ["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(mine), *IMPORT_SETS]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a mimkit run (it holds config.yaml)" in err and "--force" in err
    assert (mine / "config.yaml").read_text() == "mine\n" and sorted(p.name for p in mine.iterdir()) == [
        "config.yaml"]
    assert main([*args, "--force"]) == 0
    assert load_config(mine).data.source == "synthetic:64"


def test_import_checks_its_image_size(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(out), "--img-size", "0",
                 *IMPORT_SETS]) == 2  # 0 was taken for "not given": a run at the checkpoint's size
    assert capsys.readouterr().err.strip() == "error: --img-size must be at least 1, got 0"
    assert not out.exists()


def test_import_set_configures_the_run(tmp_path):
    reference_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run), *IMPORT_SETS,
                 "--set", "mae.mask_ratio=0.6", "--set", "data.mean=[0.1,0.2,0.3]"]) == 0
    config = load_config(run)
    assert config.model.kwargs["num_heads"] == 2 and config.data.source == "synthetic:64"
    assert config.settings.mask_ratio == 0.6 and config.data.mean == [0.1, 0.2, 0.3]
