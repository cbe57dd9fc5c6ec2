import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mimkit.errors import MimkitError
from mimkit.models.vit import ENCODER_ARCHS, build_vit, check_patch_grid, encoder_arch, sincos_pos_embed_2d


def test_encoder_archs_are_the_contract_table():
    dims = {k: (v["embed_dim"], v["depth"], v["num_heads"], v["mlp_ratio"]) for k, v in ENCODER_ARCHS.items()}
    assert dims == {
        "vit_mini": (128, 6, 4, 4.0),
        "vit_tiny": (192, 12, 3, 4.0),
        "vit_small": (384, 12, 6, 4.0),
        "vit_base": (768, 12, 12, 4.0),
        "vit_large": (1024, 24, 16, 4.0),
        "vit_huge": (1280, 32, 16, 4.0),
    }


def test_encoder_arch_returns_a_copy_and_rejects_unknown_names():
    encoder_arch("vit_tiny")["depth"] = 2
    assert ENCODER_ARCHS["vit_tiny"]["depth"] == 12
    with pytest.raises(MimkitError, match="vit_nope.*vit_mini.*vit_huge"):
        encoder_arch("vit_nope")


def test_build_vit_is_a_headless_timm_vit():
    vit = build_vit("vit_tiny", img_size=32, patch_size=8, in_chans=1, depth=2)
    assert isinstance(vit, VisionTransformer)
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (192, 2, 3)
    assert vit.cls_token is not None and vit.pos_embed.shape == (1, 1 + 16, 192)
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 192)


def test_build_vit_takes_explicit_dims():
    vit = build_vit(dict(embed_dim=32, depth=1, num_heads=2), img_size=28, patch_size=4, in_chans=1)
    assert vit.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 1 + 49, 32)


def test_check_patch_grid():
    assert check_patch_grid(32, 8) == 4
    assert check_patch_grid(28, 4) == 7
    assert check_patch_grid(4, 1) == 4 and check_patch_grid(8, 8) == 1  # one-pixel patches, one patch
    for img, patch in ((30, 8), (8, 16), (32, 0)):
        message = f"img_size {img} is not a positive multiple of patch_size {patch};"
        with pytest.raises(MimkitError, match=message):
            check_patch_grid(img, patch)
    with pytest.raises(MimkitError):
        build_vit("vit_tiny", img_size=30, patch_size=8, depth=1)


@pytest.mark.parametrize("dim,grid", [(32, 8), (48, 7), (128, 2)])
def test_sincos_table_equals_transformers_vitmae(dim, grid):
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder

    cfg = ViTMAEConfig(
        hidden_size=dim,
        decoder_hidden_size=dim,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=1,
        decoder_intermediate_size=dim,
    )
    decoder = ViTMAEDecoder(cfg, num_patches=grid * grid)  # its own initializer writes the MAE table
    expected = decoder.decoder_pos_embed.detach()
    assert expected[0, 1:].abs().sum() > 0
    table = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert table.dtype == torch.float32 and table.shape == (1, 1 + grid * grid, dim)
    torch.testing.assert_close(table, expected, rtol=0, atol=0)


def test_sincos_halves_encode_column_then_row():
    dim, grid = 16, 5
    table = sincos_pos_embed_2d(dim, grid, cls_token=False)[0].reshape(grid, grid, dim)  # [row, col, D]
    first, second = table[..., : dim // 2], table[..., dim // 2 :]
    # first half is a function of the column only, second half of the row only
    assert torch.equal(first, first[:1].expand_as(first)) and not torch.equal(first[:, 0], first[:, 1])
    assert torch.equal(second, second[:, :1].expand_as(second)) and not torch.equal(second[0], second[1])
    # [sin | cos] of position * frequency: the first frequency is 1, so sin(col) and cos(row)
    torch.testing.assert_close(first[0, :, 0], torch.arange(grid).float().sin())
    torch.testing.assert_close(second[:, 0, dim // 4], torch.arange(grid).float().cos())
    with_cls = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert torch.equal(with_cls[0, 0], torch.zeros(dim))
    assert torch.equal(with_cls[0, 1:], table.reshape(-1, dim))


def test_sincos_rejects_width_not_divisible_by_4():
    with pytest.raises(MimkitError, match="divisible by 4, got 30"):
        sincos_pos_embed_2d(30, 4, cls_token=True)
