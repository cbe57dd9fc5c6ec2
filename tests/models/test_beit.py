import math

import pytest
import timm
import torch
from transformers import BeitConfig, BeitForMaskedImageModeling

from mimkit.errors import MimkitError
from mimkit.interop.beit import HF_BEIT
from mimkit.interop.hf import strip_base
from mimkit.interop.keymaps import from_foreign
from mimkit.masking import block_mask
from mimkit.models.beit import BEIT_MODELS, BEiT, create_beit
from mimkit.models.vit import encoder_arch


def masks(batch: int) -> torch.Tensor:
    """(batch, 4, 4) block masks of 6 patches, one seed per image."""
    return torch.stack([block_mask(4, 4, 6, generator=torch.Generator().manual_seed(i))
                        for i in range(batch)])


def tiny_pair(shared: bool):
    # use_mean_pooling=True leaves BeitModel without a final LayerNorm, so the MIM model's top-level
    # `layernorm` is the only one, as timm's `norm` is in ours (False would apply two in a row).
    cfg = BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=4, num_channels=3, vocab_size=64, use_mask_token=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        layer_scale_init_value=0.1, layer_norm_eps=1e-6, drop_path_rate=0.0, use_mean_pooling=True,
    )
    torch.manual_seed(0)
    hf = BeitForMaskedImageModeling(cfg).eval()
    # HF zero-inits the tokens and the bias tables: randomize every weight so that parity means something.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = BEiT(img_size=32, patch_size=4, in_chans=3, vocab_size=64, embed_dim=32, depth=2, num_heads=2,
                shared_rel_pos_bias=shared, drop_path_rate=0.0).eval()
    # transformers 5 in-memory names -> saved names -> mimkit, through the interop key map (data).
    mapped, unexpected = from_foreign(strip_base(hf.state_dict()), HF_BEIT)
    assert unexpected == []  # nothing of HF's left behind
    ours.load_state_dict(mapped, strict=True)  # and every mimkit weight set
    return hf, ours


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer_bias", "shared_bias"])
def test_parity_with_transformers(shared):
    hf, ours = tiny_pair(shared)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    bool_masked_pos = torch.stack([block_mask(8, 8, 26, generator=g).flatten() for _ in range(3)])
    target_ids = torch.randint(0, 64, (3, 64), generator=g)
    with torch.no_grad():
        out = hf(imgs, bool_masked_pos=bool_masked_pos, labels=target_ids[bool_masked_pos],
                 output_hidden_states=True)
        x, hidden = ours.forward_features(imgs, bool_masked_pos, layers=(1, 2))
        logits = ours.forward_head(x, bool_masked_pos)
        loss, metrics = ours(imgs, bool_masked_pos, target_ids)
    # float32 rounding of another attention implementation: 2.4e-6 measured on this CPU
    torch.testing.assert_close(logits, out.logits[bool_masked_pos], rtol=0, atol=5e-6)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    for h_ours, h_hf in zip(hidden, out.hidden_states[1:], strict=True):  # HF's [0] is the embedding output
        # the same rounding: 1.2e-6 measured on this CPU
        torch.testing.assert_close(h_ours, h_hf, rtol=0, atol=5e-6)
    acc = (out.logits[bool_masked_pos].argmax(-1) == target_ids[bool_masked_pos]).float().mean()
    assert metrics["mim_acc"] == acc


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer_bias", "shared_bias"])
def test_encoder_loads_into_timm_beit_strict(shared):
    model = BEiT(img_size=32, patch_size=8, in_chans=1, vocab_size=16, embed_dim=64, depth=2, num_heads=4,
                 shared_rel_pos_bias=shared, drop_path_rate=0.0).eval()
    timm_model = timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1, embed_dim=64,
        depth=2, num_heads=4, num_classes=0, global_pool="token", use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
    ).eval()
    timm_model.load_state_dict(model.encoder.state_dict(), strict=True)
    imgs = torch.randn(2, 1, 32, 32)
    nothing_masked = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        ours, _ = model.forward_features(imgs, nothing_masked)
        torch.testing.assert_close(ours, timm_model.forward_features(imgs))
        some_masked = block_mask(4, 4, 6, generator=torch.Generator().manual_seed(0)).expand(2, 4, 4)
        assert not torch.allclose(model.forward_features(imgs, some_masked)[0], ours)


@pytest.mark.parametrize("name", sorted(BEIT_MODELS))
def test_registry_models_train_a_step(name):
    model = create_beit(name, img_size=32, patch_size=8, in_chans=1, vocab_size=32, depth=1)
    arch = encoder_arch(name)
    assert model.encoder.embed_dim == arch["embed_dim"] and len(model.encoder.blocks) == 1
    assert model.encoder.blocks[0].attn.num_heads == arch["num_heads"]
    assert model.encoder.blocks[0].gamma_1[0].item() == pytest.approx(1e-5 if name == "vit_large" else 0.1)
    imgs = torch.randn(2, 1, 32, 32)
    bool_masked_pos = masks(2)
    model.eval()  # no drop path: the two forwards below see the same network
    with torch.no_grad():
        guesses = model.forward_head(model.forward_features(imgs, bool_masked_pos)[0], bool_masked_pos)
    # targets: the model's own guess on the first image's 6 masked patches, a wrong id on the second's
    targets = torch.zeros(2, 16, dtype=torch.long)
    targets[bool_masked_pos.flatten(1)] = guesses.argmax(-1) + torch.tensor([0] * 6 + [1] * 6)
    targets = (targets % 32).view(2, 4, 4)
    _, metrics = model(imgs, bool_masked_pos, targets)
    assert metrics["mim_acc"].item() == 0.5
    model.train()
    loss, metrics = model(imgs, bool_masked_pos, torch.randint(0, 32, (2, 4, 4)))
    assert abs(loss.item() - math.log(32)) < 0.5  # near-uniform predictions at init
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_masked_tokens_are_learned_from_visible_context():
    # Each image's tokens all equal its own id, which only its visible patches reveal (their brightness).
    torch.manual_seed(0)
    model = create_beit("vit_mini", img_size=32, patch_size=8, in_chans=1, vocab_size=16, embed_dim=64,
                        depth=2, drop_path_rate=0.0)
    ids = torch.tensor([3, 7, 11, 15])
    imgs = torch.randn(4, 1, 32, 32) * 0.1 + (ids.float() / 8 - 1)[:, None, None, None]
    bool_masked_pos, target_ids = masks(4), ids[:, None].expand(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, metrics = model(imgs, bool_masked_pos, target_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # ~2.8 -> ~0.4
    assert metrics["mim_acc"] >= 0.75


def test_create_beit_rejects_unknown_name():
    with pytest.raises(MimkitError, match="vit_gigantic"):
        create_beit("vit_gigantic")


@pytest.mark.parametrize("layers", [(3,), (0,), (1, 0), (-1,)])  # past the last block, and 0 (Python's -1)
def test_forward_features_rejects_bad_layers(layers):
    model = BEiT(img_size=32, patch_size=8, in_chans=1, vocab_size=16, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(MimkitError, match="1..2"):
        model.forward_features(torch.randn(1, 1, 32, 32), torch.zeros(1, 16, dtype=torch.bool), layers=layers)
