"""ViT encoders over timm, and the fixed 2-D sin-cos position table of MAE.

The encoders built here are plain timm `VisionTransformer`s (class token, no classifier head); BEiT's are
timm's `Beit` (relative position bias, layer scale: `mimkit.models.beit`). Either way an exported encoder is
a timm model and loads anywhere timm does.

- ViT: Dosovitskiy et al., 2020, arXiv:2010.11929
- MAE sin-cos table: He et al., 2021, arXiv:2111.06377
"""

from collections.abc import Iterable, Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.errors import MimkitError

ENCODER_ARCHS = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
}


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool, **kwargs) -> torch.Tensor:
    """Apply transformer blocks in turn; with `checkpointed`, keep only each block's input for the backward
    pass and recompute the rest there (activation checkpointing: less memory, about a third more compute).

    The RNG state is replayed in the recomputation, so dropout and drop path give the same result, and the
    gradients are those of the plain forward.

    Args:
        blocks: the blocks, e.g. a ViT's `blocks`.
        x: (B, N, D) tokens.
        checkpointed: checkpoint every block (only while gradients are recorded).
        kwargs: passed to every block (e.g. BEiT's `shared_rel_pos_bias`).

    Returns:
        (B, N, D) tokens after the last block.
    """
    checkpointed = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointed else block(x, **kwargs)
    return x


def embed_with_mask_token(encoder: nn.Module, imgs: torch.Tensor, mask: torch.Tensor,
                          mask_token: torch.Tensor) -> torch.Tensor:
    """[CLS] and the patch embeddings of ``imgs`` (B, C, H, W), those where ``mask`` (bool (B, L) or
    (B, h, w)) is True replaced by ``mask_token``: (B, 1 + L, D), before any position embedding. How BEiT,
    SimMIM and MaskFeat hide patches from an encoder that sees them all."""
    x = encoder.patch_embed(imgs)  # [B, L, D]
    x = torch.where(mask.flatten(1)[..., None], mask_token.to(x.dtype), x)
    return torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


def encoder_arch(name: str) -> dict:
    """The dimensions of a named encoder: `embed_dim`, `depth`, `num_heads`, `mlp_ratio`.

    Args:
        name: a key of `ENCODER_ARCHS`, e.g. "vit_tiny".

    Returns:
        A fresh dict, safe to update.
    """
    if name not in ENCODER_ARCHS:
        raise MimkitError(f"unknown encoder arch {name!r}; choose one of: {', '.join(ENCODER_ARCHS)}")
    return dict(ENCODER_ARCHS[name])


def check_patch_grid(img_size: int, patch_size: int) -> int:
    """Checks that square patches tile a square image and returns the grid side.

    Args:
        img_size: image height and width in pixels.
        patch_size: patch height and width in pixels.

    Returns:
        `img_size // patch_size`, the number of patches along each side.
    """
    if patch_size < 1 or img_size < patch_size or img_size % patch_size:
        raise MimkitError(
            f"img_size {img_size} is not a positive multiple of patch_size {patch_size}; "
            "pick a patch size that divides the image size"
        )
    return img_size // patch_size


def build_vit(
    arch: str | Mapping,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    **timm_kwargs,
) -> VisionTransformer:
    """A timm ViT encoder with a class token, timm's LayerNorm (eps 1e-6) and no classifier head.

    Args:
        arch: a key of `ENCODER_ARCHS`, or a mapping with `embed_dim`, `depth`, `num_heads` and
            optionally `mlp_ratio`.
        img_size: square input size in pixels.
        patch_size: square patch size in pixels; must divide `img_size`.
        in_chans: image channels.
        **timm_kwargs: passed on to `VisionTransformer` (e.g. `drop_path_rate`); they override `arch`'s
            dims, so `build_vit("vit_tiny", 32, 8, 1, depth=2)` is a 2-block ViT-Tiny.

    Returns:
        `VisionTransformer` with `num_classes=0`: `forward` maps (B, C, H, W) to the (B, D) class token.
    """
    dims = encoder_arch(arch) if isinstance(arch, str) else dict(arch)
    check_patch_grid(img_size, patch_size)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        class_token=True,
        **{**dims, **timm_kwargs},
    )


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin | cos] of `pos` at `embed_dim // 2` frequencies from 1 down to 1/10000: (N,) -> (N, embed_dim)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim // 2))
    angles = pos[:, None] * omega[None, :]  # [N, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool) -> torch.Tensor:
    """The fixed 2-D sin-cos position table of MAE.

    Patches are numbered row-major. The first half of the dims encodes a patch's column and the
    second half its row, each as [sin | cos] at geometric frequencies; this is the layout of the MAE
    reference code (and so of its checkpoints and of transformers' ViTMAE). The class token, if any,
    gets an all-zero row in front.

    Args:
        embed_dim: width D; must be divisible by 4.
        grid_size: patches per side.
        cls_token: whether to prepend the class token's zero row.

    Returns:
        float32 tensor (1, [1 +] grid_size**2, D).
    """
    if embed_dim % 4:
        raise MimkitError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )
    half = embed_dim // 2
    table = torch.cat([_sincos_1d(half, cols.flatten()), _sincos_1d(half, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.float()[None]
