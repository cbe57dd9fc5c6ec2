"""SimMIM through the command line: pretraining and resuming, pictures, exports to timm and transformers, the
evaluation commands, one-line refusals of bad settings, and the reference code's checkpoints imported
(built here from a tiny model in the reference code's key names and config, without yacs)."""

import json
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.beit import Beit
from transformers import BeitModel

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.interop.hf import write_hf_folder
from mimkit.interop.importer import resolve_arch
from mimkit.interop.keymaps import to_foreign
from mimkit.methods.simmim import OFFICIAL_SIMMIM, SimMIMView, hf_export, read_official_simmim
from mimkit.models.simmim import SimMIM
from mimkit.registry import method_of
from mimkit.runs import latest_weights, load_run
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import every_evaluation_command, grid_size, perturb

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.embed_dim=32",
        "--set", "model.kwargs.num_heads=2", "--set", "simmim.mask_patch_size=8"]  # 4x4 grid of 2x2 patches


def pretrain(out, *extra) -> int:
    return main(["pretrain", "simmim", "--out", str(out), *COMMON, *TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("simmim") / "run"
    assert pretrain(out, "--max-steps", "2") == 0
    return out


def test_view_masks_ceil_ratio_of_mask_patches_per_sample():
    view = SimMIMView(32, [0.5] * 3, [0.5] * 3, grid=4, scale=2, num_masked=10)
    torch.manual_seed(0)
    sample = view(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (64,)
    assert sample["mask"].sum() == 10 * 4
    crop = view.transform.transforms[0]  # the reference's aspect ratios
    assert crop.ratio == (3 / 4, 4 / 3) and crop.scale == (0.67, 1.0) and crop.antialias


def test_pretrains_and_resumes_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain(straight, "--max-steps", "4") == 0
    assert pretrain(resumed, "--max-steps", "4", "--set", "train.checkpoint_every=2") == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    assert pretrain(resumed, "--max-steps", "4") == 0
    a, b = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert Checkpoints(resumed).latest() == 4 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_visualize_draws_masked_input_prediction_and_original(run, tmp_path, capsys):
    assert main(["visualize", str(run), "--out", str(tmp_path / "simmim.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "simmim.png").size == grid_size(4, 2, 32)


def test_the_pictures_hide_the_masked_squares_and_paste_the_prediction_into_them(run):
    model, config = load_run(run)
    torch.manual_seed(0)
    shown = torch.randn(2, 3, 32, 32)
    panels = method_of("simmim").pictures(model, config, lambda size, mean, std: shown,
                                          torch.Generator().manual_seed(0))
    hidden = (panels["masked input"] == 0).all(1, keepdim=True).float()  # [2, 1, 32, 32]
    assert 0 < hidden.mean() < 1 and torch.equal(panels["original"], shown)
    torch.testing.assert_close(panels["masked input"], shown * (1 - hidden))
    with torch.no_grad():
        _, pred = model(shown, hidden[:, 0, ::4, ::4].bool())
    torch.testing.assert_close(panels["prediction"], pred)
    torch.testing.assert_close(panels["pasted"], shown * (1 - hidden) + pred * hidden)


def test_the_start_up_summary_counts_the_hidden_squares(run):
    _, config = load_run(run)
    assert method_of("simmim").describe(config) == ", 10 of 4x4 masked in 8 px squares"  # ceil(0.6 * 16)


def test_exports_load_in_timm_and_transformers(run, tmp_path):
    model, _ = load_run(run)
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_model = Beit(**json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--to", "hf", "--encoder-only", "--out", str(tmp_path / "enc")]) == 0
    hf, loading = BeitModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    encoder_only, encoder_loading = BeitModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not loading["missing_keys"] and not encoder_loading["missing_keys"]  # every weight is ours
    hf, encoder_only = hf.eval(), encoder_only.eval()
    assert encoder_only.embeddings.mask_token is None
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(imgs), model.encoder.forward_features(imgs))
        # the transformers BeitModel with bool_masked_pos is SimMIM's encoder, mask token included
        torch.testing.assert_close(hf(imgs, bool_masked_pos=mask).last_hidden_state,
                                   model.forward_encoder(imgs, mask), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder_only(imgs).last_hidden_state, timm_model.forward_features(imgs),
                                   atol=1e-5, rtol=1e-4)


def test_an_encoder_with_a_bias_table_per_block_exports_to_transformers_computing_the_same(tmp_path):
    model = perturb(SimMIM(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                           shared_rel_pos_bias=False)).eval()
    write_hf_folder(tmp_path, *hf_export(model, None, encoder_only=False), image_processor={})
    hf, loading = BeitModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading.values()), loading
    imgs, mask = torch.randn(2, 1, 16, 16), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        theirs = hf.eval()(imgs, bool_masked_pos=mask).last_hidden_state
        assert (model.forward_encoder(imgs, mask) - theirs).abs().max() <= 1e-5


def test_evaluation_commands_take_a_simmim_run(run, tmp_path):
    every_evaluation_command(run, tmp_path)


@pytest.mark.parametrize("setting, message", [
    ("simmim.mask_ratio=1.0", "simmim.mask_ratio=1.0 must be in (0, 1)"),
    ("simmim.mask_ratio=0", "simmim.mask_ratio=0.0 must be in (0, 1)"),
    ("simmim.mask_patch_size=6", "simmim.mask_patch_size=6 is not a multiple of the patch size 4"),
    ("simmim.mask_patch_size=12", "simmim.mask_patch_size=12 does not tile 32 px images"),
    ("simmim.crop_scale=[0.9,0.5]", "'simmim.crop_scale' must be 0 < low <= high <= 1, got [0.9, 0.5]"),
])
def test_bad_setting_is_a_one_line_error(setting, message, tmp_path, capsys):
    assert pretrain(tmp_path / "bad", "--max-steps", "1", "--set", setting) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


@pytest.fixture
def fake_yacs(monkeypatch):
    """A ``yacs.config.CfgNode`` (a dict subclass with attributes, as yacs') to pickle reference configs with;
    the reading side never imports it."""

    class CfgNode(dict):
        pass

    module = types.ModuleType("yacs.config")
    CfgNode.__module__, CfgNode.__qualname__ = module.__name__, "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)

    def node(**items):
        made = CfgNode(items)
        made.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__new_allowed__": False})
        return made

    return node


def reference_checkpoint(path, node=None, **vit):
    """A tiny SimMIM saved as ``main_simmim.py`` saves one: its state dict in the reference names (with the
    derived relative position index) under "model", and its yacs config."""
    model = perturb(SimMIM(img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                           drop_path_rate=0.0))
    state, left = to_foreign(model.state_dict(), OFFICIAL_SIMMIM)
    assert left == []
    # the reference code's names, written out (the map under test must not make its own fixture)
    assert {"encoder.cls_token", "encoder.mask_token", "encoder.patch_embed.proj.weight",
            "encoder.blocks.1.attn.qkv.weight", "encoder.rel_pos_bias.relative_position_bias_table",
            "decoder.0.weight"} <= state.keys()
    state["encoder.rel_pos_bias.relative_position_index"] = model.encoder.rel_pos_bias.relative_position_index
    saved = {"model": state, "optimizer": {}, "epoch": 799}
    if node:
        saved["config"] = node(
            DATA=node(IMG_SIZE=32, MASK_PATCH_SIZE=8, MASK_RATIO=0.5),
            MODEL=node(TYPE=vit.pop("TYPE", "vit"), DROP_PATH_RATE=0.0,
                       VIT=node(**{"PATCH_SIZE": 4, "NUM_HEADS": 2, "INIT_VALUES": 0.1, "USE_APE": False}
                                | vit)))
    torch.save(saved, path)
    return model


def test_reference_checkpoint_imports_from_its_weights_and_config(fake_yacs, tmp_path, capsys):
    model = reference_checkpoint(tmp_path / "ckpt_epoch_799.pth", fake_yacs)
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "ckpt_epoch_799.pth"), "--format", "simmim", "--out", str(out),
                 "--set", "data.source=synthetic:64", "--set", "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "read from config DATA.MASK_RATIO: mask_ratio" in printed and "guessed" not in printed
    imported, config = load_run(out)
    assert (config.settings.mask_ratio, config.settings.mask_patch_size) == (0.5, 8)
    assert config.model.kwargs["num_heads"] == 2 and config.data.mean == [0.485, 0.456, 0.406]
    theirs, ours = model.state_dict(), imported.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert pretrain(out, "--max-steps", "1") == 0  # continues from the imported weights


def test_reference_config_gives_the_stochastic_depth_and_the_layer_scales_start(fake_yacs, tmp_path):
    reference_checkpoint(tmp_path / "ckpt.pth", fake_yacs, INIT_VALUES=0.2)  # neither is SimMIM's default
    hints = read_official_simmim(tmp_path / "ckpt.pth").hints
    assert (hints["drop_path_rate"], hints["layer_scale_init"]) == (0.0, 0.2)


def test_reference_weights_without_config_get_reported_defaults(tmp_path, capsys):
    reference_checkpoint(tmp_path / "bare.pth")
    assert main(["import", str(tmp_path / "bare.pth"), "--format", "simmim", "--out",
                 str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "default mask_ratio 0.6 (the reference config's); if not, --set simmim.mask_ratio=..." in printed


@pytest.mark.parametrize("vit, message", [
    ({"TYPE": "swin"}, "a SimMIM swin checkpoint: mimkit's SimMIM is the ViT one"),
    ({"NUM_HEADS": 4}, "config MODEL.VIT.NUM_HEADS says num_heads=4, the weights 2"),
    ({"USE_APE": True}, r"absolute position embeddings \(MODEL.VIT.USE_APE\)"),
])
def test_reference_checkpoints_mimkit_cannot_hold_are_refused(fake_yacs, tmp_path, vit, message):
    reference_checkpoint(tmp_path / "ckpt.pth", fake_yacs, **vit)
    with pytest.raises(MimkitError, match=message):
        resolve_arch(read_official_simmim(tmp_path / "ckpt.pth"))


def test_reference_weights_in_a_safetensors_file_import(tmp_path):
    """The reference layout saved as ``.safetensors`` (no config, no pickle): the same weights."""
    model = reference_checkpoint(tmp_path / "ckpt.pth")
    save_file(torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"], tmp_path / "simmim.safetensors")
    assert main(["import", str(tmp_path / "simmim.safetensors"), "--format", "simmim", "--out",
                 str(tmp_path / "run")]) == 0
    imported, _ = load_run(tmp_path / "run")
    theirs, ours = model.state_dict(), imported.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("saved", [{"epoch": 799}, {"model": {"encoder.cls_token": [1.0]}}],
                         ids=["no model", "not tensors"])
def test_a_file_without_a_state_dict_is_a_one_line_error(tmp_path, saved):
    torch.save(saved, tmp_path / "ckpt.pth")
    with pytest.raises(MimkitError, match="holds no SimMIM state dict"):
        read_official_simmim(tmp_path / "ckpt.pth")
