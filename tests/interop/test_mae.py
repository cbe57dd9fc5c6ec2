"""MAE/ViT interop against the real libraries: transformers ViTMAE and ViT, timm VisionTransformer, and the
MAE reference code's published key names. Same image -> same features/logits; round trips bit-identical."""

import argparse
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from transformers import AutoImageProcessor, ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.interop.export import export_model, export_run
from mimkit.interop.importer import _nearest_name, import_checkpoint
from mimkit.interop.mae import OFFICIAL_MAE_MODELS, arch_from_hf_config, model_name_fields
from mimkit.models.vit import sincos_pos_embed_2d
from mimkit.runs import load_run
from tests.conftest import TINY_MAE_KWARGS, perturb

DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
            patch_size=8, num_channels=3, layer_norm_eps=1e-6)
DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
               decoder_intermediate_size=64)
HEADS = {"model": {"kwargs": {"num_heads": 2, "decoder_num_heads": 2}}}  # weights do not show heads

# The MAE reference code's `model` dict for depth 2 and a 1-block decoder (models_mae.py names).
OFFICIAL_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
    *(f"{blocks}.{i}.{name}" for blocks, n in (("blocks", 2), ("decoder_blocks", 1)) for i in range(n)
      for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                   "mlp.fc2.weight", "mlp.fc2.bias")),
}


def tiny_vit(img_size: int = 32, num_classes: int = 0) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=num_classes)


def official_checkpoint(path, with_decoder=True, grid=4, args=None):
    """A reference-layout checkpoint: the encoder is timm's VisionTransformer (as in the reference code);
    ``args`` adds to its training arguments."""
    torch.manual_seed(0)
    vit = tiny_vit(img_size=8 * grid)
    perturb(vit, keep=("pos_embed",)).pos_embed.data.copy_(sincos_pos_embed_2d(32, grid, cls_token=True))
    state = vit.state_dict()
    if with_decoder:
        decoder = perturb(Block(16, 2, 4.0, qkv_bias=True)).state_dict()
        state |= {f"decoder_blocks.0.{k}": v for k, v in decoder.items()}
        state |= {"decoder_embed.weight": torch.randn(16, 32), "decoder_embed.bias": torch.randn(16),
                  "mask_token": torch.randn(1, 1, 16), "decoder_pos_embed": sincos_pos_embed_2d(16, grid, 1),
                  "decoder_norm.weight": torch.rand(16) + 0.5, "decoder_norm.bias": torch.randn(16),
                  "decoder_pred.weight": torch.randn(192, 16) * 0.1, "decoder_pred.bias": torch.randn(192)}
        assert set(state) == OFFICIAL_KEYS
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(lr=1e-4, **(args or {}))}, path)
    return vit, state


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A run imported from a reference-layout checkpoint with its decoder."""
    tmp = tmp_path_factory.mktemp("official")
    vit, state = official_checkpoint(tmp / "checkpoint-799.pth")
    report = import_checkpoint(tmp / "checkpoint-799.pth", "mae", tmp / "run", overrides=HEADS)
    return report.run_dir, vit, state


def features(encoder, x):
    return encoder.forward_features(x)


def test_official_layout_imports_with_its_decoder(mae_run, tmp_path):
    run, vit, official = mae_run
    model, config = load_run(run)
    assert config.model.kwargs["decoder_embed_dim"] == 16 and config.data.img_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(features(model.encoder, x), features(vit, x), rtol=0, atol=0)
    ours = model.state_dict()
    decoder = {k: v for k, v in official.items() if k.startswith(("decoder", "mask_token"))}
    assert all(torch.equal(ours[k], v) for k, v in decoder.items())


# The MAE paper's released models (its Table of ViT sizes; decoder: 512-d, 8 blocks, 16 heads), written out
# here rather than read from the importer's table, so a wrong entry there fails
_PAPER_ENCODERS = {"base": (16, 768, 12, 12), "large": (16, 1024, 24, 16), "huge": (14, 1280, 32, 16)}


@pytest.mark.parametrize("size", _PAPER_ENCODERS)
def test_a_released_model_name_fixes_the_papers_encoder_and_decoder(size):
    patch, width, depth, heads = _PAPER_ENCODERS[size]
    encoder = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
    decoder = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    name = f"vit_{size}_patch{patch}"
    assert model_name_fields(name, OFFICIAL_MAE_MODELS)[0] == encoder
    for pretraining in (f"mae_{name}", f"mae_{name}_dec512d8b"):
        fields, origin = model_name_fields(pretraining, OFFICIAL_MAE_MODELS)
        assert fields == encoder | decoder
        assert set(origin.values()) == {f"args.model {pretraining!r}"}


def test_encoder_only_file_gets_a_fresh_decoder(tmp_path):
    official_checkpoint(tmp_path / "mae_pretrain.pth", with_decoder=False)
    report = import_checkpoint(tmp_path / "mae_pretrain.pth", "mae", tmp_path / "run",
                               overrides={"model": {"kwargs": {"num_heads": 2}}})
    assert any(n.startswith("decoder: not in the checkpoint") for n in report.notes)
    model, _ = load_run(tmp_path / "run")
    assert model(torch.randn(1, 3, 32, 32))[0].isfinite()


def test_a_decoder_missing_one_tensor_is_a_missing_key_not_a_fresh_decoder(tmp_path):
    """Only a part the checkpoint lacks as a whole is freshly initialized; one tensor short is reported."""
    _, state = official_checkpoint(tmp_path / "full.pth")
    del state["decoder_norm.bias"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(MimkitError, match=r"missing 1: decoder_norm.bias"):
        import_checkpoint(tmp_path / "partial.pth", "mae", tmp_path / "run", overrides=HEADS)


@pytest.mark.parametrize("width, name", [(32, "vit_mini"), (200, "vit_tiny"), (768, "vit_base"),
                                         (1200, "vit_huge")])
def test_an_imported_run_is_named_after_the_model_nearest_in_width(width, name):
    assert _nearest_name("mae", width) == name


def test_an_hf_vitmae_config_gives_the_encoders_and_the_decoders_own_heads_and_the_target():
    config = ViTMAEConfig(**DIMS, **DECODER | {"decoder_num_attention_heads": 4}, norm_pix_loss=True,
                          mask_ratio=0.6).to_dict()
    assert arch_from_hf_config(config) == {"num_heads": 2, "decoder_num_heads": 4, "norm_pix_loss": True,
                                           "mask_ratio": 0.6}


def test_heads_the_weights_do_not_show_are_asked_for(tmp_path):
    official_checkpoint(tmp_path / "c.pth")
    with pytest.raises(MimkitError, match="num_heads, decoder_num_heads .* model.kwargs.num_heads=N"):
        import_checkpoint(tmp_path / "c.pth", "mae", tmp_path / "run")


@pytest.mark.parametrize("names", ["saved", "saved-as-bin", "in-memory"])
def test_hf_vitmae_to_mimkit(tmp_path, names):
    torch.manual_seed(0)
    hf = perturb(ViTMAEForPreTraining(ViTMAEConfig(**DIMS, **DECODER, norm_pix_loss=True)),
                 keep=("position_embeddings", "decoder_pos_embed"))
    if names.startswith("saved"):
        hf.save_pretrained(tmp_path / "hf")
        if names == "saved-as-bin":  # an older folder: pickled weights only
            weights = tmp_path / "hf" / "model.safetensors"
            torch.save(load_file(weights), tmp_path / "hf" / "pytorch_model.bin")
            weights.unlink()
    else:  # a state dict taken from a transformers 5 module: its in-memory names
        (tmp_path / "hf").mkdir()
        hf.config.to_json_file(tmp_path / "hf" / "config.json")
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        save_file(state, tmp_path / "hf" / "model.safetensors")
    import_checkpoint(tmp_path / "hf", "hf", tmp_path / "run")
    model, config = load_run(tmp_path / "run")
    assert config.settings.norm_pix_loss and config.model.kwargs["num_heads"] == 2
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        loss, pred, mask = model(x, 0.75, noise)
    # float32 rounding of another order of operations: 6.3e-7 measured on this CPU
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=2e-6)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    assert torch.equal(mask, out.mask)


def test_mimkit_to_hf_and_back_is_bit_identical(mae_run, tmp_path):
    run = mae_run[0]
    export_run(run, "hf", tmp_path / "hf")
    hf = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.layer_norm_eps == 1e-6
    # the published layout (facebook/vit-mae-base): the encoder under `vit.`, the decoder at the top level
    # (transformers' `from_pretrained` would also take it under `vit.`; other readers of the format would not)
    top_level = {key.split(".")[0] for key in load_file(tmp_path / "hf" / "model.safetensors")}
    assert top_level == {"vit", "decoder"}
    model, config = load_run(run)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        loss, pred, _ = model(x, config.settings.mask_ratio, noise)
    # float32 rounding of another order of operations: 4.8e-7 measured on this CPU
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=1e-6)

    import_checkpoint(tmp_path / "hf", "hf", tmp_path / "back")
    back, back_config = load_run(tmp_path / "back")
    assert back_config.data.mean == config.data.mean  # preprocessor_config.json carries the normalization
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")  # what a transformers user prepares with
    assert (processor.resample, processor.size) == (Image.Resampling.BICUBIC, {"height": 32, "width": 32})
    assert list(processor.image_mean) == list(config.data.mean)
    assert list(processor.image_std) == list(config.data.std)
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)


def test_hf_vit_encoder_both_ways(mae_run, tmp_path):
    run = mae_run[0]
    export_run(run, "hf", tmp_path / "vit", encoder_only=True)
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["architectures"] == ["ViTModel"]
    hf = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False).eval()
    model, _ = load_run(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, features(model.encoder, x), rtol=0,
                                   atol=0)

    torch.manual_seed(0)
    other = perturb(ViTModel(ViTConfig(**DIMS), add_pooling_layer=False))
    other.save_pretrained(tmp_path / "other")
    report = import_checkpoint(tmp_path / "other", "hf", tmp_path / "run")
    assert any(n.startswith("decoder: not in") for n in report.notes)
    imported, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(features(imported.encoder, x), other(pixel_values=x).last_hidden_state,
                                   rtol=0, atol=0)


def test_mimkit_to_timm_and_back_is_bit_identical(mae_run, tmp_path):
    run = mae_run[0]
    export_run(run, "timm", tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    strict = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    strict.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    model, config = load_run(run)
    normalization = [list(local.pretrained_cfg[key]) for key in ("mean", "std")]
    assert normalization == [config.data.mean, config.data.std]  # what timm's data config feeds it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for loaded in (strict, local):
            torch.testing.assert_close(loaded(x), model.encoder(x), rtol=0, atol=0)

    import_checkpoint(tmp_path / "timm", "timm", tmp_path / "back")  # heads come from config.json
    back, _ = load_run(tmp_path / "back")
    original, returned = model.encoder.state_dict(), back.encoder.state_dict()
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_a_timm_folder_brings_its_own_normalization(tmp_path):
    """A run on data normalized otherwise than ImageNet (synthetic: mean 0.5, std 0.2), exported to timm and
    imported back, keeps config.json's mean and std rather than timm's defaults."""
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--batch-size", "8", "--set", "data.num_workers=0", *tiny]) == 0
    export_run(tmp_path / "run", "timm", tmp_path / "timm")
    report = import_checkpoint(tmp_path / "timm", "timm", tmp_path / "back")
    data = load_run(tmp_path / "back")[1].data
    assert (data.mean, data.std) == ([0.5] * 3, [0.2] * 3)
    assert report.origin["normalization"] == "config.json pretrained_cfg"


def test_timm_state_dict_file_imports(tmp_path):
    torch.manual_seed(0)
    vit = perturb(tiny_vit())
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    report = import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run",
                               overrides={"model": {"kwargs": {"num_heads": 2}}})
    assert report.origin["normalization"] == "default: timm's"
    model, _ = load_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), vit(x), rtol=0, atol=0)


def test_classifier_head_is_unexpected_unless_allowed(tmp_path):
    vit = tiny_vit(num_classes=10)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(MimkitError, match=r"unexpected 2: head.bias, head.weight.*--allow-mismatch"):
        import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", overrides=HEADS)
    report = import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", allow_mismatch=True,
                               overrides=HEADS)
    assert any("skipped 2 unexpected keys" in n for n in report.notes)


def test_sincos_tables_resize_exactly_and_match_at_the_original_size(mae_run, tmp_path):
    """32 -> 48 recomputes MAE's fixed tables; taken back to 32 the model is the original, bit for bit."""
    run = mae_run[0]
    export_run(run, "hf", tmp_path / "hf")
    report = import_checkpoint(tmp_path / "hf", "hf", tmp_path / "big", img_size=48)
    assert "encoder.pos_embed: sin-cos recomputed from 4x4 to 6x6" in report.notes
    big, config = load_run(tmp_path / "big")
    assert config.data.img_size == 48 and report.origin["img_size"] == "--img-size"
    assert "  set by --img-size: img_size" in report.summary()
    assert torch.equal(big.encoder.pos_embed, sincos_pos_embed_2d(32, 6, cls_token=True))
    assert big(torch.randn(2, 3, 48, 48))[0].isfinite()

    export_run(tmp_path / "big", "hf", tmp_path / "hf48")
    import_checkpoint(tmp_path / "hf48", "hf", tmp_path / "small", img_size=32)
    small, original = load_run(tmp_path / "small")[0].state_dict(), load_run(run)[0].state_dict()
    assert all(torch.equal(small[k], original[k]) for k in original)


def test_learned_table_is_resized_bicubically(tmp_path):
    torch.manual_seed(0)
    vit = perturb(tiny_vit())
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    report = import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", img_size=48,
                               overrides=HEADS)
    assert "encoder.pos_embed: bicubic from 4x4 to 6x6" in report.notes
    model, _ = load_run(tmp_path / "run")
    torch.testing.assert_close(model.encoder.pos_embed, resample_abs_pos_embed(vit.pos_embed, [6, 6]))
    assert model.encoder(torch.randn(1, 3, 48, 48)).isfinite().all()


def test_the_timm_exports_input_size_is_channels_first(mae_run, tmp_path):
    """``pretrained_cfg.input_size`` of the exported ``config.json`` is (C, H, W), timm's order (timm itself
    takes the size from the model's arguments on loading; the hub and other readers take it from here)."""
    export_run(mae_run[0], "timm", tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]


def _hf_vit_folder(folder, **config):
    torch.manual_seed(0)
    vit = perturb(ViTModel(ViTConfig(**(DIMS | config)), add_pooling_layer=False))
    vit.save_pretrained(folder)
    return vit


@pytest.mark.parametrize(("config", "error"), [
    ({"hidden_act": "relu"}, "uses hidden_act 'relu'; mimkit's blocks use gelu"),
    ({"model_type": "swin"}, "holds a 'swin' model; importable: "),
], ids=["activation", "model-type"])
def test_hf_folders_mimkit_cannot_compute_are_refused(tmp_path, config, error):
    _hf_vit_folder(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config))
    with pytest.raises(MimkitError, match=error):
        import_checkpoint(tmp_path / "hf", "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_another_layer_norm_eps_is_reported_and_the_weights_still_load(tmp_path):
    vit = _hf_vit_folder(tmp_path / "hf", layer_norm_eps=1e-12)
    report = import_checkpoint(tmp_path / "hf", "hf", tmp_path / "run")
    assert any(note.startswith("its config has LayerNorm eps 1e-12") for note in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # only the eps differs: 4e-5 measured on these perturbed weights
        torch.testing.assert_close(features(load_run(tmp_path / "run")[0].encoder, x),
                                   vit(pixel_values=x).last_hidden_state, rtol=0, atol=1e-3)


def test_missing_keys_keep_their_fresh_init_when_mismatch_is_allowed(tmp_path):
    vit = perturb(tiny_vit())
    state = {k: v for k, v in vit.state_dict().items() if k != "norm.bias"}
    save_file(state, tmp_path / "vit.safetensors")
    with pytest.raises(MimkitError, match=r"missing 1: encoder.norm.bias"):
        import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", overrides=HEADS)
    report = import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", allow_mismatch=True,
                               overrides=HEADS)
    assert "kept the fresh init of 1 missing keys: encoder.norm.bias" in report.notes
    encoder = load_run(tmp_path / "run")[0].encoder
    assert not encoder.norm.bias.any()  # a LayerNorm's fresh bias
    assert torch.equal(encoder.norm.weight, vit.norm.weight)


@pytest.mark.parametrize(("to", "out", "error"), [
    ("hf", "a-file", "is a file; give a folder"),
    ("onnx", "new", "unknown export target 'onnx'; choose one of: timm, hf"),
], ids=["out-is-a-file", "target"])
def test_an_export_it_cannot_write_is_refused_and_writes_nothing(mae_run, tmp_path, to, out, error):
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(MimkitError, match=error):
        export_run(mae_run[0], to, tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("out", ["exports/timm/run1", "empty"], ids=["nested-new-folder", "existing-empty"])
def test_timms_data_config_of_an_export_is_the_runs_preprocessing(mae_run, tmp_path, out):
    """What `timm.data.resolve_data_config` gives a user of the exported folder (a new nested one, or an empty
    one that exists) is how mimkit fed the model: its size, bicubic resizing, no centre crop, its mean/std."""
    (tmp_path / "empty").mkdir()
    export_run(mae_run[0], "timm", tmp_path / out)
    model = timm.create_model(f"local-dir:{tmp_path / out}", pretrained=True)
    data = load_run(mae_run[0])[1].data
    resolved = timm.data.resolve_data_config(model=model)
    assert resolved == {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                        "crop_mode": "center", "mean": data.mean, "std": data.std}
    # what timm's training scripts and the hub read of it: no classifier stored, positions for one size only
    assert (model.pretrained_cfg["num_classes"], model.pretrained_cfg["fixed_input_size"]) == (0, True)


def test_export_model_called_directly_keeps_a_folders_files_unless_forced(mae_run, tmp_path):
    (tmp_path / "config.json").write_text("mine")
    model, config = load_run(mae_run[0])
    with pytest.raises(MimkitError, match="is not empty; .* --force"):
        export_model(model, config, "timm", tmp_path)
    assert (tmp_path / "config.json").read_text() == "mine"
    export_model(model, config, "timm", tmp_path, force=True)
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 0


def test_an_hf_folders_preprocessor_gives_the_runs_normalization(tmp_path):
    _hf_vit_folder(tmp_path / "hf")
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.2] * 3}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(processor))
    report = import_checkpoint(tmp_path / "hf", "hf", tmp_path / "run")
    assert (report.config.data.mean, report.config.data.std) == ([0.5] * 3, [0.2] * 3)
    assert report.origin["normalization"] == "preprocessor_config.json"


def test_a_grayscale_checkpoint_gets_one_channel_normalization(tmp_path):
    """timm's default normalization has 3 channels; a 1-channel model gets [0.5] rather than a mismatch."""
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    report = import_checkpoint(tmp_path / "vit.safetensors", "timm", tmp_path / "run", overrides=HEADS)
    data = report.config.data
    assert (data.channels, data.mean, data.std) == (1, [0.5], [0.5])


@pytest.mark.parametrize("overrides, mask_ratio, origin", [({}, 0.6, "args.mask_ratio"),
                                                          ({"mae": {"mask_ratio": 0.5}}, 0.5, "--set")])
def test_a_reference_checkpoints_mask_ratio_is_kept_unless_set(tmp_path, overrides, mask_ratio, origin):
    """args.mask_ratio (not the default 0.75) reaches the run; a --set of the section wins, reported so."""
    official_checkpoint(tmp_path / "c.pth", with_decoder=False,
                        args={"mask_ratio": 0.6, "norm_pix_loss": True})
    report = import_checkpoint(tmp_path / "c.pth", "mae", tmp_path / "run",
                               overrides={"model": {"kwargs": {"num_heads": 2}}, **overrides})
    assert report.config.settings.mask_ratio == mask_ratio and report.origin["mask_ratio"] == origin
    assert report.config.settings.norm_pix_loss


def test_import_is_reproducible_and_keeps_settings_beside_the_architecture(tmp_path):
    """The fresh decoder of an encoder-only file comes from train.seed (two imports are identical whatever
    ran before); a --set outside the architecture (data.source) reaches the run's configuration."""
    official_checkpoint(tmp_path / "mae_pretrain.pth", with_decoder=False)
    overrides = {"model": {"kwargs": {"num_heads": 2}}, "data": {"source": "synthetic:32"}}
    states = []
    for name in ("one", "two"):
        torch.rand(7)  # a caller's use of the global generator must not change the import
        report = import_checkpoint(tmp_path / "mae_pretrain.pth", "mae", tmp_path / name, overrides=overrides)
        assert report.config.data.source == "synthetic:32"
        states.append(load_run(tmp_path / name)[0].state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
