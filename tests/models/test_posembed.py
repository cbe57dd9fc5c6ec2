"""Absolute position tables at another grid: mimkit's resize is timm's bicubic resample, bit for bit, with
the prefix (class / register token) rows kept; MAE's sin-cos table is recomputed instead."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.errors import MimkitError
from mimkit.models.posembed import resize_abs_pos_embed
from mimkit.models.vit import sincos_pos_embed_2d


def bicubic_by_hand(table: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """The resize written out: the patch rows as a (D, g, g) image, antialiased bicubic, prefix kept."""
    old = int((table.shape[1] - prefix) ** 0.5)
    patches = table[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([table[:, :prefix], patches], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("old, new", [(4, 6), (6, 4), (14, 16), (14, 7), (4, 4)])
def test_learned_table_resize_is_bit_identical_to_bicubic(old, new, prefix, dtype):
    torch.manual_seed(0)
    table = torch.randn(1, prefix + old * old, 32).to(dtype)
    resized, how = resize_abs_pos_embed(table, new, prefix)
    assert how == "bicubic" and resized.dtype == dtype
    assert resized.shape == (1, prefix + new * new, 32)
    assert torch.equal(resized, bicubic_by_hand(table, new, prefix))
    assert torch.equal(resized[:, :prefix], table[:, :prefix])


def test_sincos_table_is_recomputed_not_resampled():
    resized, how = resize_abs_pos_embed(sincos_pos_embed_2d(32, 4, cls_token=True), 6)
    assert how == "sin-cos recomputed"
    assert torch.equal(resized, sincos_pos_embed_2d(32, 6, cls_token=True))


def test_table_that_is_not_a_square_grid_is_refused():
    with pytest.raises(MimkitError, match="not 1 \\+ a square grid"):
        resize_abs_pos_embed(torch.zeros(1, 1 + 15, 8), 4)
