"""MAE: a ViT encoder on the visible patches, a light decoder regressing the pixels of the masked ones.

- MAE, He et al., 2021, arXiv:2111.06377
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from mimkit.errors import MimkitError
from mimkit.models.vit import build_vit, check_patch_grid, encoder_arch, run_blocks, sincos_pos_embed_2d


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` stay visible at `mask_ratio`: `int(L * (1 - mask_ratio))`, as in MAE.

    Raises `MimkitError` unless at least one patch is kept and at least one is masked.
    """
    keep = int(num_patches * (1 - mask_ratio)) if 0 < mask_ratio < 1 else 0
    if not 0 < keep < num_patches:
        raise MimkitError(
            f"mask_ratio {mask_ratio} must lie in (0, 1) and leave both masked and visible patches "
            f"among the {num_patches} patches of an image"
        )
    return keep


class PatchPixelNorm(nn.Module):
    """Normalizes each target patch by its own mean and (unbiased) variance: MAE's norm-pix target."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, L, P) -> (B, L, P), each row with mean 0 and variance var / (var + eps)."""
        var, mean = torch.var_mean(patches, dim=-1, keepdim=True)
        return (patches - mean) / (var + self.eps) ** 0.5

    def invert(self, normalized: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Map `normalized` (B, L, P) back to pixels with the statistics of `patches` (B, L, P)."""
        var, mean = torch.var_mean(patches, dim=-1, keepdim=True)
        return normalized * (var + self.eps) ** 0.5 + mean


class MAE(nn.Module):
    """Masked autoencoder: `encoder` is a timm `VisionTransformer`; the decoder is only for pretraining.

    The encoder sees the visible patches only (with its fixed sin-cos positions); the decoder embeds
    them, fills the masked slots with a shared learned mask token, adds its own fixed sin-cos positions
    and regresses each patch's pixels. The loss is the MSE on masked patches only.

    - MAE, He et al., 2021, arXiv:2111.06377

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size; must divide `img_size`.
        in_chans: image channels.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP hidden width over block width, encoder and decoder.
        norm_pix_loss: regress per-patch normalized pixels (the paper's better target) instead of raw ones.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        grid_size = check_patch_grid(img_size, patch_size)
        for width, heads in ((embed_dim, num_heads), (decoder_embed_dim, decoder_num_heads)):
            if heads < 1 or width % heads:
                raise MimkitError(f"width {width} is not divisible by {heads} attention heads")
        patch_dim = patch_size**2 * in_chans
        if norm_pix_loss and patch_dim < 2:
            raise MimkitError("norm_pix_loss needs patches of at least 2 values; use a larger patch_size")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = grid_size**2
        self.norm_pix_loss = norm_pix_loss  # tells viewers that `pred` lives in normalized-patch space

        self.encoder = build_vit(
            dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio),
            img_size,
            patch_size,
            in_chans,
        )
        self.encoder.pos_embed.requires_grad_(False)

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim)
        self.target_norm = PatchPixelNorm() if norm_pix_loss else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init: sin-cos tables, xavier-uniform linears (the patch embedding too), tokens N(0, .02)."""
        grid_size = self.img_size // self.patch_size
        with torch.no_grad():
            for table in (self.encoder.pos_embed, self.decoder_pos_embed):
                table.copy_(sincos_pos_embed_2d(table.shape[-1], grid_size, cls_token=True))
        proj = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> (B, L, p*p*C), patches row-major, each flattened as (p, p, C)."""
        B, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, L, p*p*C) -> (B, C, H, W); the inverse of `patchify` for this model's image size."""
        B = patches.shape[0]
        p, g = self.patch_size, self.img_size // self.patch_size
        x = patches.reshape(B, g, g, p, p, self.in_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.in_chans, g * p, g * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking: the patches with the lowest noise stay visible.

        Args:
            x: (B, L, D) patch tokens.
            mask_ratio: fraction of patches to mask; keeps `int(L * (1 - mask_ratio))`.
            noise: (B, L) ranking noise; uniform random when None.

        Returns:
            x_kept (B, L_keep, D) in ascending-noise order, mask (B, L) with 1 = masked, and
            ids_restore (B, L): the rank of each patch in that order, which undoes the shuffle.
        """
        B, L, D = x.shape
        keep = num_kept(L, mask_ratio)
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise MimkitError(f"noise has shape {tuple(noise.shape)}, expected (batch, patches) = {(B, L)}")
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = x.gather(1, ids_keep[..., None].expand(-1, -1, D))  # [B, L_keep, D]
        mask = (ids_restore >= keep).to(x.dtype)  # a patch is masked iff its rank is past the kept ones
        return x_kept, mask, ids_restore

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder and decoder block's activations in the backward pass (timm's switch,
        `VisionTransformer.set_grad_checkpointing`, on the encoder, which the decoder follows)."""
        self.encoder.set_grad_checkpointing(enable)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L).

        The encoder runs on the visible patches only, and so does the patch embedding: the masking
        gathers raw pixel patches and the encoder's patch-embedding conv is applied to them as the
        linear map it is (same weights, same result as embedding every patch and then gathering).
        """
        enc = self.encoder
        patches = self.patchify(imgs)  # [B, L, P]
        pixels, mask, ids_restore = self.random_masking(patches, mask_ratio, noise)  # [B, L_keep, P]
        ids_keep = ids_restore.argsort(dim=1)[:, : pixels.shape[1]]  # the inverse of ids_restore, kept part
        proj = enc.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).flatten(1)  # conv (D, C, p, p) as a linear on (p, p, C)
        x = F.linear(pixels, weight, proj.bias) + enc.pos_embed[0, 1:][ids_keep]  # [B, L_keep, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = run_blocks(enc.blocks, torch.cat([cls, x], dim=1), enc.grad_checkpointing)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, 1 + L_keep, D), ids_restore: (B, L) -> pred (B, L, p*p*C) for every patch."""
        x = self.decoder_embed(latent)  # [B, 1 + L_keep, Dd]
        B, L = ids_restore.shape
        Dd = x.shape[-1]
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd] in shuffled order
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, Dd))  # back to image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))  # the class token predicts nothing

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only. imgs (B, C, H, W), pred (B, L, P), mask (B, L)."""
        target = self.target_norm(self.patchify(imgs))
        per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One MAE step.

        Args:
            imgs: (B, C, H, W) normalized images at this model's size.
            mask_ratio: fraction of patches masked per image.
            noise: (B, L) ranking noise deciding the mask (lowest noise stays visible); random when None.

        Returns:
            loss (scalar), pred (B, L, p*p*C) in the target's space (per-patch normalized when
            `norm_pix_loss`), mask (B, L) with 1 = masked.
        """
        expected = (self.in_chans, self.img_size, self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise MimkitError(
                f"images of shape {tuple(imgs.shape)} do not fit this MAE: expected (B, *{expected})"
            )
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


_DECODERS = {  # (decoder_embed_dim, decoder_depth, decoder_num_heads); the paper's 512 x 8 from ViT-B up
    "vit_mini": (128, 4, 4),
    "vit_tiny": (128, 4, 4),
    "vit_small": (256, 4, 8),
    "vit_base": (512, 8, 16),
    "vit_large": (512, 8, 16),
    "vit_huge": (512, 8, 16),
}


def _mae(arch: str, **kw) -> MAE:
    width, depth, heads = _DECODERS[arch]
    decoder = dict(decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads)
    return MAE(**{**encoder_arch(arch), **decoder, **kw})


def mae_vit_mini(**kw) -> MAE:
    return _mae("vit_mini", **kw)


def mae_vit_tiny(**kw) -> MAE:
    return _mae("vit_tiny", **kw)


def mae_vit_small(**kw) -> MAE:
    return _mae("vit_small", **kw)


def mae_vit_base(**kw) -> MAE:
    return _mae("vit_base", **kw)


def mae_vit_large(**kw) -> MAE:
    return _mae("vit_large", **kw)


def mae_vit_huge(**kw) -> MAE:
    return _mae("vit_huge", **kw)


MAE_MODELS = {
    "vit_mini": mae_vit_mini,
    "vit_tiny": mae_vit_tiny,
    "vit_small": mae_vit_small,
    "vit_base": mae_vit_base,
    "vit_large": mae_vit_large,
    "vit_huge": mae_vit_huge,
}


def create_mae(name: str, **kw) -> MAE:
    """An MAE by encoder name ("vit_tiny" or "mae_vit_tiny"); `kw` overrides any constructor argument."""
    key = name.removeprefix("mae_")
    if key not in MAE_MODELS:
        raise MimkitError(f"unknown MAE model {name!r}; choose one of: {', '.join(MAE_MODELS)}")
    return MAE_MODELS[key](**kw)
