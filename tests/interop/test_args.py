"""``mimkit import`` reads the architecture from official-style checkpoints: their ``args`` (argparse
Namespace beside ``model``) and their tensors, and says where each field came from."""

import argparse

import pytest
import torch

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.interop import mae as mae_interop
from mimkit.interop.beit import OFFICIAL_BEITV2, official_beitv2_args
from mimkit.interop.cae import official_cae_args
from mimkit.interop.importer import import_checkpoint
from mimkit.interop.keymaps import to_foreign
from mimkit.interop.mae import OFFICIAL_MAE, official_mae_args
from mimkit.interop.vqkd import official_vqkd_args
from mimkit.methods.data2vec import reference_hints as data2vec_hints
from mimkit.methods.simmim import reference_hints as simmim_hints
from mimkit.models.beit import BEiTv2
from mimkit.models.mae import MAE
from mimkit.runs import load_run
from tests.conftest import perturb

# 8-wide encoder heads and 4-wide decoder heads: no head-width convention gives these.
TINY_MAE = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4)
TEST_NAME = "mae_vit_tiny_test"


def official_mae(path, trained_norm_pix: bool, **args) -> MAE:
    """An MAE reference-style checkpoint of `TINY_MAE` with the given training arguments; the model."""
    torch.manual_seed(0)
    model = perturb(MAE(**TINY_MAE, norm_pix_loss=trained_norm_pix))
    state, _ = to_foreign(model.state_dict(), OFFICIAL_MAE)
    torch.save({"model": state, "epoch": 0, "args": argparse.Namespace(**args)}, path)
    return model


@pytest.fixture
def tiny_name(monkeypatch):
    """A released-style MAE model name whose dims (non-default heads) are those of `TINY_MAE`."""
    dims = {k: v for k, v in TINY_MAE.items() if k not in ("img_size", "in_chans")}
    monkeypatch.setitem(mae_interop.OFFICIAL_MAE_MODELS, TEST_NAME, dims)


def mae_outputs(model, seed: int = 0):
    torch.manual_seed(seed)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, _ = model(x, 0.75, noise)
    return loss, pred


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_heads_from_the_model_name_and_target_from_args(tmp_path, tiny_name, norm_pix_loss):
    original = official_mae(tmp_path / "c.pth", norm_pix_loss, model=TEST_NAME, norm_pix_loss=norm_pix_loss)
    report = import_checkpoint(tmp_path / "c.pth", "mae", tmp_path / "run")
    model, config = load_run(tmp_path / "run")
    assert config.settings.norm_pix_loss is norm_pix_loss and model.norm_pix_loss is norm_pix_loss
    assert (config.model.kwargs["num_heads"], config.model.kwargs["decoder_num_heads"]) == (4, 4)
    assert report.origin["num_heads"] == f"args.model {TEST_NAME!r}"
    assert report.origin["norm_pix_loss"] == "args.norm_pix_loss"
    # the same outputs as the model built with those values; another head count would differ
    for ours, theirs in zip(mae_outputs(model), mae_outputs(original), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    other = MAE(**(TINY_MAE | {"num_heads": 2, "decoder_num_heads": 2}), norm_pix_loss=norm_pix_loss).eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(mae_outputs(other)[1], mae_outputs(original)[1], atol=1e-3)


def test_without_args_the_target_is_the_reference_default(tmp_path):
    """The reference code's ``--norm_pix_loss`` is off unless given: pixel targets, said to be a default."""
    original = official_mae(tmp_path / "c.pth", False)
    report = import_checkpoint(tmp_path / "c.pth", "mae", tmp_path / "run",
                               overrides={"model": {"kwargs": {"num_heads": 4, "decoder_num_heads": 4}}})
    model, config = load_run(tmp_path / "run")
    assert config.settings.norm_pix_loss is False and report.origin["norm_pix_loss"].startswith("default:")
    assert report.origin["num_heads"] == "--set"
    torch.testing.assert_close(mae_outputs(model)[0], mae_outputs(original)[0], rtol=0, atol=1e-5)


def test_a_model_name_the_weights_contradict_is_refused(tmp_path):
    official_mae(tmp_path / "c.pth", False, model="mae_vit_base_patch16")
    with pytest.raises(MimkitError, match="'mae_vit_base_patch16' says embed_dim=768, the weights 32"):
        import_checkpoint(tmp_path / "c.pth", "mae", tmp_path / "run")


def test_released_names_fix_the_heads():
    assert mae_interop.OFFICIAL_MAE_MODELS["mae_vit_huge_patch14"]["num_heads"] == 16
    fields, origin = official_vqkd_args({"model": "vqkd_encoder_base_decoder_3x768x12_clip"})
    assert (fields["num_heads"], fields["decoder_depth"]) == (12, 3)
    assert origin["num_heads"].startswith("args.model")
    assert official_vqkd_args({"model": "vqkd_custom"}) == ({}, {})


@pytest.mark.parametrize("dims, heads, why", [
    ((128, 6, 4.0), 4, "guessed: vit_mini's, the named ViT of this shape"),  # 32-wide heads, not 64
    ((768, 12, 4.0), 12, "guessed: vit_base's, the named ViT of this shape"),
    ((128, 5, 4.0), 2, "guessed: 64-wide heads"),  # another depth: no named ViT, the released convention
    ((128, 6, 2.0), 2, "guessed: 64-wide heads"),  # another MLP ratio
])
def test_an_encoder_of_a_named_vits_shape_gets_that_vits_heads(dims, heads, why):
    guess, origin = mae_interop.encoder_heads(*dims)
    assert guess == heads and origin.startswith(why)


def test_unknown_name_guesses_heads_by_the_released_convention_and_says_so(tmp_path, capsys):
    """A name the reference code does not define, 64- and 32-wide layers: one head each, reported as guessed
    with the --set that changes it (the acceptance's `mae_vit_custom`)."""
    torch.manual_seed(0)
    dims = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=1,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1)
    state, _ = to_foreign(MAE(**dims, norm_pix_loss=False).state_dict(), OFFICIAL_MAE)
    args = argparse.Namespace(model="mae_vit_custom", norm_pix_loss=False, input_size=32)
    torch.save({"model": state, "args": args}, tmp_path / "c.pth")
    assert main(["import", str(tmp_path / "c.pth"), "--format", "mae", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "embed_dim 64, depth 2, num_heads 1" in out and "norm_pix_loss False" in out
    assert "read from args.norm_pix_loss: norm_pix_loss" in out
    assert "guessed num_heads 1 (64-wide heads" in out and "--set model.kwargs.num_heads=" in out
    assert "'mae_vit_custom' is not a released model name" in out
    assert "vit_mini" not in out and "fashion-mnist" not in out


def official_beitv2(path, shared: bool, **args) -> BEiTv2:
    """A BEiT v2 reference-style checkpoint (3 blocks; the aggregation head reads block 1)."""
    torch.manual_seed(0)
    model = perturb(BEiTv2(img_size=32, patch_size=8, vocab_size=24, embed_dim=32, depth=3, num_heads=2,
                           agg_layer=1, shared_lm_head=shared, drop_path_rate=0.0))
    state, _ = to_foreign(model.state_dict(), OFFICIAL_BEITV2)
    if not shared:
        assert {"cls_pt_norm.weight", "cls_pt_lm_head.weight"} <= state.keys()
    torch.save({"model": state, "args": argparse.Namespace(**args)}, path)
    return model


def beitv2_loss(model):
    torch.manual_seed(0)
    x, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.4
    with torch.no_grad():
        return model(x, mask, torch.randint(24, (2, 16)))


@pytest.mark.parametrize("shared", [True, False])
def test_beitv2_head_input_from_early_layers_and_an_unshared_head(tmp_path, shared):
    original = official_beitv2(tmp_path / "b.pth", shared, early_layers=1, head_layers=2,
                               shared_lm_head=shared)
    report = import_checkpoint(tmp_path / "b.pth", "beitv2", tmp_path / "run")
    model, config = load_run(tmp_path / "run")
    kwargs = config.model.kwargs
    assert (kwargs["agg_layer"], kwargs["agg_depth"], kwargs["shared_lm_head"]) == (1, 2, shared)
    assert (model.agg_layer, model.shared_lm_head) == (1, shared)
    assert report.origin["agg_layer"] == "args.early_layers" and report.origin["num_heads"] == "weights"
    assert (report.origin["agg_depth"], report.origin["shared_lm_head"]) == ("args.head_layers",
                                                                            "args.shared_lm_head")
    loss, metrics = beitv2_loss(model)
    expected_loss, expected = beitv2_loss(original)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["agg_loss"], expected["agg_loss"], rtol=0, atol=1e-5)


def test_beitv2_without_args_takes_the_default_block_and_says_so(tmp_path):
    official_beitv2(tmp_path / "b.pth", True)
    report = import_checkpoint(tmp_path / "b.pth", "beitv2", tmp_path / "run")
    _, config = load_run(tmp_path / "run")
    assert config.model.kwargs["agg_layer"] == 2 and report.origin["agg_layer"].startswith("default:")
    assert any(line.startswith("  default agg_layer 2") for line in report.summary())


def test_an_encoder_only_beitv2_file_gets_a_fresh_unshared_aggregation_head(tmp_path):
    """Without the reference head's keys, all of an unshared head (its blocks, norm and codebook layer) is
    freshly initialized, not reported missing."""
    official_beitv2(tmp_path / "b.pth", False, early_layers=1)
    checkpoint = torch.load(tmp_path / "b.pth", weights_only=False)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.startswith("cls_pt_")}
    torch.save(checkpoint, tmp_path / "b.pth")
    report = import_checkpoint(tmp_path / "b.pth", "beitv2", tmp_path / "run",
                               overrides={"model": {"kwargs": {"shared_lm_head": False}}})
    assert "aggregation head: not in the checkpoint; freshly initialized" in report.notes
    assert not load_run(tmp_path / "run")[0].shared_lm_head


# Each training argument (or config key) of a reference checkpoint that mimkit reads, the field it sets and
# a value no default has: written out here, not taken from the readers' own tables, so that an entry
# dropped from a table fails its case.
READERS = {"mae": official_mae_args, "beitv2": official_beitv2_args,
           "cae": lambda args: official_cae_args(args, grid=4),
           "data2vec": lambda args: data2vec_hints(args, depth=12, num_patches=16), "simmim": simmim_hints}
READ_ARGS = [
    ("mae", {"norm_pix_loss": True}, "norm_pix_loss", True), ("mae", {"mask_ratio": 0.6}, "mask_ratio", 0.6),
    ("beitv2", {"early_layers": 5}, "agg_layer", 5), ("beitv2", {"head_layers": 3}, "agg_depth", 3),
    ("beitv2", {"shared_lm_head": False}, "shared_lm_head", False),
    ("cae", {"decoder_num_heads": 5}, "decoder_num_heads", 5),
    ("cae", {"layer_scale_init_value": 0.3}, "layer_scale_init", 0.3),
    ("cae", {"decoder_layer_scale_init_value": 0.2}, "decoder_layer_scale_init", 0.2),
    ("cae", {"drop_path": 0.05}, "drop_path_rate", 0.05),
    ("cae", {"align_loss_weight": 0.7}, "align_weight", 0.7),
    ("cae", {"num_mask_patches": 6}, "mask_ratio", 6 / 16),
    ("data2vec", {"l1_beta": 0.3}, "loss_beta", 0.3),
    ("data2vec", {"ema_decay_init": 0.9}, "teacher_decay_start", 0.9),
    ("data2vec", {"ema_decay": 0.95}, "teacher_decay_end", 0.95),
    ("data2vec", {"ema_start_at": 7}, "teacher_anneal_steps", 7),
    ("data2vec", {"min_mask_patches_per_block": 3}, "min_block", 3),
    ("data2vec", {"layer_scale_init_value": 0.3}, "layer_scale_init", 0.3),
    ("data2vec", {"drop_path": 0.05}, "drop_path_rate", 0.05),
    ("data2vec", {"attn_drop_rate": 0.02}, "attn_drop_rate", 0.02),
    ("data2vec", {"target_layers": "[9, 10, 11]"}, "top_k", 3),
    ("data2vec", {"num_mask_patches": 6}, "mask_ratio", 6 / 16),
    ("data2vec", {"target_instance_norm": True, "no_target_layer_norm_last": True}, "block_norm", "instance"),
    ("data2vec", {"post_target_instance_norm": True}, "target_norm", "instance"),
    ("simmim", {"DATA": {"MASK_RATIO": 0.3}}, "mask_ratio", 0.3),
    ("simmim", {"DATA": {"MASK_PATCH_SIZE": 16}}, "mask_patch_size", 16),
    ("simmim", {"DATA": {"IMG_SIZE": 96}}, "img_size", 96),
    ("simmim", {"MODEL": {"DROP_PATH_RATE": 0.05}}, "drop_path_rate", 0.05),
    ("simmim", {"MODEL": {"VIT": {"NUM_HEADS": 5}}}, "num_heads", 5),
    ("simmim", {"MODEL": {"VIT": {"INIT_VALUES": 0.3}}}, "layer_scale_init", 0.3),
    ("simmim", {"MODEL": {"VIT": {"PATCH_SIZE": 8}}}, "patch_size", 8),
]


@pytest.mark.parametrize("method, args, field, value", READ_ARGS,
                         ids=[f"{method}.{field}" for method, _, field, _ in READ_ARGS])
def test_each_argument_a_reference_checkpoint_carries_reaches_its_field(method, args, field, value):
    fields, origin = READERS[method](args)
    assert fields[field] == (pytest.approx(value) if isinstance(value, float) else value)
    assert field in origin
