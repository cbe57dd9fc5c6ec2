import pytest
import timm
import torch

from mimkit.errors import MimkitError
from mimkit.models.mae import MAE, MAE_MODELS, PatchPixelNorm, create_mae, mae_vit_tiny
from mimkit.models.vit import ENCODER_ARCHS, sincos_pos_embed_2d


def tiny_mae(**kw) -> MAE:
    cfg = dict(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    return MAE(**{**cfg, **kw})


# ---- parity with transformers' ViTMAEForPreTraining -------------------------------------------------

# HF key -> mimkit key. {t}: weight|bias; block keys are relative to the block prefixes below.
HF_TO_MIMKIT = {
    "vit.embeddings.cls_token": "encoder.cls_token",
    "vit.embeddings.position_embeddings": "encoder.pos_embed",
    "vit.embeddings.patch_embeddings.projection.{t}": "encoder.patch_embed.proj.{t}",
    "vit.layernorm.{t}": "encoder.norm.{t}",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.{t}": "decoder_embed.{t}",
    "decoder.decoder_norm.{t}": "decoder_norm.{t}",
    "decoder.decoder_pred.{t}": "decoder_pred.{t}",
}
HF_BLOCK_PREFIXES = {
    "vit.layers.{i}.": "encoder.blocks.{i}.",
    "decoder.decoder_layers.{i}.": "decoder_blocks.{i}.",
}
HF_BLOCK = {
    "layernorm_before.{t}": "norm1.{t}",
    "attention.o_proj.{t}": "attn.proj.{t}",
    "layernorm_after.{t}": "norm2.{t}",
    "mlp.fc1.{t}": "mlp.fc1.{t}",
    "mlp.fc2.{t}": "mlp.fc2.{t}",
}
HF_QKV = ("attention.q_proj.{t}", "attention.k_proj.{t}", "attention.v_proj.{t}")  # stacked: attn.qkv.{t}


def hf_to_mimkit(hf_sd: dict, depths: tuple[int, int]) -> dict:
    """Every HF tensor is used exactly once; q, k, v are stacked into timm's fused qkv."""
    unused = set(hf_sd)

    def take(key):
        unused.discard(key)
        return hf_sd[key]

    out = {}
    for t in ("weight", "bias"):
        for src, dst in HF_TO_MIMKIT.items():
            out[dst.format(t=t)] = take(src.format(t=t))
        for (src_prefix, dst_prefix), depth in zip(HF_BLOCK_PREFIXES.items(), depths, strict=True):
            for i in range(depth):
                src_at, dst_at = src_prefix.format(i=i), dst_prefix.format(i=i)
                for src, dst in HF_BLOCK.items():
                    out[dst_at + dst.format(t=t)] = take(src_at + src.format(t=t))
                out[dst_at + f"attn.qkv.{t}"] = torch.cat([take(src_at + q.format(t=t)) for q in HF_QKV])
    assert not unused, unused
    return out


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_parity_with_transformers_vitmae(norm_pix_loss):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=4,
        num_channels=3,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
        decoder_num_hidden_layers=2,
        decoder_intermediate_size=128,
        layer_norm_eps=1e-6,
        norm_pix_loss=norm_pix_loss,
        mask_ratio=0.75,
    )
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(cfg).eval()
    with (
        torch.no_grad()
    ):  # move every tensor off its init (LayerNorm 1/0, zero tokens) so a swapped key shows
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mae = tiny_mae(patch_size=4, decoder_depth=2, norm_pix_loss=norm_pix_loss).eval()
    mae.load_state_dict(hf_to_mimkit(hf.state_dict(), depths=(2, 2)), strict=True)

    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = mae(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, out.mask)
    # bitwise on the CPU this was written on; 2.4e-6 on one with AVX2 only (another summation order)
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-5)


# ---- the encoder is a standard timm model ----------------------------------------------------------


def test_encoder_loads_strictly_into_timm_and_computes_the_same():
    mae = mae_vit_tiny(img_size=32, patch_size=8, in_chans=1, decoder_depth=1).eval()
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, in_chans=1
    ).eval()
    vit.load_state_dict(mae.encoder.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), mae.encoder(x))


def test_init_follows_mae():
    mae = tiny_mae()
    for table in (mae.encoder.pos_embed, mae.decoder_pos_embed):
        assert not table.requires_grad
        assert torch.equal(table, sincos_pos_embed_2d(32, 4, cls_token=True))
    assert all(
        torch.equal(m.bias, torch.zeros_like(m.bias)) for m in mae.modules() if isinstance(m, torch.nn.Linear)
    )
    assert mae.mask_token.abs().sum() > 0 and mae.encoder.cls_token.abs().sum() > 0



def test_the_patch_embedding_is_xavier_uniform_as_a_linear_and_mlp_ratio_reaches_the_decoder():
    """MAE initializes the patch-embedding conv as the linear map it is (xavier over (D, C*p*p)), not by the
    conv's own default; ``mlp_ratio`` sizes the decoder's MLPs as well as the encoder's."""
    torch.manual_seed(0)
    mae = tiny_mae(embed_dim=64, mlp_ratio=2.0)  # proj (64, 3, 8, 8): fan in 192, fan out 64
    bound = (6 / (192 + 64)) ** 0.5  # the conv default's bound would be 1 / sqrt(192), half as wide
    proj = mae.encoder.patch_embed.proj.weight
    assert 0.95 * bound < proj.abs().max().item() <= bound
    assert proj.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    widths = [block.mlp.fc1.out_features for block in [*mae.encoder.blocks, *mae.decoder_blocks]]
    assert widths == [128, 128, 64]


def test_norm_pix_loss_refuses_patches_of_one_value():
    with pytest.raises(MimkitError, match="norm_pix_loss needs patches of at least 2 values"):
        tiny_mae(img_size=4, patch_size=1, in_chans=1, norm_pix_loss=True)
    assert tiny_mae(img_size=4, patch_size=1, in_chans=1, norm_pix_loss=False).num_patches == 16

# ---- masking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.1, 0.9])
def test_masked_count_is_exact(mask_ratio):
    mae = tiny_mae(patch_size=4)  # L = 64
    x = torch.randn(5, 64, 8)
    kept, mask, _ = mae.random_masking(x, mask_ratio)
    n_keep = int(64 * (1 - mask_ratio))
    assert kept.shape == (5, n_keep, 8)
    assert torch.equal(mask.sum(1), torch.full((5,), 64.0 - n_keep))


def test_mask_follows_noise():
    mae = tiny_mae()  # L = 16
    x = torch.arange(16.0)[None, :, None].expand(2, -1, 3)  # token i holds the value i
    noise = torch.stack([torch.arange(16.0), torch.arange(16.0).flip(0)])
    kept, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    # the lowest-noise patches stay visible, in ascending-noise order
    assert torch.equal(kept[..., 0], torch.tensor([[0.0, 1, 2, 3], [15, 14, 13, 12]]))
    assert torch.equal(mask[0], (torch.arange(16) >= 4).float())
    assert torch.equal(mask[1], (torch.arange(16) < 12).float())
    shuffled = x.gather(1, noise.argsort(1)[..., None].expand(-1, -1, 3))
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 3)), x)


def test_same_noise_same_mask_and_loss():
    mae = tiny_mae().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    first, second = mae(imgs, noise=noise), mae(imgs, noise=noise)
    assert torch.equal(first[2], second[2]) and torch.equal(first[0], second[0])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, 0.99, 1e-17])
def test_bad_mask_ratio_raises(ratio):
    mae = tiny_mae()  # L = 16: 0.99 keeps int(0.16) = 0 patches, 1e-17 all 16 (1 - 1e-17 rounds to 1)
    with pytest.raises(MimkitError, match=f"mask_ratio {ratio}"):
        mae(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


def test_bad_inputs_raise():
    mae = tiny_mae()
    with pytest.raises(MimkitError, match="noise has shape"):
        mae(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))
    with pytest.raises(MimkitError, match=r"\(2, 1, 32, 32\)"):
        mae(torch.randn(2, 1, 32, 32))
    with pytest.raises(MimkitError, match="not divisible by 5"):
        tiny_mae(decoder_num_heads=5)
    with pytest.raises(MimkitError, match="patch_size 8"):
        tiny_mae(img_size=28)


# ---- loss and targets ------------------------------------------------------------------------------


def test_patchify_round_trip_and_layout():
    mae = tiny_mae(img_size=16, patch_size=4, in_chans=2)
    imgs = torch.randn(2, 2, 16, 16)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 16, 32)
    # patch 5 is row 1, column 1; its values are flattened as (p, p, C)
    torch.testing.assert_close(patches[:, 5].reshape(2, 4, 4, 2), imgs[:, :, 4:8, 4:8].permute(0, 2, 3, 1))
    assert torch.equal(mae.unpatchify(patches), imgs)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_only_sees_masked_patches(norm_pix_loss):
    mae = tiny_mae(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192, requires_grad=True)
    mask = (torch.rand(2, 16) < 0.5).float()
    mask[:, 0], mask[:, 1] = 1, 0
    loss = mae.forward_loss(imgs, pred, mask)
    loss.backward()
    visible = mask == 0
    assert torch.equal(pred.grad[visible], torch.zeros_like(pred.grad[visible]))
    assert (pred.grad[~visible].abs().sum(-1) > 0).all()

    patches = mae.patchify(imgs)
    changed = mae.unpatchify(patches + 5 * torch.randn_like(patches) * visible[..., None])
    assert torch.equal(mae.forward_loss(changed, pred, mask), loss)
    changed = mae.unpatchify(patches + 5 * torch.randn_like(patches) * (~visible)[..., None])
    assert not torch.allclose(mae.forward_loss(changed, pred, mask), loss)


def test_loss_is_mean_squared_error_over_masked_patches():
    mae = tiny_mae(norm_pix_loss=False)
    imgs = torch.randn(1, 3, 32, 32)
    target = mae.patchify(imgs)
    mask = torch.zeros(1, 16)
    mask[0, [3, 7]] = 1
    pred = target.clone()
    pred[0, 3] += 2.0  # squared error 4 on each of 192 values of one of two masked patches
    pred[0, 5] += 9.0  # visible: ignored
    torch.testing.assert_close(mae.forward_loss(imgs, pred, mask), torch.tensor(2.0))


def test_norm_pix_target_statistics():
    mae = tiny_mae()
    imgs = 3 + 2 * torch.randn(2, 3, 32, 32)
    target = mae.target_norm(mae.patchify(imgs))
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 16), atol=1e-5, rtol=0)
    # a predictor that outputs the normalized patch has zero loss; the raw pixels do not
    mask = torch.ones(2, 16)
    assert mae.forward_loss(imgs, target, mask) < 1e-10
    assert mae.forward_loss(imgs, mae.patchify(imgs), mask) > 1
    flat = torch.full((1, 3, 32, 32), 0.5)  # constant patches: eps keeps the target finite (zero)
    assert torch.equal(mae.target_norm(mae.patchify(flat)), torch.zeros(1, 16, 192))


# ---- the model registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MAE_MODELS))
def test_every_model_trains_one_step(name):
    torch.manual_seed(0)
    mae = create_mae(name, img_size=32, patch_size=16, in_chans=1, depth=2, decoder_depth=1)
    assert mae.encoder.embed_dim == ENCODER_ARCHS[name]["embed_dim"] and len(mae.encoder.blocks) == 2
    imgs = torch.randn(2, 1, 32, 32)
    loss, pred, mask = mae(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert (
        pred.shape == (2, 4, 256) and mask.shape == (2, 4) and torch.equal(mask.sum(1), torch.full((2,), 3.0))
    )
    loss.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.encoder.pos_embed.grad is None and mae.decoder_pos_embed.grad is None


def test_factory_decoders():
    decoders = {}
    for name, factory in MAE_MODELS.items():
        mae = factory(img_size=16, patch_size=16, depth=1)
        block = mae.decoder_blocks[0]
        decoders[name] = (block.norm1.normalized_shape[0], len(mae.decoder_blocks), block.attn.num_heads)
    assert decoders == {
        "vit_mini": (128, 4, 4),
        "vit_tiny": (128, 4, 4),
        "vit_small": (256, 4, 8),
        "vit_base": (512, 8, 16),
        "vit_large": (512, 8, 16),
        "vit_huge": (512, 8, 16),
    }


def test_create_mae_names():
    assert create_mae("mae_vit_mini", img_size=32, patch_size=16, depth=1).encoder.embed_dim == 128
    with pytest.raises(MimkitError, match="vit_nope.*vit_mini"):
        create_mae("vit_nope")


def test_patch_pixel_norm_inverts_to_the_original_patches():
    patches = torch.rand(2, 5, 16) * 3 + 1
    norm = PatchPixelNorm()
    torch.testing.assert_close(norm.invert(norm(patches), patches), patches)
