"""data2vec's model: the teacher's targets (top K blocks, each normalized, averaged, normalized), the loss at
masked positions only, the EMA update and its decay schedule, the teacher's eval mode, and the encoder equal
to transformers' Data2VecVisionModel on the same weights."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Data2VecVisionConfig, Data2VecVisionModel

from mimkit.errors import MimkitError
from mimkit.methods.data2vec import hf_export
from mimkit.models.data2vec import Data2Vec, create_data2vec, teacher_decay
from tests.conftest import perturb


def tiny(**kwargs) -> Data2Vec:
    torch.manual_seed(0)
    return Data2Vec(**{"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 3,
                       "num_heads": 2, "top_k": 2, "drop_path_rate": 0.0, **kwargs})


def teacher_blocks(model: Data2Vec, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Every teacher block's output, patch tokens only, computed block by block here."""
    enc = model.teacher
    x = torch.cat([enc.cls_token.expand(len(imgs), -1, -1), enc.patch_embed(imgs)], dim=1)
    bias = enc.rel_pos_bias()
    outs = []
    for block in enc.blocks:
        x = block(x, shared_rel_pos_bias=bias)
        outs.append(x[:, 1:])
    return outs


def test_targets_average_the_top_k_blocks_each_layer_normalized_then_normalized_again():
    model = perturb(tiny())
    imgs = torch.randn(2, 3, 32, 32)
    blocks = teacher_blocks(model, imgs)
    mean = (F.layer_norm(blocks[1], (32,)) + F.layer_norm(blocks[2], (32,))) / 2
    torch.testing.assert_close(model.forward_targets(imgs), F.layer_norm(mean, (32,)))
    instance = tiny(block_norm="instance", target_norm="none")
    instance.load_state_dict(model.state_dict())
    per_feature = [(b - b.mean(1, keepdim=True)) / (b.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
                   for b in blocks[1:]]
    torch.testing.assert_close(instance.forward_targets(imgs), sum(per_feature) / 2, atol=1e-5, rtol=1e-4)


def test_loss_is_smooth_l1_of_the_head_at_masked_patches_only():
    model = perturb(tiny(loss_beta=0.5))
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5], mask[1, 7:9] = True, True
    loss, metrics = model(imgs, mask)
    x, _ = model.forward_features(imgs, mask)
    pred = model.lm_head(x[:, 1:])[mask]
    expected = F.smooth_l1_loss(pred, model.forward_targets(imgs)[mask], beta=0.5)
    torch.testing.assert_close(loss, expected)
    assert metrics["target_std"] > 0 and metrics["pred_std"] > 0
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # the teacher is never trained
    assert model.mask_token.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_teacher_sees_the_whole_image_in_eval_mode_and_starts_as_the_student():
    model = tiny(drop_path_rate=0.5, attn_drop_rate=0.5).train()
    assert model.encoder.training and not model.teacher.training
    s, t = model.encoder.state_dict(), model.teacher.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_targets(imgs), model.forward_targets(imgs))  # no dropout


def test_update_teacher_is_an_ema_of_the_student():
    model = tiny()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    perturb(model.encoder)
    model.update_teacher(0.9)
    student, teacher = model.encoder.state_dict(), model.teacher.state_dict()
    for key, value in before.items():
        expected = 0.9 * value + 0.1 * student[key] if value.is_floating_point() else value
        torch.testing.assert_close(teacher[key], expected)


def test_decay_rises_linearly_then_stays_at_its_end():
    assert teacher_decay(0, 0.999, 0.9999, 10) == 0.999
    assert teacher_decay(5, 0.999, 0.9999, 10) == pytest.approx(0.99945)
    assert teacher_decay(10, 0.999, 0.9999, 10) == teacher_decay(99, 0.999, 0.9999, 10) == 0.9999
    assert teacher_decay(0, 0.999, 0.9998, 0) == 0.9998  # the authors' ViT-B: ema_start_at 0


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 4}, r"data2vec.top_k=4 must be a number of blocks in 1..3"),
    ({"block_norm": "batch"}, "data2vec.block_norm='batch' must be one of: layer, instance, none"),
])
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(MimkitError, match=message):
        tiny(**kwargs)


def test_student_encoder_equals_transformers_data2vec_vision_on_the_same_weights():
    model = perturb(tiny())
    architecture, fields, state = hf_export(model, None, encoder_only=False)
    assert architecture == "Data2VecVisionModel"
    hf = Data2VecVisionModel(Data2VecVisionConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    hf.load_state_dict(state, strict=True)
    hf.eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        ours, _ = model.forward_features(imgs, mask)
        theirs = hf(imgs, bool_masked_pos=mask).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-5


def test_attention_dropout_is_the_students_in_pretraining_only():
    model = tiny(attn_drop_rate=0.5).train()
    imgs, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 16, dtype=torch.bool)
    assert model(imgs, mask)[0] != model(imgs, mask)[0]  # dropped differently each time
    assert all(block.attn.attn_drop.p == 0 for block in model.encoder.blocks)  # what fine-tuning copies
    assert tiny(attn_drop_rate=0.0).train()(imgs, mask)[0] == tiny(attn_drop_rate=0.0).train()(imgs, mask)[0]


@pytest.mark.parametrize("name, layer_scale", [("vit_base", 1e-4), ("vit_large", 1e-5)])
def test_the_layer_scale_starts_at_the_authors_value_for_the_arch(name, layer_scale):
    model = create_data2vec(name, img_size=16, patch_size=16, in_chans=1, depth=1, top_k=1)
    assert torch.all(model.encoder.blocks[0].gamma_1 == layer_scale)
    assert torch.all(model.teacher.blocks[0].gamma_2 == layer_scale)


@pytest.mark.parametrize("beta, expected", [(0.0, (0.25 + 9) / 2), (2.0, (0.25 / 4 + 3 - 1) / 2)])
def test_the_loss_is_the_squared_error_at_beta_0_and_smooth_l1_above(beta, expected):
    pred, targets = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.5, 0.0]])  # errors 0.5 and 3
    assert tiny(loss_beta=beta).forward_loss(pred, targets).item() == pytest.approx(expected)
