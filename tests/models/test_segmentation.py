"""The segmentation model: pyramid and head shapes, feature blocks, and parity with transformers'
BeitForSemanticSegmentation on copied weights."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from transformers import BeitForSemanticSegmentation

from mimkit.errors import MimkitError
from mimkit.interop.segmentation import export_segmenter, hf_out_indices
from mimkit.models.beit import BEiT
from mimkit.models.segmentation import (
    Segmenter,
    feature_blocks,
    segmentation_encoder,
    vit_with_relative_positions,
)
from mimkit.models.vit import build_vit, sincos_pos_embed_2d
from mimkit.train.optim import param_groups


def tiny_vit(depth: int = 2):
    return build_vit("vit_tiny", 32, 8, 1, depth=depth, embed_dim=32, num_heads=2)


def tiny_beit(depth: int = 2, channels: int = 1):
    return BEiT(32, 8, channels, vocab_size=16, embed_dim=32, depth=depth, num_heads=2).encoder


def test_feature_blocks_are_the_papers_scaled():
    assert feature_blocks(12) == [3, 5, 7, 11]
    assert feature_blocks(24) == [7, 11, 15, 23]
    assert feature_blocks(6) == [1, 2, 3, 5]
    assert feature_blocks(2) == [0, 0, 0, 1]
    assert feature_blocks(4) == [0, 1, 2, 3]  # 1.33, 2, 2.67, 4 blocks rounded to the nearest


@pytest.mark.parametrize("make", [tiny_vit, tiny_beit], ids=["vit", "beit"])
def test_pyramid_and_head_shapes_for_a_depth_2_model(make):
    model = Segmenter(segmentation_encoder(make(), 64), num_classes=5)
    x = torch.randn(2, 1, 64, 64)
    levels = model.fpn(model.forward_features(x))  # patch grid 8x8
    shapes = [tuple(t.shape) for t in levels]
    assert shapes == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    decode, aux = model.forward_logits(x)
    assert decode.shape == (2, 5, 32, 32) and aux.shape == (2, 5, 8, 8)
    assert model(x).shape == (2, 5, 64, 64)
    linear = Segmenter(segmentation_encoder(make(), 32), num_classes=5, head="linear")
    assert [tuple(t.shape) for t in linear.forward_logits(torch.randn(2, 1, 32, 32))] == [(2, 5, 4, 4)]



@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_the_logits_reach_the_image_size_bilinearly_with_corners_unaligned(head):
    """mmsegmentation's ``resize(..., align_corners=False)`` and transformers' post-processing: the pixel
    centres of the logits' grid and the image's line up, not their corner pixels."""
    torch.manual_seed(0)
    model = Segmenter(segmentation_encoder(tiny_vit(), 32), 3, head=head).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        small = model.forward_logits(x)[0]
        expected = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
        assert not torch.allclose(expected, F.interpolate(small, size=(32, 32), mode="bilinear",
                                                          align_corners=True), atol=1e-3)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

def test_features_are_the_raw_outputs_of_the_chosen_blocks():
    encoder = segmentation_encoder(tiny_vit(depth=3), 32)
    model = Segmenter(encoder, 3, blocks=[0, 2, 1, 2]).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        tokens = encoder.pos_drop(encoder._pos_embed(encoder.patch_embed(x)))
        outs = []
        for block in encoder.blocks:
            tokens = block(tokens)
            outs.append(tokens[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4))
        got = model.forward_features(x)
    for g, b in zip(got, [0, 2, 1, 2], strict=True):
        torch.testing.assert_close(g, outs[b])


def test_segmentation_encoder_has_no_head_or_final_norm_and_resizes_its_tables():
    mae_vit = tiny_vit()
    with torch.no_grad():
        mae_vit.pos_embed.copy_(sincos_pos_embed_2d(32, 4, cls_token=True))
    encoder = segmentation_encoder(mae_vit, 64, drop_path=0.2)
    assert isinstance(encoder.norm, torch.nn.Identity) and isinstance(encoder.head, torch.nn.Identity)
    torch.testing.assert_close(encoder.pos_embed, sincos_pos_embed_2d(32, 8, cls_token=True))  # recomputed
    assert encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    beit = segmentation_encoder(tiny_beit(), 64)
    assert beit.blocks[0].attn.relative_position_bias_table.shape[0] == 15 * 15 + 3
    assert beit(torch.randn(1, 1, 64, 64)).shape == (1, 32)



def test_resizing_a_beit_encoder_says_nothing():
    """timm's own resampling of BEiT's tables warns (torch deprecations) and is replaced anyway: a segment
    run's log shows none of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = segmentation_encoder(tiny_beit(), 64)
    assert encoder.patch_embed.grid_size == (8, 8)


def test_a_classifiers_head_is_dropped_and_a_module_that_is_no_vit_refused():
    """A fine-tuned classifier given as the encoder loses its head (no weights that no loss reaches: DDP
    refuses those); a module that is no timm ViT is a one-line error, not an AttributeError later."""
    classifier = tiny_vit()
    classifier.reset_classifier(10)
    encoder = segmentation_encoder(classifier, 32)
    assert isinstance(encoder.head, torch.nn.Identity) and encoder.num_classes == 0
    assert not any(name.startswith("head.") for name, _ in encoder.named_parameters())
    with pytest.raises(MimkitError, match=r"^Linear is not a timm ViT-style encoder \(it lacks blocks, "):
        segmentation_encoder(torch.nn.Linear(2, 2), 32)

def test_an_encoder_with_register_tokens_keeps_their_position_rows_when_resized():
    vit = build_vit("vit_tiny", 32, 8, 1, depth=2, embed_dim=32, num_heads=2, reg_tokens=2)
    torch.nn.init.normal_(vit.pos_embed)  # a learned table: [CLS], 2 registers, 4x4 patches
    encoder = segmentation_encoder(vit, 64)
    assert encoder.pos_embed.shape == (1, 3 + 8 * 8, 32)
    torch.testing.assert_close(encoder.pos_embed[:, :3], vit.pos_embed[:, :3])
    assert Segmenter(encoder, 3).eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_segmentation_encoder_is_a_trainable_copy_leaving_the_given_encoder_as_it_was():
    """The pretrained encoder given (frozen, as a probe or a teacher keeps one) is left untouched: its
    head, final norm, input size and frozen weights; the copy trains every weight."""
    given = tiny_vit().requires_grad_(False)
    before = {k: v.clone() for k, v in given.state_dict().items()}
    encoder = segmentation_encoder(given, 64, drop_path=0.2)
    assert all(p.requires_grad for p in encoder.parameters())
    assert not any(p.requires_grad for p in given.parameters())
    assert not isinstance(given.norm, torch.nn.Identity) and given.patch_embed.img_size == (32, 32)
    assert given.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in given.state_dict().items())


def test_the_heads_drop_channels_at_the_papers_rate_while_training():
    model = Segmenter(segmentation_encoder(tiny_vit(), 32), 3)
    assert model.decode_head.dropout.p == model.auxiliary_head.dropout.p == 0.1


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    model = Segmenter(segmentation_encoder(tiny_vit(), 32, drop_path=0.1), 3, head="linear",
                      freeze_encoder=True).train()
    assert not model.encoder.training and model.decode_head.training
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decode_head.classifier.weight.grad is not None


def test_bad_model_options_are_one_line_errors():
    with pytest.raises(MimkitError, match="^segmentation head 'fcn' is not one of upernet, linear$"):
        Segmenter(segmentation_encoder(tiny_vit(), 32), 3, head="fcn")
    with pytest.raises(MimkitError, match="4 blocks"):
        Segmenter(segmentation_encoder(tiny_vit(), 32), 3, blocks=[0, 1, 5, 1])


def test_the_blocks_read_end_at_the_last_one_and_two_classes_is_the_fewest():
    encoder = segmentation_encoder(tiny_vit(), 32)  # blocks 0 and 1
    with pytest.raises(MimkitError, match=r"^UperNet reads 4 blocks in 0\.\.1, got \[0, 1, 2, 1\]$"):
        Segmenter(encoder, 3, blocks=[0, 1, 2, 1])
    with pytest.raises(MimkitError, match="^segmentation needs at least 2 classes, got 1$"):
        Segmenter(encoder, 1)
    binary = Segmenter(encoder, 2, blocks=[0, 1, 1, 1]).eval()
    assert binary(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def _randomize_batch_norms(model):
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()


@pytest.mark.parametrize("shared", [False, True], ids=["per-block-bias", "shared-bias"])
def test_upernet_matches_transformers_beit_for_semantic_segmentation(tmp_path, shared):
    torch.manual_seed(0)
    beit = BEiT(32, 8, 3, vocab_size=16, embed_dim=32, depth=6, num_heads=2,
                shared_rel_pos_bias=shared).encoder
    model = Segmenter(segmentation_encoder(beit, 32), 5, blocks=[0, 1, 2, 4]).eval()
    _randomize_batch_norms(model)
    classes = ["background", "cat", "dog", "bird", "boat"]
    export_segmenter(model, 32, [0.5] * 3, [0.5] * 3, classes, 0.25, tmp_path / "hf")
    hf, info = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the encoder under `beit.`, the heads at the top level (from_pretrained would also take them under it)
    top_level = {key.split(".")[0] for key in load_file(tmp_path / "hf" / "model.safetensors")}
    assert top_level == {"beit", "fpn", "decode_head", "auxiliary_head"}
    assert hf.config.id2label == dict(enumerate(classes)) and hf.config.label2id["dog"] == 2
    assert hf.config.auxiliary_loss_weight == 0.25  # seg.aux_weight, for training on
    hf.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=x, output_hidden_states=True)
        ours_decode, ours_aux = model.forward_logits(x)
        their_aux = hf.auxiliary_head(hf.fpn(tuple(
            theirs.hidden_states[i - 1][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
            for i in hf.config.out_indices)))
    torch.testing.assert_close(ours_decode, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_aux, their_aux, rtol=0, atol=1e-5)


def test_blocks_transformers_cannot_read_are_refused_on_export():
    assert hf_out_indices([3, 5, 7, 9], 12) == [5, 7, 9, 11]
    assert hf_out_indices([3, 5, 7, 10], 12) == [5, 7, 9, 12]  # block 10 of 12: the deepest it reads
    with pytest.raises(MimkitError, match="seg.blocks"):
        hf_out_indices([3, 5, 7, 11], 12)


def test_blocks_past_the_last_one_read_get_no_gradient():
    model = Segmenter(segmentation_encoder(tiny_vit(depth=4), 32), 3, blocks=[0, 0, 1, 1])
    assert not any(p.requires_grad for p in model.encoder.blocks[2:].parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[:2].parameters())


def _random_weights(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    for parameter in module.parameters():
        parameter.data.normal_(0, 0.2)  # zero biases and unit scales would hide a dropped or misplaced one
    return module.eval()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_a_vit_gains_zero_relative_position_biases_and_computes_the_same(qkv_bias):
    vit = _random_weights(build_vit("vit_tiny", 32, 8, 3, depth=2, embed_dim=32, num_heads=2,
                                    qkv_bias=qkv_bias))
    beit = vit_with_relative_positions(vit).eval()
    assert (beit.blocks[0].attn.q_bias is not None) == qkv_bias
    x = torch.randn(2, 3, 32, 32)
    blocks = dict(indices=[0, 1], intermediates_only=True)
    for ours, theirs in zip(vit.forward_intermediates(x, **blocks), beit.forward_intermediates(x, **blocks),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    tables = [block.attn.relative_position_bias_table for block in beit.blocks]
    assert all(table.requires_grad and not table.any() for table in tables)
    assert all(torch.equal(block.gamma_1, torch.ones(32)) for block in beit.blocks)  # mmseg's init_values=1.0



@pytest.mark.parametrize("kwargs", [dict(reg_tokens=2), dict(class_token=False, global_pool="avg")],
                         ids=["register-tokens", "no-class-token"])
def test_relative_positions_refuse_a_vit_with_register_tokens_or_without_a_class_token(kwargs):
    """BEiT's blocks take [CLS] + patches only: a register token would be read as a patch (and its table
    row lost), a missing class token would shift every patch by one."""
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=0, embed_dim=32, depth=1,
                            num_heads=2, **kwargs)
    with pytest.raises(MimkitError, match=r"^seg\.rel_pos_bias takes a ViT with a class token and no "
                                          r"register tokens$"):
        vit_with_relative_positions(vit)


def test_rel_pos_bias_turns_a_vit_into_a_beit_with_zero_tables_and_leaves_it_a_vit_without():
    vit = tiny_vit()
    plain, gained = segmentation_encoder(vit, 32), segmentation_encoder(vit, 32, rel_pos_bias=True)
    assert type(plain) is VisionTransformer and type(gained) is Beit
    tables = [block.attn.relative_position_bias_table for block in gained.blocks]
    assert len(tables) == 2 and all(t.shape == (7 * 7 + 3, 2) and not t.any() for t in tables)


def test_a_one_block_encoder_gains_its_per_block_table():
    """The conversions read the block layout off the first block: a one-block encoder has no other."""
    shared = BEiT(32, 8, 1, vocab_size=16, embed_dim=32, depth=1, num_heads=2, shared_rel_pos_bias=True)
    vit = tiny_vit(depth=1)
    for encoder in segmentation_encoder(shared.encoder, 32), segmentation_encoder(vit, 32, rel_pos_bias=True):
        assert encoder.blocks[0].attn.relative_position_bias_table.shape == (7 * 7 + 3, 2)
        assert Segmenter(encoder, 3).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)

def test_beits_shared_table_becomes_one_per_block_computing_the_same():
    shared = _random_weights(BEiT(32, 8, 3, vocab_size=16, embed_dim=32, depth=2, num_heads=2,
                                  shared_rel_pos_bias=True).encoder)
    encoder = segmentation_encoder(shared, 32)
    assert encoder.rel_pos_bias is None
    table = shared.rel_pos_bias.relative_position_bias_table
    assert all(torch.equal(block.attn.relative_position_bias_table, table) for block in encoder.blocks)
    x = torch.randn(2, 3, 32, 32)
    last = dict(indices=[1], intermediates_only=True)
    torch.testing.assert_close(shared.eval().forward_intermediates(x, **last)[0],
                               encoder.eval().forward_intermediates(x, **last)[0], rtol=0, atol=1e-5)
    groups = param_groups(encoder, 0.05, 0.65, len(encoder.blocks))  # each table at its own block's lr
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(encoder.blocks[0].attn.relative_position_bias_table)] == pytest.approx(0.65 ** 2)
    assert scale[id(encoder.blocks[1].attn.relative_position_bias_table)] == pytest.approx(0.65)


def test_a_segmentation_run_exports_at_its_crop_with_its_normalization_and_classes(tmp_path, monkeypatch):
    """`export_run` of a segmentation run: the folder's image size is the training crop (not the images'
    size), its processor normalizes with the run's mean and std, its labels are the run's classes, its
    auxiliary loss weight is the run's; timm and
    --encoder-only are refused before anything is written."""
    from types import SimpleNamespace

    from transformers import AutoImageProcessor

    from mimkit.interop import export

    torch.manual_seed(0)
    beit = BEiT(32, 8, 3, vocab_size=16, embed_dim=32, depth=6, num_heads=2).encoder
    model = Segmenter(segmentation_encoder(beit, 32), 3, blocks=[0, 1, 2, 4]).eval()
    config = SimpleNamespace(data=SimpleNamespace(img_size=64, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6]),
                             seg=SimpleNamespace(crop_size=32, classes=["sky", "road", "car"],
                                                 aux_weight=0.3))
    monkeypatch.setattr(export, "run_kind", lambda run_dir: SimpleNamespace(name="segment"))
    monkeypatch.setattr(export, "load_trained", lambda run_dir: (model, config))
    for to, encoder_only in (("timm", False), ("hf", True)):
        with pytest.raises(MimkitError, match="--to hf without --encoder-only"):
            export.export_run(tmp_path / "run", to, tmp_path / "refused", encoder_only)
    assert not (tmp_path / "refused").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("mine")
    with pytest.raises(MimkitError, match="is not empty"):
        export.export_run(tmp_path / "run", "hf", tmp_path / "full")
    export.export_run(tmp_path / "run", "hf", tmp_path / "hf")
    hf = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf")
    assert hf.config.image_size == 32 and hf.config.id2label == {0: "sky", 1: "road", 2: "car"}
    assert hf.config.auxiliary_loss_weight == 0.3 and hf.config.semantic_loss_ignore_index == 255
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size == {"height": 32, "width": 32}
    assert (list(processor.image_mean), list(processor.image_std)) == (config.data.mean, config.data.std)
