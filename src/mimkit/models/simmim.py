"""SimMIM pretraining: regress the raw pixels of masked patches with one linear layer.

The encoder sees every patch: a masked patch's embedding is replaced by a learnable mask token before the
[CLS] token is put in front and before the blocks, as in the reference code (``VisionTransformerForSimMIM``).
Its final-norm patch tokens, arranged on the patch grid, go through a 1x1 convolution (one linear layer per
token) to ``patch_size**2 * in_chans`` values and a pixel shuffle back to image size; the loss is the L1
distance to the input image (normalized pixels, no per-patch normalization) averaged over the pixels of
masked patches only.

The encoder is a plain timm `Beit`, held as ``model.encoder`` (its state dict loads into timm's `Beit` with
``strict=True``), set up as the reference ViT-B config (``simmim_pretrain__vit_base__img224__800ep.yaml``
over ``config.py``'s defaults): one relative position bias table shared by all blocks (``USE_SHARED_RPB:
True``, ``USE_RPB: False``), no absolute position embedding (``USE_APE: False``), layer scale 0.1 on both
branches of every block (``INIT_VALUES = 0.1``, the default the ViT-B config keeps), query and value biases
(``QKV_BIAS = True``), LayerNorm eps 1e-6, the final norm on all tokens (``USE_MEAN_POOLING: False``) and
stochastic depth 0.1 (``DROP_PATH_RATE``). That is the architecture of BEiT's pretraining, hence timm's
`Beit` rather than its `VisionTransformer`: the shared relative positions and the layer scale are what the
reference ViT is built with, and evaluation reads a `Beit` as it reads BEiT's. The weights start as the
reference code's do: truncated normals of std 0.02 cut at one standard deviation (its
``_trunc_normal_(a=-std, b=std)``) for every linear and convolution weight of the encoder, the [CLS] and the
mask token, each block's output projections divided by sqrt(2 * block number); the prediction layer keeps
PyTorch's default initialization, as in the reference code.

- SimMIM: Xie et al., SimMIM: A Simple Framework for Masked Image Modeling, 2022, arXiv:2111.09886
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.vit import check_patch_grid, embed_with_mask_token, encoder_arch, run_blocks

INIT_STD = 0.02  # the reference code's weight init: truncated normal, cut at +-1 std


def reference_trunc_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """The reference code's init: a normal of std 0.02 truncated at one standard deviation, in place."""
    return trunc_normal_(tensor, std=INIT_STD, a=-INIT_STD, b=INIT_STD)


def check_mask_geometry(img_size: int, patch_size: int, mask_patch_size: int) -> int:
    """Checks that SimMIM's square mask patches are whole patches that tile the image.

    Args:
        img_size: image side in pixels.
        patch_size: the ViT's patch side in pixels.
        mask_patch_size: side of the square that is masked as one, in pixels (32 in the paper).

    Returns:
        The mask grid side, ``img_size // mask_patch_size``.
    """
    check_patch_grid(img_size, patch_size)
    if mask_patch_size < patch_size or mask_patch_size % patch_size:
        raise MimkitError(f"simmim.mask_patch_size={mask_patch_size} is not a multiple of the patch size "
                          f"{patch_size}")
    if img_size % mask_patch_size:
        raise MimkitError(f"simmim.mask_patch_size={mask_patch_size} does not tile {img_size} px images; "
                          "pick a size that divides the image size")
    return img_size // mask_patch_size


def num_masked_cells(num_cells: int, mask_ratio: float) -> int:
    """Mask-patch cells to hide: ``ceil(num_cells * mask_ratio)``, as the reference ``MaskGenerator``
    (30 of 49 at 0.6); a ratio outside (0, 1) is refused.

    Args:
        num_cells: cells of the mask grid.
        mask_ratio: share of them to hide, in (0, 1).
    """
    if not 0 < mask_ratio < 1:
        raise MimkitError(f"simmim.mask_ratio={mask_ratio} must be in (0, 1)")
    return math.ceil(num_cells * mask_ratio)


def simmim_mask(grid: int, scale: int, num_masked: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM's random mask: ``num_masked`` of ``grid x grid`` mask-patch cells drawn uniformly, each covering
    ``scale x scale`` patches (the reference ``MaskGenerator``).

    Args:
        grid: mask grid side (image side / mask-patch side).
        scale: patches per mask-patch side (mask-patch side / patch side).
        num_masked: cells to hide, exactly (`num_masked_cells`).
        generator: source of randomness; the global torch RNG when None.

    Returns:
        bool (grid * scale, grid * scale), True where a patch is masked.
    """
    cells = torch.zeros(grid * grid, dtype=torch.bool)
    cells[torch.randperm(grid * grid, generator=generator)[:num_masked]] = True
    return cells.view(grid, grid).repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """bool (B, h, w) or (B, L) patch mask -> float (B, 1, h * p, w * p), 1 on the masked patches' pixels."""
    side = math.isqrt(mask[0].numel())
    mask = mask.reshape(-1, side, side).float()
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None]


class SimMIM(nn.Module):
    """SimMIM masked image modeling: a ViT with a mask token, a linear pixel head (SimMIM, arXiv:2111.09886).

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size in pixels; must divide `img_size`.
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio: the ViT's dimensions.
        layer_scale_init: initial value of the per-channel layer scale (the reference config's 0.1; 0 turns
            it off).
        shared_rel_pos_bias: one relative position bias table for all blocks (the reference ViT-B config)
            rather than one per block (its ``USE_RPB``).
        drop_path_rate: stochastic depth at the last block (0.1 in the reference config).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 0.1,
        shared_rel_pos_bias: bool = True,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        check_patch_grid(img_size, patch_size)
        self.patch_size, self.in_chans = patch_size, in_chans
        # Everything timm needs to rebuild this encoder (an export loads with strict=True); global_pool
        # "token" keeps the final LayerNorm over all tokens (`norm`, no `fc_norm`), as pretraining uses it.
        self.encoder_kwargs = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            init_values=layer_scale_init or None, use_abs_pos_emb=False,
            use_rel_pos_bias=not shared_rel_pos_bias, use_shared_rel_pos_bias=shared_rel_pos_bias,
            global_pool="token", drop_path_rate=drop_path_rate,
        )
        self.encoder = Beit(**self.encoder_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # one linear layer per patch token (a 1x1 convolution on the grid), then a pixel shuffle
        self.decoder = nn.Sequential(nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1),
                                     nn.PixelShuffle(patch_size))
        self._init_like_reference()

    def _init_like_reference(self) -> None:
        """The reference code's encoder init (see the module docstring); timm's `Beit` cuts its normals at
        +-2 (absolute) and leaves the patch embedding at PyTorch's default."""
        enc = self.encoder
        for module in enc.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                reference_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        reference_trunc_normal_(enc.cls_token)
        reference_trunc_normal_(self.mask_token)
        enc.fix_init_weight()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch)."""
        self.encoder.set_grad_checkpointing(enable)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encodes all patches, masked ones replaced by the mask token.

        Args:
            imgs: (B, C, H, W) normalized images.
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            (B, 1 + L, D) final-norm tokens, [CLS] first.
        """
        enc = self.encoder
        x = enc.pos_drop(embed_with_mask_token(enc, imgs, mask, self.mask_token))  # [B, 1 + L, D]
        shared_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None  # timm's layout
        x = run_blocks(enc.blocks, x, enc.grad_checkpointing, shared_rel_pos_bias=shared_bias)
        return enc.norm(x)

    def forward_decoder(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels predicted from every patch token.

        Args:
            x: (B, 1 + L, D) tokens from `forward_encoder`.

        Returns:
            (B, C, H, W) predicted normalized images.
        """
        patches = x[:, 1:]  # [B, L, D]
        side = math.isqrt(patches.shape[1])
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, side, side)  # [B, D, h, w]
        return self.decoder(grid)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean L1 distance over the pixels (and channels) of masked patches; visible ones add nothing.

        Args:
            imgs: (B, C, H, W) normalized images, the target.
            pred: (B, C, H, W) from `forward_decoder`.
            mask: bool (B, L) or (B, h, w), True where a patch is masked (at least one per batch).

        Returns:
            Scalar loss.
        """
        hidden = pixel_mask(mask, self.patch_size)  # [B, 1, H, W]
        error = F.l1_loss(pred, imgs, reduction="none")  # [B, C, H, W]
        return (error * hidden).sum() / (hidden.sum() * imgs.shape[1])

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pretraining step's loss, and the prediction.

        Args:
            imgs: (B, C, H, W) normalized images.
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            loss: scalar, `forward_loss`.
            pred: (B, C, H, W) predicted normalized images (visible patches included).
        """
        pred = self.forward_decoder(self.forward_encoder(imgs, mask))
        return self.forward_loss(imgs, pred, mask), pred


def _simmim(arch: str, **kwargs) -> SimMIM:
    """The arch's dimensions, overridden by ``kwargs``."""
    return SimMIM(**{**encoder_arch(arch), **kwargs})


def simmim_vit_mini(**kwargs) -> SimMIM:
    """SimMIM on ViT-Mini (128 wide, 6 blocks, 4 heads)."""
    return _simmim("vit_mini", **kwargs)


def simmim_vit_tiny(**kwargs) -> SimMIM:
    """SimMIM on ViT-Tiny (192 wide, 12 blocks, 3 heads)."""
    return _simmim("vit_tiny", **kwargs)


def simmim_vit_small(**kwargs) -> SimMIM:
    """SimMIM on ViT-Small (384 wide, 12 blocks, 6 heads)."""
    return _simmim("vit_small", **kwargs)


def simmim_vit_base(**kwargs) -> SimMIM:
    """SimMIM on ViT-Base (768 wide, 12 blocks, 12 heads), the paper's ViT."""
    return _simmim("vit_base", **kwargs)


def simmim_vit_large(**kwargs) -> SimMIM:
    """SimMIM on ViT-Large (1024 wide, 24 blocks, 16 heads)."""
    return _simmim("vit_large", **kwargs)


SIMMIM_MODELS = {
    "vit_mini": simmim_vit_mini,
    "vit_tiny": simmim_vit_tiny,
    "vit_small": simmim_vit_small,
    "vit_base": simmim_vit_base,
    "vit_large": simmim_vit_large,
}


def create_simmim(name: str, **kwargs) -> SimMIM:
    """A SimMIM model by encoder name, e.g. ``create_simmim("vit_mini", img_size=28, patch_size=4,
    in_chans=1)``.

    Args:
        name: a key of `SIMMIM_MODELS`.
        **kwargs: `SimMIM` arguments; they override the arch's, so `depth=2` gives a 2-block model.
    """
    if name not in SIMMIM_MODELS:
        raise MimkitError(f"unknown SimMIM model {name!r}; choose one of: {', '.join(SIMMIM_MODELS)}")
    return SIMMIM_MODELS[name](**kwargs)
