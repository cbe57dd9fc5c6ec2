"""CAE's model: the position table's layout, what each stage sees (the encoder the visible patches only,
the regressor's queries the visible latents and each other, not [CLS]), the alignment targets (the
encoder's current weights on the masked patches, no gradient), the loss, and the authors' init; CAE v2's
targets (the teacher's [CLS] and patch features, L2-normalized, [CLS] then visible then masked) and its loss
(1 - cos at every token, through one LayerNorm and head, the regressor without its own norm)."""

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.models.cae import CAE, CAEv2, RegressorBlock, cae_sincos_pos_embed, create_cae, in_image_order
from mimkit.models.vit import sincos_pos_embed_2d
from tests.conftest import perturb

B, GRID, VOCAB = 2, 4, 16


def tiny(**kw) -> CAE:
    args = dict(img_size=16, patch_size=4, in_chans=3, vocab_size=VOCAB, depth=2, embed_dim=32, num_heads=2,
                regressor_depth=2, decoder_depth=1, drop_path_rate=0.0)
    return perturb(create_cae("vit_mini", **(args | kw)))


def half_mask() -> torch.Tensor:
    """Two images of 16 patches, 8 masked in each (different ones), row-major."""
    mask = torch.zeros(B, GRID * GRID, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, ::2] = True
    return mask


def test_position_table_puts_the_row_first_and_a_zero_class_row():
    table = cae_sincos_pos_embed(8, 3)[0]  # [1 + 9, 8]
    assert table.shape == (10, 8) and not table[0].any()
    patches = table[1:].view(3, 3, 8)  # [row, column, D]
    assert torch.equal(patches[:, 0, :4], patches[:, 2, :4])  # first half: the same along a row
    assert not torch.equal(patches[0, :, :4], patches[1, :, :4])
    assert torch.equal(patches[0, :, 4:], patches[2, :, 4:])  # second half: the column
    mae = sincos_pos_embed_2d(8, 3, cls_token=True)[0]
    assert torch.equal(table[:, :4], mae[:, 4:]) and torch.equal(table[:, 4:], mae[:, :4])


def test_the_encoder_sees_the_visible_patches_only():
    model, mask = tiny(), half_mask()
    imgs = torch.randn(B, 3, 16, 16)
    changed = imgs.clone()
    changed[0, :, :4, :] += 5  # the first patch row of image 0: masked there
    with torch.no_grad():
        out = model.forward_encoder(imgs, mask)
        assert out.shape == (B, 1 + 8, 32)
        torch.testing.assert_close(model.forward_encoder(changed, mask)[0], out[0])
        changed[0, :, 12:, :] += torch.randn(3, 4, 16)  # the last patch row: visible
        assert (model.forward_encoder(changed, mask)[0] - out[0]).abs().max() > 1e-3


def test_the_regressor_reads_the_visible_latents_not_the_class_token():
    model, mask = tiny(), half_mask()
    latent = torch.randn(B, 9, 32)
    with torch.no_grad():
        out = model.forward_regressor(latent, mask)
        assert out.shape == (B, 8, 32)
        # random changes: a constant one over the channels would vanish in the keys' and values' LayerNorms
        other_cls = latent.clone()
        other_cls[:, 0] += torch.randn(32)
        torch.testing.assert_close(model.forward_regressor(other_cls, mask), out)
        for visible in (1, 8):  # the first and the last visible patch
            other_patch = latent.clone()
            other_patch[:, visible] += torch.randn(32)
            assert (model.forward_regressor(other_patch, mask) - out).abs().max() > 1e-3


def test_the_queries_attend_to_each_other():
    """The keys and values are the visible latents and the queries: moving the position of one masked patch
    (it enters only its own query and key) changes what another masked patch's query returns."""
    model = tiny(regressor_depth=1)
    latent = torch.randn(1, 1 + 14, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    with torch.no_grad():
        before = model.forward_regressor(latent, mask)[0, 0]
        model.latent_pos_embed[0, 1 + 5] += torch.randn(32)  # not a constant: LayerNorm would remove it
        assert (model.forward_regressor(latent, mask)[0, 0] - before).abs().max() > 1e-3


def test_the_positions_enter_the_regressors_queries_and_keys_not_its_values():
    """With keys that score every context token alike (a zero key projection), attention returns the mean
    of the values: the context's positions then change nothing, since they enter only queries and keys."""
    block = perturb(RegressorBlock(32, 2, layer_scale_init=0.5))
    torch.nn.init.zeros_(block.cross_attn.k.weight)
    x, context = torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    pos, context_pos = torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        out = block(x, context, pos, context_pos)
        torch.testing.assert_close(block(x, context, pos, context_pos + torch.randn(2, 7, 32)), out)
        assert (block(x, context + torch.randn(2, 7, 32), pos, context_pos) - out).abs().max() > 1e-3


def test_queries_of_one_mask_token_are_told_apart_by_their_positions():
    """The regressor's masked queries all start as the one mask token: only the positions added to them make
    each attend (and predict) differently."""
    block = perturb(RegressorBlock(32, 2, layer_scale_init=0.5))
    queries = torch.randn(1, 1, 32).expand(2, 3, 32)
    context, pos, context_pos = torch.randn(2, 7, 32), torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        out = block(queries, context, pos, context_pos)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3 and (out[:, 1] - out[:, 2]).abs().max() > 1e-3


def test_the_decoder_reads_where_each_predicted_patch_lies():
    """The decoder adds the masked patches' positions to the regressor's outputs: the same latents
    predicted at other places give other tokens."""
    model = tiny().eval()
    predicted = torch.randn(B, 8, 32)
    first, other = half_mask(), half_mask().flip(0)  # each image's masked places swapped
    with torch.no_grad():
        logits = model.forward_decoder(predicted, first)
        torch.testing.assert_close(model.forward_decoder(predicted, first.clone()), logits)
        assert (model.forward_decoder(predicted, other) - logits).abs().max() > 1e-3


def test_alignment_targets_are_the_encoders_latents_of_the_masked_patches_without_gradient():
    model, mask = tiny(decoder_embed_dim=16, decoder_num_heads=2).train(), half_mask()
    imgs = torch.randn(B, 3, 16, 16)
    target = model.forward_target(imgs, mask)
    assert target.shape == (B, 8, 16) and not target.requires_grad
    with torch.no_grad():
        expected = model.to_latent(model.forward_encoder(imgs, ~mask)[:, 1:])
    torch.testing.assert_close(target, expected)
    with torch.no_grad():  # refreshed every step: the encoder's weights as they are now
        model.encoder.blocks[0].mlp.fc1.weight.add_(1.0)
    assert (model.forward_target(imgs, mask) - target).abs().max() > 1e-3


def test_loss_is_token_cross_entropy_plus_weighted_alignment():
    model, mask = tiny(), half_mask()
    imgs, ids = torch.randn(B, 3, 16, 16), torch.randint(0, VOCAB, (B, 16))
    with torch.no_grad():
        plain, metrics = model(imgs, mask, ids, align_weight=0.0)
        weighted, again = model(imgs, mask, ids, align_weight=2.0)
        predicted = model.forward_regressor(model.forward_encoder(imgs, mask), mask)
        logits = model.forward_decoder(predicted, mask)
    assert logits.shape == (B, 8, VOCAB)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[mask])
    mse = (predicted - model.forward_target(imgs, mask)).pow(2).mean()
    torch.testing.assert_close(plain, ce)
    torch.testing.assert_close(weighted, ce + 2 * mse)
    torch.testing.assert_close(again["loss_align"], mse)
    acc = (logits.flatten(0, 1).argmax(-1) == ids[mask]).float().mean()
    torch.testing.assert_close(metrics["mim_acc"], acc)


def test_a_step_trains_every_part_but_the_fixed_tables():
    model, mask = tiny(decoder_embed_dim=16, decoder_num_heads=2).train(), half_mask()
    loss, _ = model(torch.randn(B, 3, 16, 16), mask, torch.randint(0, VOCAB, (B, 16)))
    loss.backward()
    untouched = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert untouched == ["encoder.pos_embed"]


def test_init_is_the_authors():
    model = create_cae("vit_mini", img_size=16, patch_size=4, vocab_size=VOCAB, depth=2, regressor_depth=1,
                       decoder_depth=1)
    block = model.regressor_blocks[0]
    assert torch.equal(block.gamma_1_cross, torch.full((128,), 0.1)) and block.gamma_1_cross.requires_grad
    assert torch.equal(model.decoder_blocks[0].gamma_1, torch.full((128,), 0.1))
    assert not model.encoder.pos_embed.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed, cae_sincos_pos_embed(128, GRID))
    bound = (6 / (128 + 128)) ** 0.5  # xavier-uniform of a 128 x 128 linear
    assert block.cross_attn.q.weight.abs().max() <= bound and block.cross_attn.q.weight.std() > bound / 3
    assert model.mask_token.abs().max() <= 0.02 and not block.cross_attn.q_bias.any()
    fixed = create_cae("vit_mini", img_size=16, patch_size=4, vocab_size=VOCAB, depth=1, regressor_depth=1,
                       decoder_depth=1, decoder_layer_scale_init=0.0).regressor_blocks[0]
    assert torch.equal(fixed.gamma_1_cross, torch.ones(128)) and not fixed.gamma_1_cross.requires_grad


@pytest.mark.parametrize("kw, message", [
    (dict(decoder_embed_dim=30, decoder_num_heads=3), "divisible by 4"),
    (dict(decoder_num_heads=3), "not divisible by 3 attention heads"),
    (dict(regressor_depth=0), "regressor_depth=0 must be at least 1"),
])
def test_bad_architectures_are_one_line_errors(kw, message):
    with pytest.raises(MimkitError, match=message):
        create_cae("vit_mini", img_size=16, patch_size=4, **kw)


TEACHER = 12  # CAE v2's teacher width in these tests


def tiny_v2(**kw) -> CAEv2:
    args = dict(img_size=16, patch_size=4, in_chans=3, teacher_dim=TEACHER, depth=2, embed_dim=32,
                num_heads=2, regressor_depth=2, drop_path_rate=0.0, decoder_embed_dim=16, decoder_num_heads=2)
    return perturb(create_cae("vit_mini", cls=CAEv2, **(args | kw)))


def test_caev2_targets_are_the_teachers_class_and_patch_features_unit_length_class_visible_masked():
    model, mask = tiny_v2(), half_mask()
    teacher = torch.randn(B, 1 + 16, TEACHER) * 3
    target = model.forward_target(teacher, mask)
    assert target.shape == (B, 1 + 16, TEACHER) and target.dtype == torch.float32
    torch.testing.assert_close(target.norm(dim=-1), torch.ones(B, 17))  # the authors' labels / labels.norm()
    for b in range(B):
        order = [0, *(1 + i for i in range(16) if not mask[b, i]), *(1 + i for i in range(16) if mask[b, i])]
        tokens = teacher[b, order]
        torch.testing.assert_close(target[b], tokens / tokens.norm(dim=-1, keepdim=True))
    unit = torch.nn.functional.normalize(teacher[:, 1:], dim=-1)
    torch.testing.assert_close(in_image_order(target, mask), unit)  # the picture's way back


def test_caev2_loss_is_one_minus_cosine_at_every_token_through_one_norm_and_head():
    model, mask = tiny_v2(), half_mask()
    imgs, teacher = torch.randn(B, 3, 16, 16), torch.randn(B, 17, TEACHER)
    with torch.no_grad():
        loss, metrics = model(imgs, mask, teacher)
        latent = model.forward_encoder(imgs, mask)
        # the regressor, by hand: the queries over the visible latents and themselves, no final LayerNorm
        pos = model.latent_pos_embed[0, 1:]
        x = model.mask_token.expand(B, 8, -1)
        visible = model.to_latent(latent)[:, 1:]
        pos_m = torch.stack([pos[m] for m in mask])
        pos_kv = torch.cat([torch.stack([pos[~m] for m in mask]), pos_m], dim=1)
        for block in model.regressor_blocks:
            x = block(x, torch.cat([visible, x], dim=1), pos_m, pos_kv)
        tokens = torch.cat([model.to_latent(latent), x], dim=1)  # [CLS], visible, masked
        pred = model.lm_head(model.decoder_norm(tokens))
        target = model.forward_target(teacher, mask)
    cosine = torch.nn.functional.cosine_similarity(pred, target, dim=-1)  # [B, 17]
    torch.testing.assert_close(loss, (1 - cosine).mean())
    torch.testing.assert_close(metrics["cosine"], cosine[:, 9:].mean())
    torch.testing.assert_close(metrics["cosine_visible"], cosine[:, :9].mean())
    for token in (0, 1, 16):  # [CLS], patch 0 (masked in image 0), patch 15 (visible there): each counts
        moved = teacher.clone()
        moved[0, token] = torch.randn(TEACHER)
        with torch.no_grad():
            assert (model(imgs, mask, moved)[0] - loss).abs() > 1e-4


def test_caev2_has_no_decoder_or_alignment_and_a_step_trains_the_rest():
    model, mask = tiny_v2().train(), half_mask()
    assert len(model.decoder_blocks) == 0 and model.lm_head.out_features == TEACHER
    loss, _ = model(torch.randn(B, 3, 16, 16), mask, torch.randn(B, 17, TEACHER))
    loss.backward()
    untouched = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert untouched == ["encoder.pos_embed"]
    with pytest.raises(MimkitError, match="CAEv2 takes no decoder_depth: CAE v2 has no token decoder"):
        create_cae("vit_mini", cls=CAEv2, img_size=16, patch_size=4, decoder_depth=1)
