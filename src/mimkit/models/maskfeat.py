"""MaskFeat: a ViT with a mask token regresses the HOG features of the masked patches.

The encoder is a plain timm `VisionTransformer` (class token, learned position table) held as
`model.encoder`, so its state dict loads into timm with `strict=True`. Pretraining adds a learnable mask
token that replaces the embeddings of masked patches before the position table is added, a linear head
from every token to its patch's HOG features, and the HOG target itself (`HOG`, no weights of its own).

- MaskFeat: Wei et al., Masked Feature Prediction for Self-Supervised Visual Pre-Training, 2022,
  arXiv:2112.09133
- HOG: Dalal and Triggs, Histograms of Oriented Gradients for Human Detection, CVPR 2005
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.vit import build_vit, check_patch_grid, embed_with_mask_token, encoder_arch, run_blocks

# Sobel's derivative along x: left column minus right column (a cross-correlation, as conv2d applies it).
_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def gaussian_window(size: int) -> torch.Tensor:
    """A (size, size) Gaussian bump centred on the window, standard deviation size / 2 (its peak is 1).

    MaskFeat weights each pixel's gradient by it, tiled once per patch, so that a patch's histograms
    favour its centre. The scale is irrelevant: every cell's histogram is L2-normalized afterwards.
    """
    n = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) / (size / 2)
    bump = torch.exp(-0.5 * n**2)
    return bump[:, None] * bump[None, :]


class HOG(nn.Module):
    """Histograms of oriented gradients, per colour channel: MaskFeat's prediction target.

    Per channel: Sobel gradients (reflect padding), each pixel votes its gradient magnitude (times a
    Gaussian window tiled over the image) into one of `nbins` unsigned orientation bins spanning 180
    degrees; votes are summed over `cell_size` x `cell_size` cells and each cell's histogram is
    L2-normalized. A patch's feature is its cells' histograms, ordered (channel, bin, cell row, cell
    column): `in_chans * nbins * (patch_size / cell_size) ** 2` numbers (108 for RGB 16-px patches of 8-px
    cells). This is the authors' HOG (SlowFast's ``models/operators.py``, mmpretrain's ``HOGGenerator``):
    the orientation of a pixel is ``atan2(gx, gy)`` with gx = left minus right and gy = top minus
    bottom, so bin 0 holds horizontal edges and bin nbins // 2 vertical ones.

    - MaskFeat: Wei et al., 2022, arXiv:2112.09133 (section 3: 9 bins, 8x8 cells, per RGB channel,
      local L2 normalization)

    Args:
        in_chans: image channels, each with its own histograms.
        nbins: orientation bins over 180 degrees.
        cell_size: side of a cell in pixels.
        window: side of the Gaussian window (the authors': the patch size, 16); 0 weighs every pixel alike.
    """

    def __init__(self, in_chans: int = 3, nbins: int = 9, cell_size: int = 8, window: int = 16):
        super().__init__()
        self.in_chans, self.nbins, self.cell_size, self.window = in_chans, nbins, cell_size, window
        kernels = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None]  # [2, 1, 3, 3]: x, then y
        self.register_buffer("kernels", kernels.repeat(in_chans, 1, 1, 1), persistent=False)  # [2C, 1, 3, 3]
        weights = gaussian_window(window) if window else torch.ones(1, 1)
        self.register_buffer("weights", weights, persistent=False)

    def cells(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> histograms (B, C, nbins, H / cell_size, W / cell_size), L2-normalized
        over the bins; computed in float32 without gradients, whatever autocast is on."""
        B, C, H, W = imgs.shape
        with torch.no_grad(), torch.autocast(imgs.device.type, enabled=False):
            x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")
            grad = F.conv2d(x, self.kernels, groups=C).view(B, C, 2, H, W)
            gx, gy = grad.unbind(2)  # [B, C, H, W] each
            tiles = (H // self.weights.shape[0], W // self.weights.shape[1])
            magnitude = torch.hypot(gx, gy) * self.weights.repeat(tiles)
            # unsigned orientation: atan2 spans (-pi, pi], 2 * nbins half-open bins folded onto nbins
            bins = (torch.atan2(gx, gy) / math.pi * self.nbins).floor().long() % self.nbins
            votes = magnitude.new_zeros(B, C, self.nbins, H, W)
            votes.scatter_add_(2, bins[:, :, None], magnitude[:, :, None])
            c = self.cell_size
            hist = votes.view(B, C, self.nbins, H // c, c, W // c, c).sum((4, 6))
            return F.normalize(hist, dim=2)

    def to_patches(self, cells: torch.Tensor, patch_size: int) -> torch.Tensor:
        """(B, C, nbins, h * k, w * k) cells, k = patch_size / cell_size -> (B, h * w, C * nbins * k * k),
        patches row-major, each (channel, bin, cell row, cell column)."""
        B, C, n, Hc, Wc = cells.shape
        k = patch_size // self.cell_size
        x = cells.view(B, C, n, Hc // k, k, Wc // k, k).permute(0, 3, 5, 1, 2, 4, 6)  # [B, h, w, C, n, k, k]
        return x.reshape(B, (Hc // k) * (Wc // k), C * n * k * k)

    def to_cells(self, patches: torch.Tensor, patch_size: int) -> torch.Tensor:
        """The inverse of `to_patches` (square grids): (B, L, C * nbins * k * k) -> (B, C, nbins, H', W')."""
        B, L, _ = patches.shape
        g, k, C, n = math.isqrt(L), patch_size // self.cell_size, self.in_chans, self.nbins
        x = patches.reshape(B, g, g, C, n, k, k).permute(0, 3, 4, 1, 5, 2, 6)  # [B, C, n, g, k, g, k]
        return x.reshape(B, C, n, g * k, g * k)

    def forward(self, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
        """imgs: (B, C, H, W) -> per-patch features (B, L, C * nbins * (patch_size / cell_size) ** 2)."""
        return self.to_patches(self.cells(imgs), patch_size)


class MaskFeat(nn.Module):
    """MaskFeat pretraining: predict the HOG features of masked patches (MaskFeat, arXiv:2112.09133).

    The encoder sees every patch, masked ones replaced by a shared learned mask token (before the
    position table is added, as in the authors' code); the final normalized tokens go through one linear
    layer to HOG features, and the loss is the mean squared error over the masked patches only.
    Initialization follows the authors' (mmpretrain's ``MaskFeatViT``): truncated normal, std 0.02, for
    the position table, the class and mask tokens and every linear and the patch-embedding weights.

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size; must divide `img_size`.
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio: the ViT's dimensions.
        hog_bins: HOG orientation bins (9 in the paper).
        hog_cell: HOG cell side in pixels (8 in the paper); must divide `patch_size`.
        hog_window: side of the Gaussian window weighting the gradients, tiled over the image; None: the
            patch size (the authors': 16 for 16-px patches); 0: no weighting. Must divide `img_size`.
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
        hog_bins: int = 9,
        hog_cell: int = 8,
        hog_window: int | None = None,
    ):
        super().__init__()
        check_patch_grid(img_size, patch_size)
        if num_heads < 1 or embed_dim % num_heads:
            raise MimkitError(f"width {embed_dim} is not divisible by {num_heads} attention heads")
        if hog_bins < 1:
            raise MimkitError(f"hog_bins={hog_bins} must be at least 1")
        if hog_cell < 1 or patch_size % hog_cell:
            raise MimkitError(f"the HOG cell size {hog_cell} does not divide the patch size {patch_size}; "
                              "pick a cell size that does (the paper: 8-px cells in 16-px patches)")
        window = patch_size if hog_window is None else hog_window
        if window < 0 or (window and img_size % window):
            raise MimkitError(f"the HOG Gaussian window {window} does not divide the image size {img_size}; "
                              "use a divisor (the paper: the patch size) or 0 for none")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        dims = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.encoder = build_vit(dims, img_size, patch_size, in_chans)
        self.hog = HOG(in_chans, hog_bins, hog_cell, window)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.head = nn.Linear(embed_dim, in_chans * hog_bins * (patch_size // hog_cell) ** 2)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The authors' init: N(0, 0.02) truncated at +-2 for the tables, tokens, linears and patch
        embedding, zero linear biases, unit LayerNorms; the patch embedding's bias keeps PyTorch's."""
        enc = self.encoder
        for table in (enc.pos_embed, enc.cls_token, self.mask_token, enc.patch_embed.proj.weight):
            nn.init.trunc_normal_(table, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch on the encoder)."""
        self.encoder.set_grad_checkpointing(enable)

    def forward_features(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encodes all patches, masked ones replaced by the mask token.

        Args:
            imgs: (B, C, H, W) normalized images.
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            (B, 1 + L, D) final-norm tokens, [CLS] first.
        """
        enc = self.encoder
        x = embed_with_mask_token(enc, imgs, mask, self.mask_token) + enc.pos_embed  # [B, 1 + L, D]
        x = enc.norm_pre(enc.pos_drop(x))
        return enc.norm(run_blocks(enc.blocks, x, enc.grad_checkpointing))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + L, D) from `forward_features` -> predicted HOG features (B, L, F) of every patch."""
        return self.head(x[:, 1:])  # the class token predicts nothing

    def forward_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> the HOG features (B, L, F) of every patch, float32, no gradient."""
        return self.hog(imgs, self.patch_size)

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only. pred, target (B, L, F); mask bool (B, L)."""
        mask = mask.flatten(1).float()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images (the HOG is taken of these, as the authors do).
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            loss (scalar), pred (B, L, F) for every patch, target (B, L, F).
        """
        pred = self.forward_head(self.forward_features(imgs, mask))
        target = self.forward_target(imgs)
        return self.forward_loss(pred, target, mask), pred, target


def _maskfeat(arch: str, **kw) -> MaskFeat:
    return MaskFeat(**{**encoder_arch(arch), **kw})


def maskfeat_vit_mini(**kw) -> MaskFeat:
    return _maskfeat("vit_mini", **kw)


def maskfeat_vit_tiny(**kw) -> MaskFeat:
    return _maskfeat("vit_tiny", **kw)


def maskfeat_vit_small(**kw) -> MaskFeat:
    return _maskfeat("vit_small", **kw)


def maskfeat_vit_base(**kw) -> MaskFeat:
    """MaskFeat on ViT-Base (768 wide, 12 blocks, 12 heads): the paper's ImageNet model."""
    return _maskfeat("vit_base", **kw)


def maskfeat_vit_large(**kw) -> MaskFeat:
    return _maskfeat("vit_large", **kw)


MASKFEAT_MODELS = {
    "vit_mini": maskfeat_vit_mini,
    "vit_tiny": maskfeat_vit_tiny,
    "vit_small": maskfeat_vit_small,
    "vit_base": maskfeat_vit_base,
    "vit_large": maskfeat_vit_large,
}


def create_maskfeat(name: str, **kw) -> MaskFeat:
    """A MaskFeat by encoder name, e.g. `create_maskfeat("vit_mini", img_size=28, patch_size=4, in_chans=1,
    hog_cell=4)`; `kw` overrides any constructor argument (``depth=2``)."""
    if name not in MASKFEAT_MODELS:
        raise MimkitError(f"unknown MaskFeat model {name!r}; choose one of: {', '.join(MASKFEAT_MODELS)}")
    return MASKFEAT_MODELS[name](**kw)
