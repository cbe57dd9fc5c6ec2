"""MaskDistill through the command line, an MAE run as its teacher: pretraining and resuming, the teacher's
width in the run, the cosine picture, exports to timm and transformers, every evaluation command on its runs,
one-line errors for bad settings and a missing teacher, and its recipes."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.beit import Beit
from transformers import BeitForMaskedImageModeling, BeitModel

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.methods.maskdistill import patch_map
from mimkit.methods.vqkd import _load_teacher, teacher_of
from mimkit.registry import method_of, read_config
from mimkit.runs import latest_weights, load_encoder, load_run
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import every_evaluation_command, grid_size

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY = [arg for kv in ("depth=2", "embed_dim=32", "num_heads=2") for arg in ("--set", f"model.kwargs.{kv}")]
QUICK = [*COMMON, *TINY, "--set", "model.patch_size=8"]  # a 4x4 grid; the MAE teacher's 8x8 is resized to it


def maskdistill(out, teacher, *extra) -> int:
    return main(["pretrain", "maskdistill", "--out", str(out), "--teacher", str(teacher), *QUICK, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, mae_run):
    out = tmp_path_factory.mktemp("maskdistill") / "run"
    assert maskdistill(out, mae_run, "--max-steps", "2") == 0
    return out


def test_a_run_regresses_its_teachers_features_seen_on_the_unmasked_image(run, mae_run):
    model, config = load_run(run)
    teacher_width = load_encoder(mae_run).model.embed_dim
    assert config.settings.teacher == str(mae_run) and config.settings.teacher_dim == teacher_width == 32
    assert model.lm_head.out_features == teacher_width
    view, loss_fn = method_of("maskdistill").build_task(config, model)
    samples = [view(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)) for _ in range(2)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    assert torch.equal(batch["image"], batch["tokenizer_image"])  # the teacher's view is the ViT's image
    with torch.no_grad():
        loss, _ = loss_fn(model, batch)
        expected, _ = model(batch["image"], batch["mask"], teacher_of(config)(batch["image"]))
    torch.testing.assert_close(loss, expected)


def test_loading_the_teacher_leaves_the_runs_random_stream_alone(tmp_path, mae_run):
    """The first run of a process loads the teacher, the second takes it from the cache: both start from
    the same weights and train to the same ones."""
    _load_teacher.cache_clear()
    assert maskdistill(tmp_path / "loads", mae_run, "--max-steps", "1") == 0
    assert maskdistill(tmp_path / "cached", mae_run, "--max-steps", "1") == 0
    loaded, cached = (load_file(latest_weights(tmp_path / name)) for name in ("loads", "cached"))
    assert all(torch.equal(loaded[key], cached[key]) for key in loaded)


def test_pretrains_and_resumes_bit_for_bit(tmp_path, mae_run):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert maskdistill(straight, mae_run, "--max-steps", "4") == 0
    assert maskdistill(resumed, mae_run, "--max-steps", "4", "--set", "train.checkpoint_every=2") == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    assert maskdistill(resumed, mae_run, "--max-steps", "4") == 0
    a, b = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_visualize_draws_the_image_the_masked_input_and_the_cosine_map(run, tmp_path):
    assert main(["visualize", str(run), "--out", str(tmp_path / "cos.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "cos.png").size == grid_size(3, 2, 32)


def test_the_pictures_cosine_is_the_prediction_against_the_normalized_target(run):
    model, config = load_run(run)
    shown = torch.randn(2, 3, 32, 32)
    panels = method_of("maskdistill").pictures(model, config, lambda size, mean, std: shown,
                                               torch.Generator().manual_seed(0))
    hidden = panels["masked"][:, 0, ::8, ::8] != shown[:, 0, ::8, ::8]  # [2, 4, 4]: the patches it masked
    with torch.no_grad():
        x, _ = model.forward_features(shown, hidden)
        pred = model.forward_head(x, torch.ones_like(hidden)).view(2, 16, -1)
        target = torch.nn.functional.layer_norm(teacher_of(config)(shown), (32,), eps=1e-6)
    cosine = torch.nn.functional.cosine_similarity(pred, target, dim=-1).clamp(0, 1)
    drawn = panels["cosine"][:, 0, ::8, ::8].flatten(1) * config.data.std[0] + config.data.mean[0]
    torch.testing.assert_close(drawn, cosine)


def test_the_cosine_map_shades_each_patch_by_its_value():
    values = torch.tensor([[0.0, 1.0, 0.5, 1.0]])  # a 2x2 grid
    drawn = patch_map(values, 4, 3, [0.5] * 3, [0.25] * 3) * 0.25 + 0.5  # back to [0, 1]
    assert drawn.shape == (1, 3, 8, 8) and torch.equal(drawn[0, 0], drawn[0, 2])
    assert drawn[0, 0, :4, :4].max() == 0 and drawn[0, 0, :4, 4:].min() == 1
    assert torch.allclose(drawn[0, 0, 4:, :4], torch.full((4, 4), 0.5))


def test_exports_load_in_timm_and_transformers_with_the_head(run, tmp_path):
    model, _ = load_run(run)
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_model = Beit(**json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--to", "hf", "--encoder-only", "--out", str(tmp_path / "enc")]) == 0
    hf = BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf").eval()
    encoder_only = BeitModel.from_pretrained(tmp_path / "enc").eval()
    imgs, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.5
    with torch.no_grad():
        ours, _ = model.forward_features(imgs, mask)
        everywhere = torch.ones_like(mask)
        # transformers' masked-image-modeling "logits" are MaskDistill's predicted teacher features
        predicted = model.forward_head(ours, everywhere).view(2, 16, -1)
        torch.testing.assert_close(hf(imgs, bool_masked_pos=mask).logits, predicted, atol=1e-5, rtol=1e-4)
        clean, _ = model.forward_features(imgs, ~everywhere)
        torch.testing.assert_close(timm_model.forward_features(imgs), clean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder_only(imgs).last_hidden_state, clean, atol=1e-5, rtol=1e-4)


def test_every_evaluation_command_takes_a_maskdistill_run(run, tmp_path):
    every_evaluation_command(run, tmp_path)
    layers = json.loads((tmp_path / "knn" / "results.json").read_text())["by_layer"]
    assert [r["layer"] for r in layers] == [1, 2]  # knn --layer all: a row per block


@pytest.mark.parametrize("extra, message", [
    (["--set", "maskdistill.mask_ratio=1.0"], "config 'maskdistill.mask_ratio' must be in (0, 1), got 1.0"),
    (["--set", "maskdistill.mask_ratio=0.0"], "config 'maskdistill.mask_ratio' must be in (0, 1), got 0.0"),
    (["--set", "maskdistill.loss=l2"], "'maskdistill.loss' must be one of smooth_l1, cosine, got 'l2'"),
    (["--set", "maskdistill.smooth_l1_beta=-1"], "config 'maskdistill.smooth_l1_beta' must be at least 0"),
    (["--set", "maskdistill.min_block=9"], "maskdistill.min_block=9 is more than the 6 patches masked"),
    (["--set", "maskdistill.crop_scale=[0.5,2.0]"], "maskdistill.crop_scale' must be 0 < low <= high <= 1"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, mae_run, extra, message):
    assert maskdistill(tmp_path / "bad", mae_run, "--max-steps", "1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_without_a_teacher_the_error_says_how_to_get_one(tmp_path, capsys):
    assert main(["pretrain", "maskdistill", "--out", str(tmp_path / "run"), *QUICK, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: maskdistill training needs a teacher: --teacher") and "\n" not in err
    assert "mimkit pretrain mae --data ... --out runs/mae, then --teacher runs/mae" in err


def test_recipes_read_and_the_in1k_one_is_the_papers_setting():
    fmnist = read_config(load_recipe("maskdistill_fmnist"))
    assert (fmnist.model.name, fmnist.model.patch_size, fmnist.settings.mask_ratio) == ("vit_mini", 4, 0.4)
    assert fmnist.model.name == read_config(load_recipe("mae_fmnist")).model.name  # the MAE teacher's ViT
    in1k = read_config(load_recipe("maskdistill_in1k"))
    s = in1k.settings
    assert (in1k.model.name, in1k.model.patch_size, in1k.data.img_size) == ("vit_base", 16, 224)
    assert (s.loss, s.target_norm, s.min_block, s.crop_scale) == ("smooth_l1", True, 16, (0.2, 1.0))
    assert round(196 * s.mask_ratio) == 78 and in1k.model.kwargs["shared_rel_pos_bias"]
    assert (in1k.optim.base_lr * 2048 / 256, in1k.optim.clip_grad, in1k.train.epochs) == (1.5e-3, 3.0, 300)


def test_the_student_is_built_for_the_datas_channels_and_size():
    """A one-channel 24 px run's student embeds one channel at 24 px, its head as wide as the teacher."""
    config = read_config({"method": "maskdistill", "maskdistill": {"teacher_dim": 20},
                          "data": {"source": "synthetic:8", "img_size": 24, "channels": 1, "mean": [0.5],
                                   "std": [0.5]},
                          "model": {"name": "vit_mini", "patch_size": 8,
                                    "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}})
    model = method_of("maskdistill").build_model(config)
    embed = model.encoder.patch_embed
    assert (embed.proj.in_channels, embed.img_size, model.lm_head.out_features) == (1, (24, 24), 20)


@pytest.mark.parametrize("target_norm, target", [(True, "normalized features"), (False, "features")])
def test_the_start_up_summary_tells_the_masking_the_loss_and_the_teacher(target_norm, target):
    config = read_config({"method": "maskdistill", "maskdistill": {
        "teacher": "runs/mae", "teacher_dim": 48, "loss": "cosine", "target_norm": target_norm,
        "mask_ratio": 0.3}})
    assert method_of("maskdistill").describe(config) == (
        f", 30% masked block-wise, cosine to the 48-d {target} of teacher 'runs/mae'")
