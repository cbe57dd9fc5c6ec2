"""The segmentation model: pyramid and head shapes, feature blocks, and parity with transformers'
BeitForSemanticSegmentation on copied weights."""

import pytest
import torch
from transformers import BeitForSemanticSegmentation

from mimkit.errors import MimkitError
from mimkit.interop.segmentation import export_segmenter, hf_out_indices
from mimkit.models.beit import BEiT
from mimkit.models.segmentation import Segmenter, feature_blocks, segmentation_encoder
from mimkit.models.vit import build_vit, sincos_pos_embed_2d


def tiny_vit(depth: int = 2):
    return build_vit("vit_tiny", 32, 8, 1, depth=depth, embed_dim=32, num_heads=2)


def tiny_beit(depth: int = 2, channels: int = 1):
    return BEiT(32, 8, channels, vocab_size=16, embed_dim=32, depth=depth, num_heads=2).encoder


def test_feature_blocks_are_the_papers_scaled():
    assert feature_blocks(12) == [3, 5, 7, 11]
    assert feature_blocks(24) == [7, 11, 15, 23]
    assert feature_blocks(6) == [1, 2, 3, 5]
    assert feature_blocks(2) == [0, 0, 0, 1]


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


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    model = Segmenter(segmentation_encoder(tiny_vit(), 32, drop_path=0.1), 3, head="linear",
                      freeze_encoder=True).train()
    assert not model.encoder.training and model.decode_head.training
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decode_head.classifier.weight.grad is not None


def test_bad_model_options_are_one_line_errors():
    with pytest.raises(MimkitError, match="head"):
        Segmenter(segmentation_encoder(tiny_vit(), 32), 3, head="fcn")
    with pytest.raises(MimkitError, match="4 blocks"):
        Segmenter(segmentation_encoder(tiny_vit(), 32), 3, blocks=[0, 1, 5, 1])


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
    export_segmenter(model, 32, [0.5] * 3, [0.5] * 3, classes, tmp_path / "hf")
    hf, info = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == dict(enumerate(classes)) and hf.config.label2id["dog"] == 2
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
    with pytest.raises(MimkitError, match="seg.blocks"):
        hf_out_indices([3, 5, 7, 11], 12)


def test_blocks_past_the_last_one_read_get_no_gradient():
    model = Segmenter(segmentation_encoder(tiny_vit(depth=4), 32), 3, blocks=[0, 0, 1, 1])
    assert not any(p.requires_grad for p in model.encoder.blocks[2:].parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[:2].parameters())
